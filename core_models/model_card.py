"""What a saved model needs to be used again: its network, classes, training image size and image channels.

A model file holds tensors only (it is read with ``torch.load(weights_only=True)``); the card beside it
(`final_model.json` for `final_model.pt`) is plain JSON, so scoring or auditing a model never guesses the size
its images were trained at."""

from __future__ import annotations

import json
from pathlib import Path


def card_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def write_card(model_path: str | Path, arch: str, num_classes: int, image_size: int, detector: bool = False,
               in_channels: int = 1) -> Path:
    """``detector``: the file holds a LesionDetector (the classifier under "classifier.", its box head under
    "head."), not the bare network. ``in_channels``: 3 for a network of RGB images (written only then: a card
    without it is a grey model's)."""
    path = card_path(model_path)
    card = {"model": arch, "num_classes": int(num_classes), "image_size": int(image_size)}
    extra = ({"detector": True} if detector else {}) | ({"in_channels": int(in_channels)} if in_channels != 1 else {})
    path.write_text(json.dumps({**card, **extra}, indent=1) + "\n")
    return path


def read_card(model_path: str | Path) -> dict | None:
    """The card beside a model file, or None when there is none (e.g. weights saved by hand)."""
    path = card_path(model_path)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
        out = {"model": str(card["model"]), "num_classes": int(card["num_classes"]),
               "image_size": int(card["image_size"]), "detector": bool(card.get("detector", False))}
        if "in_channels" in card:  # an RGB model's; read `card.get("in_channels", 1)`
            out["in_channels"] = int(card["in_channels"])
        return out
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a model card ({type(err).__name__}: {err})") from None


def load_state_dict_file(path: str | Path) -> dict:
    """The state dict in a model file: `final_model.pt` (a state dict) or a round checkpoint (which holds it
    under "model"). Read with ``torch.load(weights_only=True)``, so nothing in the file is executed; a file that
    needs more than tensors, numbers and strings to load, or that holds no mapping of names to tensors, raises
    ValueError naming the file. Every command that reads weights it did not write goes through here."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln), lines[0] if lines else "")
        raise ValueError(f"model file {path} refused: it is not a plain state dict of tensors (loading it would "
                         f"need more than tensors, numbers and strings, and it is not loaded in a way that could "
                         f"run code from it; {why or type(err).__name__})") from None
    for wrapper in ("model", "state_dict"):  # a round checkpoint; a training script's checkpoint
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise ValueError(f"model file {path} holds no state dict (a mapping of parameter names to tensors)")
    return state
