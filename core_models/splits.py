"""Patient-level train/validation/test splits and the leakage guard.

Images of one patient are strongly correlated; if a patient sits in both train and
test, test metrics are inflated. Splits are therefore drawn over patients, each from its own id and the seed
(so one patient never moves another), and checked before use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

SPLIT_NAMES = ("train", "val", "test")


class LeakageError(ValueError):
    """A patient appears in more than one partition."""

    def __init__(self, patients: dict[str, list[str]]):
        self.patients = patients
        shown = ", ".join(f"{pid} ({'/'.join(parts)})" for pid, parts in list(patients.items())[:20])
        more = f" and {len(patients) - 20} more" if len(patients) > 20 else ""
        super().__init__(
            f"patient-level leakage: {len(patients)} patient(s) appear in more than one "
            f"partition: {shown}{more}"
        )


def check_no_leakage(frame: pd.DataFrame, split_column: str = "split") -> None:
    """Raise LeakageError naming every patient found in two or more partitions."""
    parts = frame.groupby(frame["patient_id"].astype(str))[split_column].unique()
    leaky = {pid: sorted(map(str, s)) for pid, s in parts.items() if len(s) > 1}
    if leaky:
        raise LeakageError(leaky)


def patient_split(
    frame: pd.DataFrame,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> pd.Series:
    """Assign each row a split name so that every patient lands in exactly one split.

    Each patient's split is a function of the seed and its own id alone (a hash of both, cut at the fractions),
    never of the other patients: adding or removing one patient moves no one else between splits. A statistic
    released from one split then changes by one patient's records when a patient joins or leaves (the sensitivity
    its noise is sized for), and a hospital's test split stays the same as its data grow. Split sizes follow the
    fractions in expectation (not stratified by label: a per-label shuffle would let one patient reorder
    everyone). Same ids + seed -> same split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = frame["patient_id"].astype(str)
    cut_train, cut_val = fractions[0], fractions[0] + fractions[1]

    def split_of(pid: str) -> str:
        digest = hashlib.sha256(f"equifed-split\0{int(seed)}\0{pid}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        return "train" if u < cut_train else "val" if u < cut_val or fractions[2] == 0 else "test"

    assignment = {pid: split_of(pid) for pid in ids.unique()}
    return ids.map(assignment).rename("split")


def save_split(frame: pd.DataFrame, path: str | Path, split_column: str = "split") -> None:
    """Write the patient -> split table so the split can be audited and reused."""
    check_no_leakage(frame, split_column)
    table = frame[["patient_id", split_column]].drop_duplicates().sort_values("patient_id")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)


def load_split(frame: pd.DataFrame, path: str | Path) -> pd.Series:
    """Apply a saved patient -> split table; patients missing from it are an error."""
    table = pd.read_csv(path, dtype={"patient_id": str})
    check_no_leakage(table)
    mapping = dict(zip(table["patient_id"], table["split"]))
    split = frame["patient_id"].astype(str).map(mapping)
    missing = sorted(frame.loc[split.isna(), "patient_id"].astype(str).unique())
    if missing:
        raise ValueError(f"{len(missing)} patient(s) not in split file {path}: {missing[:20]}")
    return split.rename("split")


def assign_splits(
    frame: pd.DataFrame,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> pd.Series:
    """Use the manifest's own `split` column when present (checked), else draw one."""
    if "split" in frame.columns and frame["split"].notna().all():
        unknown = sorted(set(frame["split"].astype(str)) - set(SPLIT_NAMES))
        if unknown:
            raise ValueError(f"unknown split names in manifest: {unknown}; expected {SPLIT_NAMES}")
        check_no_leakage(frame)
        return frame["split"].astype(str)
    return patient_split(frame, fractions, seed)
