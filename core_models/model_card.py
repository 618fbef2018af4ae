"""What a saved model needs to be used again: its network, classes and training image size.

A model file holds tensors only (it is read with ``torch.load(weights_only=True)``); the card beside it
(`final_model.json` for `final_model.pt`) is plain JSON, so scoring or auditing a model never guesses the size
its images were trained at."""

from __future__ import annotations

import json
from pathlib import Path


def card_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def write_card(model_path: str | Path, arch: str, num_classes: int, image_size: int) -> Path:
    path = card_path(model_path)
    path.write_text(json.dumps({"model": arch, "num_classes": int(num_classes), "image_size": int(image_size)},
                               indent=1) + "\n")
    return path


def read_card(model_path: str | Path) -> dict | None:
    """The card beside a model file, or None when there is none (e.g. weights saved by hand)."""
    path = card_path(model_path)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
        return {"model": str(card["model"]), "num_classes": int(card["num_classes"]),
                "image_size": int(card["image_size"])}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a model card ({type(err).__name__}: {err})") from None
