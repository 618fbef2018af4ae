"""Which torch device a process trains and scores on: a name from the run config's `device` or a site's own setting.

"auto" is the first CUDA card this process sees, else the CPU; "cpu", "cuda" (the first card, "cuda:0") and "cuda:N"
are asked for explicitly. A card the machine lacks is an error when the name is resolved (`DeviceUnavailable`,
naming the card and what the machine has), so whoever resolves it first (the simulation's checks, the server's
holdout, a site's policy check) stops before any round starts, never in the middle of one. CUDA is always named
with its index: Opacus draws the DP noise with a generator that must sit on the parameters' own card.

A name is checked without torch (`parse_device`: every process reads the run config, not all of them import
torch); only `resolve_device` asks torch what the machine has.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AUTO = "auto"
CHOICES = ("auto", "cpu", "cuda", "cuda:N")  # what a `device` setting may say
_CARD = re.compile(r"cuda:(\d{1,4})")


class DeviceUnavailable(ValueError):
    """A device name that is well formed but not on this machine (the message names it and what there is)."""

    def __init__(self, name: str, why: str):
        super().__init__(f"device {name!r} is not available here: {why}; use 'auto' or 'cpu'")
        self.name, self.why = name, why


def parse_device(name: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", the card's index or None) of a device name; ValueError for anything else."""
    text = str(name)
    if text in (AUTO, "cpu", "cuda"):
        return text, None
    card = _CARD.fullmatch(text)
    if card is None:
        raise ValueError(f"must be one of {list(CHOICES)} (N a CUDA card's index), got {name!r}")
    return "cuda", int(card.group(1))


def cuda_cards() -> int:
    """How many CUDA cards this process sees (0 without CUDA or with a CPU-only torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str = AUTO, cards: int | None = None) -> torch.device:
    """The device `name` stands for on a machine with `cards` CUDA cards (default: this one's); DeviceUnavailable
    for a card it lacks, ValueError for a malformed name."""
    import torch

    kind, index = parse_device(name)
    cards = cuda_cards() if cards is None else int(cards)
    if kind == "cpu" or (kind == AUTO and cards == 0):
        return torch.device("cpu")
    index = 0 if index is None else index
    if cards == 0:
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"
        raise DeviceUnavailable(str(name), f"this machine has no CUDA device{build}")
    if index >= cards:
        raise DeviceUnavailable(str(name), f"this machine has {cards} CUDA device(s), cuda:0 to cuda:{cards - 1}")
    return torch.device("cuda", index)


def check_available(name: str) -> None:
    """DeviceUnavailable unless this machine has the card `name` names ("auto" and "cpu" always are: no torch)."""
    if parse_device(name)[0] == "cuda":
        resolve_device(name)


def device_name(device: torch.device) -> str:
    """A human name for logs and benchmarks: the card's model on CUDA, "cpu" otherwise."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
