"""**Post-processing** (:class:`ScoreShiftCorrection`): without retraining, shift the logit of each mediator level
within cells of the baseline covariates so that, in every cell, the mean score of the label strata of a labelled
calibration set no longer depends on S (S ⟂ D | A, C under the graph, so the within-cell difference is what the
scanner does to the score), using S from the DICOM metadata and C at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit


# --------------------------------------------------------------------------------------------- post-processing

def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _as_columns(c) -> np.ndarray:
    c = np.asarray(c, float)
    if not np.isfinite(c).all():
        raise ValueError("covariates c must be finite numbers (a missing value has no covariate cell)")
    return c[:, None] if c.ndim == 1 else c


def _covariate_edges(cols: np.ndarray, bins: int) -> list[np.ndarray]:
    """Inner cut points per column, about ``bins`` joint cells in all. A column with at most ``bins`` values keeps
    its levels (midpoints between them); the others share what is left as equal-count quantile cells."""
    uniq = [np.unique(col) for col in cols.T]
    coarse = [len(u) <= bins for u in uniq]
    n_fine = coarse.count(False)
    fixed = int(np.prod([len(u) for u, kept in zip(uniq, coarse) if kept]))
    per_fine = max(2, round((bins / fixed) ** (1 / n_fine))) if n_fine else 0
    return [(u[:-1] + u[1:]) / 2 if kept else np.unique(np.quantile(col, np.linspace(0, 1, per_fine + 1)[1:-1]))
            for u, kept, col in zip(uniq, coarse, cols.T)]


def _cell_codes(c: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    code = np.zeros(len(c), np.int64)
    for j, e in enumerate(edges):
        code = code * (len(e) + 1) + np.searchsorted(e, c[:, j], side="right")
    return code


def _stratified_shift(z, s, d, in_cell, lev, labels, p_d, min_rows: int, require_all: bool) -> float:
    """The root of the cell's score contrast of level ``lev`` vs S = 0, label strata mixed by ``p_d``. Strata with
    fewer than ``min_rows`` rows at either level make the cell unfitted (NaN) when ``require_all`` (matching only the
    populated label would miss the shift the other label needs: under compression it differs), else are dropped.
    NaN too when the contrast has no root."""
    base = [in_cell & (s == 0) & (d == y) for y in labels]
    rows = [in_cell & (s == lev) & (d == y) for y in labels]
    needed = [k for k in range(len(labels)) if p_d[k] > 0]
    keep = [k for k in needed if min(rows[k].sum(), base[k].sum()) >= min_rows]
    if not keep or (require_all and len(keep) < len(needed)):
        return np.nan
    w = p_d[keep] / p_d[keep].sum()
    target = sum(wk * expit(z[base[k]]).mean() for wk, k in zip(w, keep))
    level_z = [z[rows[k]] for k in keep]

    def gap(shift):
        return sum(wk * expit(zk - shift).mean() for wk, zk in zip(w, level_z)) - target

    lo, hi = -30.0, 30.0
    return brentq(gap, lo, hi) if gap(lo) * gap(hi) < 0 else np.nan


@dataclass
class ScoreShiftCorrection:
    """Post-processing: subtract a logit shift ``δ[s, cell]`` (``δ[0, ·] = 0``) chosen on labelled calibration
    data so that the impermissible effect is zero: in each cell of the covariates C, the mean corrected score of the
    (S = s, D = d) strata, mixed by the reference group's label rates p(d | a0, cell), equals that of S = 0. Then the
    path-specific contrast Σ_s [p(s | a1, c) − p(s | a0, c)] Σ_d p(d | a0, c) E[score | s, d, c] vanishes for every c,
    whatever the groups' scanner rates, while the A -> D contrast is left to the model. Stratum means pool both
    groups (the score depends on A only through S, D and C), so the rare level of the reference group borrows the
    other group's rows. S and C are read at inference; A and D are not needed.

    Why within C: when C drives both S and the score (age -> legacy scanner, age -> score), S = 1 rows of a
    stratum pooled over C are older, and a pooled shift also removes part of C's effect: it overshoots and can
    reverse the sign of the effect it is meant to zero. ``c`` (one column, or one per covariate) is cut into about
    ``bins`` cells: a covariate with at most ``bins`` values keeps its levels, the others get quantile cuts.

    Why scores and not mean logits: when S changes how visible the lesion is (blur, noise), the logits of S = 1
    images are compressed, not only shifted, and equal mean logits still leave unequal mean scores (the PSE); the
    root of the score contrast is the shift that makes the PSE zero (and equals the logit shift when S only adds
    a constant).

    ``delta[s]`` is the per-level shift averaged over the cells by the reference group's share (the only state when
    fitted without ``c``); a cell with a label stratum of fewer than ``min_rows`` rows at either level uses it (when
    no cell is that full, e.g. one small cell, empty strata are dropped instead). Save and restore the whole state
    with :meth:`to_dict` / :meth:`from_dict`."""

    delta: np.ndarray = field(default_factory=lambda: np.zeros(2))
    covariate_edges: list[np.ndarray] | None = None  # inner cut points per covariate column; None: no covariate
    cell_delta: np.ndarray | None = None  # (S levels, cells) shifts when fitted with ``c``
    bins: int = 20
    min_rows: int = 10

    def fit(self, scores, a, s, d, *, c=None) -> "ScoreShiftCorrection":
        z, a, s, d = _logit(scores), np.asarray(a), np.asarray(s).astype(int), np.asarray(d).astype(int)
        ref = a == a.min()  # a0 = the lowest code
        if c is None:
            self.covariate_edges, cells = None, np.zeros(len(z), np.int64)
        else:
            cols = _as_columns(c)
            self.covariate_edges = _covariate_edges(cols, self.bins)
            cells = _cell_codes(cols, self.covariate_edges)
        n_cells = int(np.prod([len(e) + 1 for e in self.covariate_edges])) if self.covariate_edges else 1
        labels = np.unique(d)
        pooled_p_d = np.array([(d[ref] == y).mean() for y in labels])
        p_d = []
        for k in range(n_cells):
            ref_d = d[ref & (cells == k)]
            p_d.append(np.array([(ref_d == y).mean() for y in labels]) if len(ref_d) >= self.min_rows else pooled_p_d)
        shifts = np.full((int(s.max()) + 1, n_cells), np.nan)
        shifts[0] = 0.0
        ref_share = np.bincount(cells[ref], minlength=n_cells).astype(float)
        delta = np.zeros(len(shifts))
        for lev in range(1, len(shifts)):
            for strict in (True, False):
                shifts[lev] = [_stratified_shift(z, s, d, cells == k, lev, labels, p_d[k],
                                                 self.min_rows if strict else 1, strict) for k in range(n_cells)]
                if np.isfinite(shifts[lev]).any():
                    break
            ok = np.isfinite(shifts[lev])
            if ok.any():
                delta[lev] = float(np.average(shifts[lev, ok], weights=ref_share[ok] if ref_share[ok].sum() else None))
            shifts[lev, ~ok] = delta[lev]
        self.delta = delta
        self.cell_delta = None if c is None else shifts
        return self

    def transform(self, scores, s, *, c=None) -> np.ndarray:
        s = np.asarray(s).astype(int)
        if self.covariate_edges is None:
            shift = np.asarray(self.delta, float)[s]
        elif c is None:
            raise ValueError("this correction was fitted within covariate cells: pass the covariates as c=")
        else:
            shift = np.asarray(self.cell_delta, float)[s, _cell_codes(_as_columns(c), self.covariate_edges)]
        return expit(_logit(scores) - shift)

    def to_dict(self) -> dict[str, Any]:
        """The fitted state as JSON-ready lists (what a site needs at inference)."""
        return {
            "delta": [float(v) for v in self.delta],
            "covariate_edges": None if self.covariate_edges is None else [
                [float(v) for v in e] for e in self.covariate_edges],
            "cell_delta": None if self.cell_delta is None else np.asarray(self.cell_delta, float).tolist(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "ScoreShiftCorrection":
        edges = state.get("covariate_edges")
        cells = state.get("cell_delta")
        return cls(delta=np.asarray(state["delta"], float),
                   covariate_edges=None if edges is None else [np.asarray(e, float) for e in edges],
                   cell_delta=None if cells is None else np.asarray(cells, float))
