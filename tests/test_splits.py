"""Patient-level splits: deterministic, stratified, and never leaky."""

import pandas as pd
import pytest

from core_models.splits import LeakageError, assign_splits, check_no_leakage, load_split, patient_split, save_split


def _frame(n_patients=200, images_per_patient=3, positive_every=4):
    rows = []
    for p in range(n_patients):
        for i in range(images_per_patient):
            rows.append({"patient_id": f"P{p:04d}", "image_path": f"{p}_{i}.dcm", "label": int(p % positive_every == 0)})
    return pd.DataFrame(rows)


def test_split_is_patient_level_and_deterministic():
    frame = _frame()
    a = patient_split(frame, seed=3)
    b = patient_split(frame, seed=3)
    c = patient_split(frame, seed=4)
    assert a.equals(b)
    assert not a.equals(c)
    # every patient's images share one split
    per_patient = frame.assign(split=a).groupby("patient_id")["split"].nunique()
    assert per_patient.max() == 1
    check_no_leakage(frame.assign(split=a))


def test_one_patient_never_moves_another_and_sizes_follow_the_fractions():
    """A split released from must change by one patient's records when one patient joins or leaves: no other
    patient may change split (a per-label shuffle moved 41 of 199 when one left)."""
    frame = _frame(n_patients=400)
    split = patient_split(frame, fractions=(0.6, 0.2, 0.2), seed=0)
    per_patient = dict(zip(frame["patient_id"].astype(str), split))
    for leaving in frame["patient_id"].astype(str).unique()[:25]:
        rest = frame[frame["patient_id"].astype(str) != leaving]
        again = dict(zip(rest["patient_id"].astype(str), patient_split(rest, fractions=(0.6, 0.2, 0.2), seed=0)))
        assert all(again[p] == per_patient[p] for p in again), leaving
    sizes = pd.Series(per_patient).value_counts()
    # binomial around 240 / 80 / 80 (sd 9.8 / 8): within 4 sd
    assert abs(sizes["train"] - 240) < 40 and abs(sizes["val"] - 80) < 32 and abs(sizes["test"] - 80) < 32
    rates = frame.assign(split=split).drop_duplicates("patient_id").groupby("split")["label"].mean()
    assert all(abs(rates[name] - 0.25) < 0.1 for name in ("train", "val", "test")), rates


def test_leakage_guard_names_the_patients():
    frame = _frame(n_patients=10)
    frame["split"] = "train"
    frame.loc[frame.index[1], "split"] = "test"  # P0000's second image
    frame.loc[frame.index[-1], "split"] = "val"  # P0009's last image
    with pytest.raises(LeakageError) as err:
        check_no_leakage(frame)
    assert set(err.value.patients) == {"P0000", "P0009"}
    assert "P0000" in str(err.value) and "P0009" in str(err.value)
    with pytest.raises(LeakageError):
        assign_splits(frame)


def test_saved_split_round_trips(tmp_path):
    frame = _frame(n_patients=30)
    frame["split"] = patient_split(frame, seed=1)
    save_split(frame, tmp_path / "split.csv")
    again = load_split(frame.drop(columns="split"), tmp_path / "split.csv")
    assert (again.to_numpy() == frame["split"].to_numpy()).all()
    extra = pd.concat([frame, pd.DataFrame([{"patient_id": "NEW1", "image_path": "x", "label": 0}])])
    with pytest.raises(ValueError, match="NEW1"):
        load_split(extra, tmp_path / "split.csv")


def test_bad_fractions_rejected():
    with pytest.raises(ValueError, match="fractions"):
        patient_split(_frame(), fractions=(0.5, 0.2, 0.2))
