"""Threat model: an honest-but-curious server names the columns and levels of a statistics request. If a value the
layout does not know (or a column the site lacks) made the site's producer raise, the exception's type would reach
the server: one exact bit per query ("does any patient here have level X?"). The producers must instead put such
rows in an "other"/missing cell (fairness audit) or exclude them by a fixed row rule (penalty, shift), log it
locally, and reply with vectors whose shape depends on the request only. Fast: no Flower, no training."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.shift_stats import release_shift, request_settings
from core_models.config import app_defaults, run_config_of
from core_models.label_shift import N_BINS
from client.statistics import Releaser
from fairness import mitigation
from fairness.federated import (
    CellLayout,
    effects_from_statistics,
    known_cells,
    layout_for,
    release_statistics,
    rows_in_other_cells,
    site_statistics,
    stats_from_record,
    sum_statistics,
)

N = 120
AGE_EDGES = (40.0, 55.0, 70.0)


def clean_frame(seed: int, n: int = N) -> pd.DataFrame:
    """A site's rows in the synthetic spec's columns, every value one of the declared levels."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"group": rng.integers(0, 2, n), "scanner_legacy": rng.integers(0, 2, n),
                         "label": rng.integers(0, 2, n), "age": rng.uniform(20, 90, n).round(1),
                         "score": rng.uniform(0, 1, n)})


def dirty_frame(seed: int) -> pd.DataFrame:
    """The same kind of site with values the layout does not declare, as text (manifests arrive as text)."""
    f = clean_frame(seed).astype(object)
    f.loc[0:4, "group"] = 2  # a third group
    f.loc[5:6, "group"] = None
    f.loc[7:9, "scanner_legacy"] = "GE-unknown"  # a level nobody declared
    f.loc[10, "scanner_legacy"] = 5
    f.loc[11:12, "label"] = 7
    f.loc[13:15, "age"] = np.nan
    f.loc[16, "age"] = "n/a"
    f.loc[17, "score"] = np.nan  # e.g. a crafted model that gives NaN on some images
    return f


def age_bin(v: float) -> int:
    """By hand: bins (-inf, 40], (40, 55], (55, 70], (70, inf)."""
    return sum(v > e for e in AGE_EDGES)


def hand_cells(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Counts and score sums over the declared grid A x S x D x C-bin (2, 2, 2, 4): the pre-change layout."""
    n, t = np.zeros((2, 2, 2, 4)), np.zeros((2, 2, 2, 4))
    for r in frame.itertuples():
        k = (int(r.group), int(r.scanner_legacy), int(r.label), age_bin(float(r.age)))
        n[k] += 1
        t[k] += r.score
    return n, t


def structure(record: dict) -> dict:
    return {k: (len(v) if isinstance(v, list) else type(v).__name__) for k, v in record.items()}


@pytest.fixture(scope="module")
def layout() -> CellLayout:
    return layout_for(run_config_of({"stats-fairness-graph": "synthetic", "stats-fairness-bins": "C:40|55|70"}).audit)


def release(frame: pd.DataFrame, layout: CellLayout, name: str) -> dict:
    return release_statistics(site_statistics(frame, layout, name), Releaser(ledger=None, noise_multiplier=0))


def test_audit_cells_unknown_levels_missing_column_and_nan_never_raise(layout, caplog):
    clean, dirty = clean_frame(1), dirty_frame(2)
    no_scanner = clean_frame(3).drop(columns="scanner_legacy")
    with caplog.at_level(logging.WARNING, logger="fairness.federated"):
        replies = {name: release(f, layout, name) for name, f in
                   (("clean", clean), ("dirty", dirty), ("no_scanner", no_scanner))}
    # the reply's structure is the request's: same keys, same lengths whatever the data
    shapes = {name: structure(r) for name, r in replies.items()}
    assert shapes["clean"] == shapes["dirty"] == shapes["no_scanner"]
    assert layout.shape == (3, 3, 3, 5) and shapes["clean"]["cells_n"] == 135 and shapes["clean"]["hist"] == 80
    # noted in the site's local log, never raised
    log = caplog.text
    assert "column 'scanner_legacy' is not in this site's table" in log and "site no_scanner" in log
    assert "4 of 120 rows of 'scanner_legacy'" in log
    assert "7 of 120 rows of 'group'" in log and "2 of 120 rows of 'label'" in log and "4 of 120 rows of 'age'" in log
    assert "1 rows have no finite score" in log

    # the clean site: its declared cells are exactly the pre-change layout's, by hand; the extra cells are empty
    n, t = hand_cells(clean)
    got = stats_from_record(replies["clean"], layout, "clean")
    assert np.array_equal(known_cells(layout, got.n), n) and np.allclose(known_cells(layout, got.score), t)
    assert got.n.sum() == N and rows_in_other_cells(got) == 0
    assert np.allclose(known_cells(layout, got.score_sq), hand_cells(clean.assign(score=clean.score ** 2))[1])
    hist = np.zeros((2, 2, 20))
    for r in clean.itertuples():
        hist[int(r.group), int(r.label), min(max(int(np.ceil(r.score * 20)) - 1, 0), 19)] += 1
    assert np.array_equal(got.hist, hist)

    # the dirty site: rows 0..17 each hold one unknown value, so they are all in extra cells; the rest as by hand
    d = stats_from_record(replies["dirty"], layout, "dirty")
    rest = dirty.iloc[18:]
    assert d.n.sum() == N and rows_in_other_cells(d) == 18
    assert np.array_equal(known_cells(layout, d.n), hand_cells(rest)[0])
    cube = d.n
    assert cube[2].sum() == 5 + 2 + 1  # A: group 2, missing group, the NaN score
    assert cube[:, 2].sum() == 4 and cube[:, :, 2].sum() == 2 and cube[:, :, :, 4].sum() == 4
    assert d.score[2].sum() == pytest.approx(float(dirty.loc[0:6, "score"].sum()))  # the NaN score counts 0
    assert d.hist.sum() == N - 7 - 1 - 2  # unknown group, the NaN score and the unknown labels are not binned

    # a column the site lacks: every row in S's extra cell, nothing in the estimated grid
    m = stats_from_record(replies["no_scanner"], layout, "no_scanner")
    assert m.n[:, 2].sum() == N and known_cells(layout, m.n).sum() == 0


def test_server_reads_the_extra_cells_out_of_the_estimate(layout):
    """Summed with a site holding unknown values, the estimate equals the one on the known rows alone."""
    clean, dirty = clean_frame(4, 400), dirty_frame(5)
    both = sum_statistics([site_statistics(clean, layout), site_statistics(dirty, layout)])
    known = sum_statistics([site_statistics(clean, layout), site_statistics(dirty.iloc[18:].astype(
        {"group": int, "scanner_legacy": int, "label": int, "age": float, "score": float}), layout)])
    a = effects_from_statistics(both, n_boot=5, seed=0)
    b = effects_from_statistics(known, n_boot=5, seed=0)
    assert a.n == b.n == {"a0": a.n["a0"], "a1": a.n["a1"], "total": 400 + N - 18}
    for effect in ("impermissible", "total"):
        assert a.estimate(effect) == pytest.approx(b.estimate(effect), abs=1e-12)


def test_declared_other_level_is_the_catch_all():
    spec = layout_for(run_config_of({}).audit).spec
    lay = CellLayout.from_config(spec, run_config_of({"stats-fairness-levels": "S:0|1|other",
                                                      "stats-fairness-bins": "C:50"}).audit)
    s = lay.factors[0]
    assert s.levels == (0, 1, "other") and s.n_cells == 3 and s.other_code == 2 and s.n_known == 3
    codes = s.codes(pd.Series([0, "1", 1.0, "Other", "other", 9, None, "x"]))
    assert codes.tolist() == [0, 1, 1, 2, 2, 2, 2, 2]


def meta_frame(seed: int, n: int = N) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = pd.DataFrame({"group": rng.integers(0, 2, n), "scanner_legacy": rng.integers(0, 2, n),
                      "age": rng.uniform(20, 90, n)})
    return f, rng.integers(0, 2, n), rng.uniform(0, 1, n)


def hand_strata(frame: pd.DataFrame, y: np.ndarray, scores: np.ndarray, edges=(), n_s: int = 2):
    """Counts and sums of (A, stratum = (S * n_c + C-bin) * 2 + D), by hand."""
    n_c = len(edges) + 1
    counts, sums = np.zeros((2, 2 * n_s * n_c)), np.zeros((2, 2 * n_s * n_c))
    for i, r in enumerate(frame.itertuples()):
        cb = sum(float(r.age) >= e for e in edges)  # cell_index bins with side="right"
        k = (int(r.scanner_legacy) * n_c + cb) * 2 + int(y[i])
        counts[int(r.group), k] += 1
        sums[int(r.group), k] += scores[i]
    return counts.ravel(), sums.ravel()


@pytest.mark.parametrize("edges", [(), (45.0, 65.0)])
def test_penalty_release_vectors_exclude_unknown_rows_never_raise(edges, caplog):
    clean, y_clean, s_clean = meta_frame(6)
    dirty, y_dirty, s_dirty = meta_frame(7)
    dirty = dirty.astype(object)
    dirty.loc[0:2, "group"] = 2  # neither the reference nor the compared level
    dirty.loc[3, "group"] = np.nan
    dirty.loc[4:5, "scanner_legacy"] = 5  # outside 0..n_s-1
    dirty.loc[6, "scanner_legacy"] = "unknown"
    dirty.loc[7, "scanner_legacy"] = 0.5
    dirty.loc[8, "age"] = np.nan
    y_dirty = y_dirty.copy()
    y_dirty[9] = 3  # a label outside 0/1
    s_dirty = s_dirty.copy()
    s_dirty[10] = np.nan  # a non-finite score: counted, its sum 0
    cov = "age" if edges else ""
    meta_c = mitigation.meta_array(clean, "group", "scanner_legacy", cov, 0, compared=1)
    meta_d = mitigation.meta_array(dirty, "group", "scanner_legacy", cov, 0, compared=1)
    with caplog.at_level(logging.WARNING, logger="fairness.mitigation"):
        meta_m = mitigation.meta_array(clean.drop(columns="group"), "group", "scanner_legacy", cov, 0)
    assert "column 'group' is not in this site's table" in caplog.text
    got = {name: mitigation.site_release_vectors(m, s, y, edges, 2)
           for name, m, s, y in (("clean", meta_c, s_clean, y_clean), ("dirty", meta_d, s_dirty, y_dirty),
                                 ("missing", meta_m, s_clean, y_clean))}
    n_strata = 2 * 2 * (len(edges) + 1)
    assert {name: tuple(len(v) for v in vs) for name, vs in got.items()} == {
        name: (2 * n_strata, 2 * n_strata) for name in got}
    # the clean site: counts and sums by hand (unchanged rule for known rows)
    counts, sums = hand_strata(clean, y_clean, s_clean, edges)
    assert np.array_equal(got["clean"][0], counts) and np.allclose(got["clean"][1], sums)
    # the dirty site: the excluded rows (0..9; row 8 only when C is binned) are in neither vector
    gone = list(range(8)) + ([8] if edges else []) + [9]
    keep = np.setdiff1d(np.arange(N), gone)
    rest = dirty.iloc[keep].astype({"group": int, "scanner_legacy": int, "age": float})
    exp_counts, exp_sums = hand_strata(rest, y_dirty[keep], np.nan_to_num(s_dirty[keep]), edges)
    assert np.array_equal(got["dirty"][0], exp_counts) and np.allclose(got["dirty"][1], exp_sums)
    assert got["missing"][0].sum() == 0
    valid = mitigation.valid_rows(meta_d, y_dirty, edges, 2)
    assert np.flatnonzero(~valid).tolist() == gone
    assert (mitigation.stratum_index(meta_d, y_dirty, edges, 2)[[4, 5, 6, 7, 9]] == -1).all()
    # the consortium's strata and the training-time hooks take such rows without an error
    cons = mitigation.consortium_strata([got["clean"][0], got["dirty"][0]], [got["clean"][1], got["dirty"][1]],
                                        edges, 2)
    assert len(cons.w) == n_strata
    h = cons.weights.h(meta_d[:, 0], meta_d[:, 1], meta_d[:, 2])
    assert np.isfinite(h).all() and (h[gone[:-1]] == 0).all()
    offset = mitigation.MediatorOffset(np.array([0.0, 1.0]))
    logits = torch.zeros(N, 2)
    term = offset(logits, torch.as_tensor(np.where(valid, y_dirty, 0)), torch.as_tensor(meta_d, dtype=torch.float32))
    assert torch.isfinite(term)
    x = np.zeros((N, 1, 4, 4), np.float32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    pen = mitigation.StratifiedPathPenalty.for_site(model, x, meta_d, y_dirty, cons, lam=1.0, per_cell=2)
    assert sum(len(m) for m in pen._members) == valid.sum()


def test_meta_array_reads_levels_as_the_audit_does():
    f = pd.DataFrame({"group": ["0", "1", 1.0, "2", None, ""], "scanner_legacy": ["1", 0, "x", 1, 1, 0]})
    m = mitigation.meta_array(f, "group", "scanner_legacy", "", 0, compared=1)
    assert np.array_equal(m[:, 0], [0, 1, 1, np.nan, np.nan, np.nan], equal_nan=True)
    assert np.array_equal(m[:, 1], [1, 0, np.nan, 1, 1, 0], equal_nan=True)
    anything_else = mitigation.meta_array(f, "group", "scanner_legacy", "", 0)  # compared not given: any value
    assert np.array_equal(anything_else[:, 0], [0, 1, 1, 1, np.nan, np.nan], equal_nan=True)


def test_shift_statistics_labels_outside_the_classes_never_raise(caplog):
    rng = np.random.default_rng(8)
    k, n, d = 2, 60, 5
    labels = rng.integers(0, k, n)
    images = rng.random((n, 1, 4, 4))
    logits, feats = rng.normal(size=(n, k)), rng.normal(size=(n, d))
    stats_keys = {k: v for k, v in app_defaults(Path("pyproject.toml")).items() if k.startswith("stats-")}
    settings = request_settings({**stats_keys, "stats-rff-dim": 8, "seed": 0})
    clean = release_shift(Releaser(None, 0), k, labels, images, ["GE"] * n, labels, logits, feats, settings)
    bad_labels = labels.copy()
    bad_labels[:3] = [5, -1, 2]
    bad_images = images.copy()
    bad_images[4, 0, 0, 0] = np.nan
    bad_logits, bad_feats = logits.copy(), feats.copy()
    bad_logits[5], bad_feats[6] = np.nan, np.inf
    with caplog.at_level(logging.WARNING, logger="client.shift_stats"):
        dirty = release_shift(Releaser(None, 0), k, bad_labels, bad_images, [None] * n, bad_labels, bad_logits,
                              bad_feats, settings)
    assert "3 of 60 all records have a label outside 0..1" in caplog.text
    assert structure(clean) == structure(dirty)
    assert len(clean["label_counts"]) == k and len(clean["output_hist"]) == k * N_BINS
    assert clean["label_counts"] == np.bincount(labels, minlength=k).tolist()
    assert sum(dirty["label_counts"]) == n - 3 and sum(dirty["confusion"]) == n - 3
    assert np.isfinite(dirty["rff_sum"]).all() and sum(dirty["intensity_hist"]) == pytest.approx(n)
