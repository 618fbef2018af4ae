"""What a saved model needs to be used again: its network, classes, training image size, image channels and
spatial dims (2 images, 3 volumes).

A model file holds tensors only (it is read with ``torch.load(weights_only=True)``); the card beside it
(`final_model.json` for `final_model.pt`) is plain JSON, so scoring or auditing a model never guesses the size
its images were trained at."""

from __future__ import annotations

import json
from pathlib import Path


def card_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def write_card(model_path: str | Path, arch: str, num_classes: int, image_size: int, detector: bool = False,
               in_channels: int = 1, dims: int = 2, volume_window: str = "none", volume_spacing: float = 0.0) -> Path:
    """``detector``: the file holds a LesionDetector (the classifier under "classifier.", its box head under
    "head."), not the bare network. ``in_channels``: 3 for a network of RGB images (written only then: a card
    without it is a grey model's). ``dims``: 3 for a network of volumes, ``image_size`` then the side of its
    cubic grid (written only then: a card without it is a 2-D model's), with how its studies were read
    (``volume_window``, ``volume_spacing``: the run config's), so that scoring reads new studies the same way."""
    path = card_path(model_path)
    card = {"model": arch, "num_classes": int(num_classes), "image_size": int(image_size)}
    extra = ({"detector": True} if detector else {}) | ({"in_channels": int(in_channels)} if in_channels != 1 else {})
    if dims != 2:
        extra |= {"dims": int(dims), "volume_window": str(volume_window), "volume_spacing": float(volume_spacing)}
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
        if "dims" in card:  # a volume model's; read `card.get("dims", 2)`
            out["dims"] = int(card["dims"])
            if out["dims"] not in (2, 3):
                raise ValueError(f"dims must be 2 or 3, got {out['dims']}")
            out["volume_window"] = str(card.get("volume_window", "none"))
            out["volume_spacing"] = float(card.get("volume_spacing", 0.0))
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


def state_dims(state: dict) -> int | None:
    """2 or 3: the spatial dims of the network whose state dict this is, from the rank of its convolution weights
    (4-D: images, 5-D: volumes; norms and biases are 1-D, linear layers 2-D); None when it has no convolution."""
    ranks = {t.dim() for t in state.values() if t.dim() >= 4}
    if len(ranks) > 1:
        raise ValueError(f"the state dict mixes convolution weights of ranks {sorted(ranks)} (2-D and 3-D)")
    return ranks.pop() - 2 if ranks else None


def model_dims(path: str | Path, state: dict, card: dict | None) -> int:
    """The spatial dims to build the network of the model file `path` with: its card's, else its weights', else 2.
    A card that contradicts the weights raises ValueError naming the file."""
    weights = state_dims(state)
    if card is not None and "dims" in card:
        if weights is not None and weights != card["dims"]:
            raise ValueError(f"model file {path}: its model card says dims = {card['dims']} but its convolution "
                             f"weights are {weights}-D")
        return int(card["dims"])
    return weights or 2
