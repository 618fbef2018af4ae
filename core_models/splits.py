"""Patient-level train/validation/test splits and the leakage guard.

Images of one patient are strongly correlated; if a patient sits in both train and
test, test metrics are inflated. Splits are therefore drawn over patients, stratified
by each patient's label, deterministic from a seed, and checked before use.
"""

from __future__ import annotations

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

    Patients are stratified by their label (the maximum label over their images, so a
    patient with any positive image counts as positive). Same frame + seed -> same split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    patient_label = frame.groupby(frame["patient_id"].astype(str))["label"].max().sort_index()
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(patient_label.unique()):
        patients = patient_label.index[patient_label == label].to_numpy()
        patients = patients[rng.permutation(len(patients))]
        n = len(patients)
        n_train = int(round(fractions[0] * n))
        n_val = int(round(fractions[1] * n))
        if fractions[2] == 0:
            n_val = n - n_train
        for i, pid in enumerate(patients):
            assignment[pid] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return frame["patient_id"].astype(str).map(assignment).rename("split")


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
