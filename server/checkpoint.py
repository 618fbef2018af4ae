"""Round checkpoints: enough to resume a run after the server process dies.

A checkpoint holds only what `torch.load(weights_only=True)` reads without running code from
the file: tensors, numbers and strings. The model is a state dict of tensors, the strategy's
state (FedAdam's moments) is stored as tensors and handed back as numpy arrays, and the
per-round history is a JSON string (NaN and infinities round-trip). A file that is anything
else is refused with a `CheckpointError` naming it; nothing in it is executed.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

FORMAT = 2  # 1: numpy arrays and dicts pickled (needed weights_only=False; no longer read)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it."""


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"a checkpoint's history cannot hold {type(value).__name__}")


def _tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.from_numpy(np.array(value, order="C", copy=True))  # keeps 0-d arrays 0-d


def save_checkpoint(out_dir: Path, server_round: int, state_dict: dict, strategy_state: dict, history: dict) -> Path:
    """Write checkpoints/round_NNN.pt and point latest.pt at it (atomic rename)."""
    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "round": int(server_round),
        "model": {str(k): _tensor(v) for k, v in state_dict.items()},
        "strategy": {str(name): {str(k): _tensor(v) for k, v in part.items()} for name, part in strategy_state.items()},
        "history": json.dumps(history, default=_jsonable, allow_nan=True),
    }
    path = folder / f"round_{server_round:03d}.pt"
    tmp = folder / f".round_{server_round:03d}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    latest_tmp = folder / ".latest.pt.tmp"
    torch.save(payload, latest_tmp)
    os.replace(latest_tmp, folder / "latest.pt")
    return path


def refusal_reason(err: Exception) -> str:
    """The line of a weights_only refusal that says what the file wanted (not torch's advice
    to retry with weights_only=False, which would run the file's code)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "GLOBAL" in line:
            return line
    return lines[0] if lines else type(err).__name__


def _is_tensor_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file as {"round", "model", "strategy" (numpy arrays), "history" (dict)}."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path} refused: it is not a plain checkpoint of tensors, numbers and "
                              f"strings, and it is not loaded in a way that could run code from it "
                              f"({refusal_reason(err)}). A checkpoint written by equifed before format {FORMAT} "
                              f"cannot be resumed; start a new run") from None
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT and isinstance(payload.get("round"), int)
            and _is_tensor_map(payload.get("model")) and isinstance(payload.get("strategy"), dict)
            and all(_is_tensor_map(v) for v in payload["strategy"].values())
            and isinstance(payload.get("history"), str)):
        raise CheckpointError(f"checkpoint {path} is not an equifed checkpoint (format {FORMAT}: round, model, "
                              f"strategy, history)")
    try:
        history = json.loads(payload["history"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: its history is not valid JSON ({err})") from None
    if not isinstance(history, dict):
        raise CheckpointError(f"checkpoint {path}: its history is not a JSON object")
    return {
        "round": payload["round"],
        "model": payload["model"],
        "strategy": {name: {k: v.numpy() for k, v in part.items()} for name, part in payload["strategy"].items()},
        "history": history,
    }


def load_latest(out_dir: Path) -> dict | None:
    """The most recent checkpoint of a run folder, or None when there is none."""
    path = Path(out_dir) / "checkpoints" / "latest.pt"
    if not path.exists():
        return None
    return read_checkpoint(path)

