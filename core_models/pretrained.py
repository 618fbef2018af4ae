"""Start from weights trained elsewhere: a checkpoint file on local disk mapped onto an equifed network, its RGB
first convolution adapted to one (grey) channel when the network takes grey images (an RGB network, in-channels=3,
takes it as it is), and the parts a site keeps frozen while it trains. A 3-D (volume) network takes 3-D
checkpoints only: a 2-D one offered to it (or the reverse) is refused, not partly loaded.

Why: labelled scans are scarce at one hospital and DP-SGD's noise grows with the number of trained parameters; good
features learnt elsewhere (a public chest X-ray model, a self-supervised encoder) leave little to learn, and a frozen
encoder leaves DP-SGD only the head's per-sample gradients.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code (a
pickled object in the file is refused, not run). Nothing is downloaded.

Key mapping: a checkpoint's names rarely match ours. ``key_map`` is ``"src=dst;src2=dst2"``: every checkpoint key
that starts with ``src`` is renamed to start with ``dst`` instead (first rule that matches), after a leading
``module.`` (DataParallel / Opacus) is dropped. Examples: a MONAI ``ResNet`` saved on its own loads into
``build_model("resnet")`` (``Standardize`` first, so its ResNet is submodule ``1``) with ``"=1."``; a state dict saved
from ``build_model`` itself needs no map. A key whose tensor does not fit (e.g. a head with other classes) is left
at its fresh initialisation and listed in the report, so the caller sees what was not taken over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core_models.model_card import load_state_dict_file, state_dims

FREEZE_CHOICES = ("none", "stem", "encoder")


class CheckpointFormatError(ValueError):
    """A checkpoint file that holds no state dict equifed can read (the message names the file)."""


@dataclass(frozen=True)
class LoadReport:
    """What a pretrained checkpoint gave the model."""

    loaded: list[str]
    adapted: list[str] = field(default_factory=list)  # first convolutions adapted: RGB -> grey, grey -> RGB
    skipped: dict[str, str] = field(default_factory=dict)  # our key -> why it kept its fresh weights
    unused: list[str] = field(default_factory=list)  # checkpoint keys no parameter of ours took


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, through the one weights-only loader (core_models.model_card), with a
    "state_dict" wrapper and DataParallel's leading "module." taken off."""
    try:
        state = load_state_dict_file(path)
    except FileNotFoundError as err:
        raise CheckpointFormatError(f"pretrained checkpoint not found: {Path(path)}") from err
    except ValueError as err:
        raise CheckpointFormatError(str(err)) from None
    return {k.removeprefix("module."): v for k, v in state.items()}


def parse_key_map(text: str) -> list[tuple[str, str]]:
    rules = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"pretrained key map entries are src=dst, got {part!r}")
        src, dst = part.split("=", 1)
        rules.append((src.strip(), dst.strip()))
    return rules


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    for src, dst in rules:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def grey_first_conv(weight: torch.Tensor) -> torch.Tensor:
    """An RGB convolution's weight (out, 3, k, k[, k]) as a one-channel one (out, 1, k, k[, k]): the sum over the
    input channels, so a grey image gives what the RGB network gave the same image replicated to three channels."""
    return weight.sum(dim=1, keepdim=True)


def rgb_first_conv(weight: torch.Tensor) -> torch.Tensor:
    """A grey convolution's weight (out, 1, k, k[, k]) as an RGB one (out, 3, k, k[, k]): a third in each channel,
    so an RGB image gives what the grey network gave the image's channel mean (a grey image: exactly what it
    gave)."""
    return weight.repeat(1, 3, *[1] * (weight.dim() - 2)) / 3.0


def _check_dims(path: str | Path, source: dict, target: dict) -> None:
    """Refuse a checkpoint of other spatial dims than the network's (2-D images, 3-D volumes): only its norms and
    head would fit, and a silently half-loaded network is worse than none."""
    try:
        theirs, mine = state_dims(source), state_dims(target)
    except ValueError as err:  # a file that mixes both
        raise CheckpointFormatError(f"pretrained checkpoint {path}: {err}") from None
    if theirs is not None and mine is not None and theirs != mine:
        what = {2: "2-D network (images)", 3: "3-D network (volumes)"}
        raise CheckpointFormatError(f"pretrained checkpoint {path} holds a {what[theirs]} but this run trains a "
                                    f"{what[mine]} (dims = {mine}): give a {mine}-D checkpoint")


def load_pretrained(model: nn.Module, path: str | Path, key_map: str = "") -> LoadReport:
    """Copy the checkpoint's tensors that fit into `model` (in place); the rest keep their initialisation.

    A first convolution whose input channels differ is adapted: an RGB one (out, 3, k, k) into a grey network is
    summed to one channel (:func:`grey_first_conv`); a grey one into an RGB network (in-channels=3) is spread over
    the three (:func:`rgb_first_conv`). An RGB checkpoint into an RGB network is copied unchanged. A checkpoint of
    other spatial dims (2-D into a 3-D network or the reverse) raises CheckpointFormatError."""
    source = {rename(k, parse_key_map(key_map)): v for k, v in read_state_dict(path).items()}
    target = model.state_dict()
    _check_dims(path, source, target)
    loaded, adapted, skipped = [], [], {}
    for name, mine in target.items():
        theirs = source.get(name)
        if theirs is None:
            skipped[name] = "not in the checkpoint"
            continue
        if theirs.dim() == mine.dim() >= 4 and {int(mine.shape[1]), int(theirs.shape[1])} == {1, 3} \
                and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:]:
            theirs = grey_first_conv(theirs) if mine.shape[1] == 1 else rgb_first_conv(theirs)
            adapted.append(name)
        if theirs.shape != mine.shape:
            skipped[name] = f"shape {tuple(theirs.shape)} in the checkpoint, {tuple(mine.shape)} here"
            continue
        target[name] = theirs.to(mine.dtype)
        loaded.append(name)
    if not loaded:
        raise CheckpointFormatError(f"no tensor of {path} fits this network (first keys: {sorted(source)[:3]}; "
                                    f"ours: {sorted(target)[:3]}): give a key map (pretrained-key-map)")
    model.load_state_dict(target)
    return LoadReport(loaded, adapted, skipped, sorted(set(source) - set(target)))


def head_of(model: nn.Module) -> nn.Module:
    """The classification head: `model.head` (SmallCNN), else the last linear layer (MONAI's ResNet `fc`)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the network has no linear head to keep trainable")
    return linears[-1]


def freeze(model: nn.Module, part: str) -> nn.Module:
    """Keep `part` at its current (e.g. pretrained or global) weights while training: "stem" (the first block),
    "encoder" (everything but the head: a linear model on fixed features), or "none". Returns `model`."""
    if part not in FREEZE_CHOICES:
        raise ValueError(f"freeze must be one of {list(FREEZE_CHOICES)}, got {part!r}")
    for p in model.parameters():
        p.requires_grad_(True)
    if part == "stem":
        stem = getattr(model, "stem", None)
        if not isinstance(stem, nn.Module):
            raise ValueError("this network has no stem to freeze; use freeze=encoder or none")
        for p in stem.parameters():
            p.requires_grad_(False)
    elif part == "encoder":
        keep = {id(p) for p in head_of(model).parameters()}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    return model


def frozen_part(part: str, unfreeze_after: int, server_round: int) -> str:
    """What stays frozen in `server_round`: `part` up to round `unfreeze_after` (0: every round), then nothing."""
    return part if unfreeze_after == 0 or server_round <= unfreeze_after else "none"
