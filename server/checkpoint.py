"""Round checkpoints: enough to resume a run after the server process dies.

A checkpoint holds only what `torch.load(weights_only=True)` reads without running code from
the file: tensors, numbers and strings. The model is a state dict of tensors, the strategy's
state (FedAdam's moments) is stored as tensors and handed back as numpy arrays, and the
per-round history is a JSON string (NaN and infinities round-trip). A file that is anything
else is refused with a `CheckpointError` naming it; nothing in it is executed.

It also keeps the run's best global model (`best_model.pt`, a plain state dict like `final_model.pt`):
`BestTracker` follows one metric round by round and counts the rounds without improvement (patience); its
state travels in the checkpoint's history, so a resume keeps the best-so-far.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core_models.protocol import NUM_EXAMPLES, VAL_AUROC, VAL_LOSS
from core_models.run_files import BEST_MODEL, CHECKPOINTS, LATEST_CHECKPOINT, round_file

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
    folder = Path(out_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "round": int(server_round),
        "model": {str(k): _tensor(v) for k, v in state_dict.items()},
        "strategy": {str(name): {str(k): _tensor(v) for k, v in part.items()} for name, part in strategy_state.items()},
        "history": json.dumps(history, default=_jsonable, allow_nan=True),
    }
    path = round_file(folder, server_round, ".pt")
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    latest_tmp = folder / ".latest.pt.tmp"
    torch.save(payload, latest_tmp)
    os.replace(latest_tmp, folder / LATEST_CHECKPOINT)
    return path


def refusal_reason(err: Exception) -> str:
    """The line of a weights_only refusal that says what the file wanted (not torch's advice
    to retry with weights_only=False, which would run the file's code)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "GLOBAL" in line:
            return line
    if isinstance(err, pickle.UnpicklingError) or not lines:
        return lines[0] if lines else f"unreadable: {type(err).__name__}"
    return f"unreadable: {type(err).__name__} {lines[0]}"


def _is_tensor_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file as {"round", "model", "strategy" (numpy arrays), "history" (dict)}."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails in many ways (KeyError, EOFError, ...); none runs code
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
    path = Path(out_dir) / CHECKPOINTS / LATEST_CHECKPOINT
    if not path.exists():
        return None
    return read_checkpoint(path)



# --- the best global model ---------------------------------------------------------------------------------

BEST_BY = (VAL_LOSS, VAL_AUROC, "holdout-loss", "holdout-auroc", "none")  # the sites' val-* metrics, or the holdout's


def choose_best_metric(best_by: str, dp: bool, has_holdout: bool) -> tuple[str, str]:
    """(the metric the run keeps its best model by, why it is not the one asked for: "" when it is).

    The sites' val-* metrics are withheld (NaN) under DP-SGD: unnoised releases. A DP run then selects on the
    holdout, or keeps no best model when it has none."""
    if best_by not in BEST_BY:
        raise ValueError(f"best-by = {best_by!r}: choose one of {', '.join(BEST_BY)}")
    if best_by.startswith("holdout-") and not has_holdout:
        raise ValueError(f"best-by = {best_by!r} needs a holdout set (holdout-path); use val-loss or val-auroc")
    if best_by.startswith("val-") and dp:
        if has_holdout:
            fallback = best_by.replace("val-", "holdout-")
            return fallback, (f"dp = true: the sites withhold their validation metrics (unnoised releases), so the "
                              f"best model is chosen by {fallback} instead of {best_by}")
        return "none", ("dp = true: the sites withhold their validation metrics (unnoised releases) and the run "
                        "has no holdout-path, so no best model is kept")
    return best_by, ""


def pooled(rows: list[dict], key: str) -> float:
    """The sites' `key` averaged with weights num-examples (the sites report no validation count; their
    validation split is a fixed share of their data); sites whose value is withheld (NaN) are left out.
    NaN when no site has a value."""
    pairs = [(float(r[key]), float(r.get(NUM_EXAMPLES, 1.0))) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    if not pairs:
        return math.nan
    weights = [w if math.isfinite(w) and w >= 1.0 else 1.0 for _, w in pairs]
    return sum(v * w for (v, _), w in zip(pairs, weights)) / sum(weights)


@dataclass
class BestTracker:
    """The best round by one metric (loss: lower is better, AUROC: higher) and the rounds since it.

    A round improves only on a strictly better value (a tie keeps the earlier round). A round without a value
    (NaN) neither improves nor counts against patience. `patience` > 0: stop once that many rounds with a value
    have passed without improvement."""

    metric: str
    patience: int = 0
    best_round: int | None = None
    best_value: float | None = None
    stale: int = 0  # rounds with a value since best_round, none of them better

    def __post_init__(self) -> None:
        if self.metric not in BEST_BY:
            raise ValueError(f"best-by = {self.metric!r}: choose one of {', '.join(BEST_BY)}")
        try:
            whole = float(self.patience).is_integer() and float(self.patience) >= 0
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise ValueError(f"patience = {self.patience!r}: a whole number of rounds, 0 = off")
        self.patience = int(self.patience)

    @property
    def column(self) -> str:
        """The metric's column in metrics.csv (val-loss -> val_loss)."""
        return self.metric.replace("-", "_")

    def update(self, server_round: int, value: float | None) -> bool:
        """Record a round's value; True when it is the new best."""
        if self.metric == "none" or value is None or not math.isfinite(float(value)):
            return False
        value = float(value)
        if self.best_value is None or (value > self.best_value if self.metric.endswith("auroc")
                                       else value < self.best_value):
            self.best_round, self.best_value, self.stale = int(server_round), value, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict, patience: int) -> "BestTracker":
        """The tracker of a resumed run, with this run's patience."""
        return cls(metric=str(saved["metric"]), patience=patience,
                   best_round=None if saved.get("best_round") is None else int(saved["best_round"]),
                   best_value=None if saved.get("best_value") is None else float(saved["best_value"]),
                   stale=int(saved.get("stale", 0)))


def save_model(path: Path, state_dict: dict) -> None:
    """A model file as final_model.pt is: a plain state dict of tensors (atomic rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({str(k): _tensor(v) for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


def restore_best_model(out_dir: Path, best_round: int) -> None:
    """On resume: rewrite best_model.pt from the best round's checkpoint (the server may have died after writing
    best_model.pt for a round that is now run again). Without that checkpoint, the best_model.pt already there
    is kept; with neither, a CheckpointError says so."""
    out_dir = Path(out_dir)
    path = round_file(out_dir / CHECKPOINTS, best_round, ".pt")
    if path.exists():
        save_model(out_dir / BEST_MODEL, read_checkpoint(path)["model"])
    elif not (out_dir / BEST_MODEL).exists():
        raise CheckpointError(f"the checkpoint names round {best_round} the best, but neither {path} nor "
                              f"{out_dir / BEST_MODEL} exists; restore one of them, or resume with best-by = none")
