"""Round checkpoints: enough to resume a run after the server process dies."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(out_dir: Path, server_round: int, state_dict: dict, strategy_state: dict, history: dict) -> Path:
    """Write checkpoints/round_NNN.pt and point latest.pt at it (atomic rename)."""
    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"round": server_round, "model": state_dict, "strategy": strategy_state, "history": history}
    path = folder / f"round_{server_round:03d}.pt"
    tmp = folder / f".round_{server_round:03d}.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    latest_tmp = folder / ".latest.pt.tmp"
    torch.save(payload, latest_tmp)
    os.replace(latest_tmp, folder / "latest.pt")
    return path


def load_latest(out_dir: Path) -> dict | None:
    """The most recent checkpoint of a run folder, or None when there is none."""
    path = Path(out_dir) / "checkpoints" / "latest.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
