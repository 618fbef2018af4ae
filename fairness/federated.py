"""The federated audit: the same causal fairness audit from per-site sufficient statistics.

Nothing per-record leaves a site. Each site computes, on its own rows (one per patient: the model's score on the
site's test split, next to the manifest columns of the graph spec):

| statistic          | what                                                                 | L2 sensitivity |
|--------------------|----------------------------------------------------------------------|----------------|
| ``cells_n``        | counts per cell of (A, mediators, label, coarse covariates)          | 1              |
| ``cells_score``    | sums of the score (clipped to [0, 1]) per cell                       | 1              |
| ``cells_score_sq`` | sums of the squared score per cell (the bootstrap's within-cell var.) | 1              |
| ``hist``           | counts per (A, label, score bin): B equal-width bins on [0, 1]       | 1              |

Adding or removing one patient changes one entry of each vector by at most 1 (the score is clipped to [0, 1]), so
each has L2 sensitivity 1. The cells are fixed before any data are seen (declared levels, fixed covariate bin
edges, fixed score bins), so every site's vectors line up and the server just adds them.

Why these suffice: the PSE estimators of :mod:`fairness.pse` already work on patterns of (A, mediators, label,
covariates) with counts and score sums, so with the covariates coarsened to the same bins **the federated point
estimates equal the pooled ones** (:func:`coarse_frame` gives the pooled table they equal). Bootstrap replicates
cannot resample rows here: a replicate draws the cell counts from the multinomial the row bootstrap implies, the
cells' score sums from a normal with the cell's mean and variance, and adds fresh Gaussian noise of the size each
site used (parametric bootstrap), so the CIs include the privacy noise. The group metrics come from the score
histograms through fairlearn's ``MetricFrame`` with the bin counts as sample weights (scores at the bin midpoints;
exact for counts, TPR/FPR/FNR and selection rate because the operating point is a bin edge; AUROC and calibration
are those of the binned scores).

**Values the layout does not know never raise** (the server names the columns and levels; an exception's type
would reach it, one exact bit per query such as "does any patient here have level X?"). The layout is checked
against the public run config and graph spec only (:meth:`CellLayout.from_config`, before data are seen). On the
data, every axis has one extra cell, last, that catches what the declared levels do not:

* A: the two compared levels, then "other" (a value that is neither, a missing value, or a row whose score is not
  finite: its score counts as 0 in the sums);
* a mediator, the label, a categorical covariate: the declared levels, then "other" (a value outside them, a
  missing value); unless a declared level reads ``other`` (case-insensitive), which is then the catch-all and an
  ordinary level of the estimate;
* a binned numeric covariate: the bins cover the real line, then "missing" (NaN or non-numeric);
* a column the site lacks: every row in that axis's extra cell, with a warning in the site's local log.

The reply's shape depends only on the request. Each row still lands in exactly one cell, so the sensitivities
are unchanged. The server leaves the extra cells out of the estimates (:func:`known_cells`): on data
without unknown values they are empty and the estimates are exactly those of the declared grid; the audit reports
their (noised) total as ``federated.rows_in_other_cells``. The histograms count only rows with a known A and label
(and a finite score): a rule on the row, never an error.

A release is any object with ``release(label, value, sensitivity)`` and ``release_counts(label, value,
sensitivity)`` returning lists and a ``released`` dict of noise stds (``client.statistics.Releaser``); this module
imports no Flower or client code.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_negative_rate,
    true_positive_rate,
)
from sklearn.metrics import roc_auc_score

from core_models.config import FairAuditConfig
from core_models.jsonable import jsonable
from fairness.audit import verdict
from fairness.graph import CausalSpec, GraphError, load_graph_spec
from fairness.group_metrics import GAP_METRICS, METRICS
from fairness.identification import identify
from fairness.results import AuditResult
from fairness.design import Design, EstimationError, Problem, Settings, Var
from fairness.gformula import smoothed_gformula
from fairness.pse import EffectTable, Fitted, effects_from_design
from fairness.replicates import Linearized

SENSITIVITY = {"cells_n": 1.0, "cells_score": 1.0, "cells_score_sq": 1.0, "hist": 1.0}
OTHER = "other"  # the extra cell's level name in reports

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- layout

def _norm(v: Any) -> str:
    """A level as text: 1, 1.0, "1" and True all read "1" (manifest columns arrive as text or numbers)."""
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v).strip()
    return str(int(f)) if math.isfinite(f) and f == int(f) else repr(f)


def _parse_level(text: str) -> Any:
    text = text.strip()
    try:
        f = float(text)
    except ValueError:
        return text
    return int(f) if f == int(f) else f


def parse_node_lists(text: str, what: str) -> dict[str, list[str]]:
    """``"C:40|55|70;S:0|1"`` -> {"C": ["40", "55", "70"], "S": ["0", "1"]}."""
    out: dict[str, list[str]] = {}
    for part in str(text or "").split(";"):
        if not part.strip():
            continue
        if ":" not in part:
            raise GraphError(f"{what}: expected 'node:v1|v2|...', got {part.strip()!r}")
        node, values = part.split(":", 1)
        vals = [v.strip() for v in values.split("|") if v.strip()]
        if not vals:
            raise GraphError(f"{what}: node {node.strip()!r} has no values")
        out[node.strip()] = vals
    return out


def _is_missing(v: Any) -> bool:
    """None, NaN, pandas' NA/NaT or blank text: a value that is not there."""
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, (float, np.floating)) and math.isnan(v)) or \
        (isinstance(v, str) and not v.strip())


@dataclass(frozen=True)
class Factor:
    """One axis of the cell grid after A: a mediator, the label, or a coarsened covariate. Its cells are the
    declared levels and, unless one of them is the catch-all (a level reading ``other``), one extra "other" cell
    last (for a binned covariate: the "missing" cell after the bins)."""

    node: str
    column: str
    role: str  # "mediator" | "label" | "covariate" | "sensitive"
    levels: tuple[Any, ...]  # the values, or for a binned covariate the bin codes 0..len(edges)
    edges: tuple[float, ...] | None = None  # binned numeric covariate: interior edges, bins (-inf, e0], (e0, e1], ...

    @property
    def catch_all(self) -> int | None:
        """Index of a declared level that reads "other" (it takes the unknown values), else None."""
        if self.edges is not None or self.role == "sensitive":
            return None
        return next((i for i, v in enumerate(self.levels) if _norm(v).lower() == OTHER), None)

    @property
    def n_cells(self) -> int:
        return len(self.levels) + (1 if self.catch_all is None else 0)

    @property
    def other_code(self) -> int:
        """The cell of a value the declared levels do not hold (and of a missing one)."""
        return len(self.levels) if self.catch_all is None else self.catch_all

    @property
    def n_known(self) -> int:
        """The cells the estimate uses: the declared levels (the catch-all included when it is declared)."""
        return len(self.levels)

    def codes(self, col: pd.Series) -> np.ndarray:
        """Cell code of each row, never an error: a value outside the levels (or missing, or for a binned
        covariate NaN / non-numeric) gets :attr:`other_code`."""
        if self.edges is not None:
            v = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
            out = np.searchsorted(np.asarray(self.edges), v, side="left").astype(np.int64)
            out[np.isnan(v)] = self.other_code
            return out
        index = {_norm(v): i for i, v in enumerate(self.levels)}
        return np.fromiter((self.other_code if _is_missing(v) else index.get(_norm(v), self.other_code)
                            for v in col.to_numpy(dtype=object)), dtype=np.int64, count=len(col))

    def unknown(self, col: pd.Series) -> int:
        """How many rows fall outside the declared levels (into the extra or the catch-all cell): for the
        site's local log only."""
        codes = self.codes(col)
        if self.catch_all is None:
            return int((codes == self.other_code).sum())
        index = {_norm(v) for v in self.levels}
        return int(sum(_is_missing(v) or _norm(v) not in index for v in col.to_numpy(dtype=object)))


@dataclass(frozen=True)
class CellLayout:
    """The cell grid every site uses: A (a0, a1) x factors, and B score bins for the histograms."""

    spec: CausalSpec
    a_levels: tuple[Any, Any]
    factors: tuple[Factor, ...]
    score_bins: int = 20

    @property
    def shape(self) -> tuple[int, ...]:
        """The released grid: A (a0, a1, other) x each factor's cells (declared levels + the extra cell)."""
        return (3, *(f.n_cells for f in self.factors))

    @property
    def known_shape(self) -> tuple[int, ...]:
        """The grid the estimates use: A (a0, a1) x each factor's declared levels."""
        return (2, *(f.n_known for f in self.factors))

    @property
    def sensitive_factor(self) -> Factor:
        return Factor(self.spec.sensitive, self.spec.column(self.spec.sensitive), "sensitive", self.a_levels)

    @property
    def label_factor(self) -> Factor | None:
        out = self.spec.outcome
        return next((f for f in self.factors if f.node == out), None)

    @classmethod
    def from_config(cls, spec: CausalSpec, audit: FairAuditConfig) -> "CellLayout":
        """Levels and bins from run config ``stats-fairness-levels`` / ``stats-fairness-bins`` /
        ``stats-fairness-score-bins`` (every categorical node not named has levels 0|1)."""
        levels = parse_node_lists(audit.levels, "stats-fairness-levels")
        bins = parse_node_lists(audit.bins, "stats-fairness-bins")
        unknown = sorted((set(levels) | set(bins)) - set(spec.nodes))
        if unknown:
            raise GraphError(f"stats-fairness-levels/bins name unknown node(s) {unknown} (nodes: {list(spec.nodes)})")
        a = spec.nodes[spec.sensitive]
        a_lv = [_parse_level(v) for v in levels.get(a.name, ["0", "1"])]
        if len(a_lv) != 2:
            raise GraphError(f"the federated audit compares two levels of '{a.name}'; declared {a_lv}")
        if a.reference is not None:
            if _norm(a.reference) not in {_norm(v) for v in a_lv}:
                raise GraphError(f"reference level {a.reference!r} of '{a.name}' is not among its levels {a_lv}")
            a0 = next(v for v in a_lv if _norm(v) == _norm(a.reference))
            a_lv = [a0, next(v for v in a_lv if v is not a0)]
        ident = identify(spec)
        factors = []
        for m in ident.mediators:
            role = "label" if m == spec.outcome else "mediator"
            lv = sorted((_parse_level(v) for v in levels.get(m, ["0", "1"])), key=lambda x: (str(type(x)), x))
            factors.append(Factor(m, spec.column(m), role, tuple(lv)))
        if spec.outcome is not None and spec.outcome not in ident.mediators:
            lv = sorted(_parse_level(v) for v in levels.get(spec.outcome, ["0", "1"]))
            factors.append(Factor(spec.outcome, spec.column(spec.outcome), "label", tuple(lv)))
        for c in spec.covariates:
            if c in bins:
                edges = tuple(sorted(float(v) for v in bins[c]))
                factors.append(Factor(c, spec.column(c), "covariate", tuple(range(len(edges) + 1)), edges))
            elif c in levels:
                lv = sorted((_parse_level(v) for v in levels[c]), key=lambda x: (str(type(x)), x))
                factors.append(Factor(c, spec.column(c), "covariate", tuple(lv)))
            else:
                raise GraphError(f"covariate '{c}' needs fixed cells for the federated audit: give bin edges "
                                 f"(stats-fairness-bins = \"{c}:40|55|70\") or levels (stats-fairness-levels)")
        lab = next((f for f in factors if f.role == "label"), None)
        if lab is not None and {_norm(v) for v in lab.levels} != {"0", "1"}:
            raise GraphError(f"the label '{lab.column}' must have levels 0|1, declared {list(lab.levels)}")
        b = audit.score_bins
        if not 2 <= b <= 1000:
            raise GraphError(f"stats-fairness-score-bins must lie in [2, 1000], got {b}")
        return cls(spec, (a_lv[0], a_lv[1]), tuple(factors), b)


def coarse_frame(frame: pd.DataFrame, layout: CellLayout) -> pd.DataFrame:
    """The pooled table the federated audit equals: binned covariates replaced by their bin codes."""
    out = frame.copy()
    for f in layout.factors:
        if f.edges is not None:
            out[f.column] = f.codes(frame[f.column])
    return out


def score_bin(score: np.ndarray, b: int) -> np.ndarray:
    """Bins (k/b, (k+1)/b] (the first also holds 0): ``score > k/b`` iff ``bin >= k``, so a threshold on an edge
    is exact."""
    return np.clip(np.ceil(np.clip(score, 0.0, 1.0) * b).astype(np.int64) - 1, 0, b - 1)


# --------------------------------------------------------------------------------------------- statistics

@dataclass
class FairnessStats:
    """Summed (or one site's) sufficient statistics; ``sigma`` = std of the Gaussian noise in each entry."""

    layout: CellLayout
    n: np.ndarray  # cells, shape layout.shape
    score: np.ndarray
    score_sq: np.ndarray
    hist: np.ndarray | None  # (2, 2, B) A x label x score bin
    sigma: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in SENSITIVITY})
    sites: list[str] = field(default_factory=list)

    @property
    def noisy(self) -> bool:
        return any(v > 0 for v in self.sigma.values())


def site_statistics(frame: pd.DataFrame, layout: CellLayout, site: str = "") -> FairnessStats:
    """One site's exact statistics from its table (one row per patient). Never raises on the data (see the module
    docstring): values outside the declared levels, missing values and NaN covariates go to each axis's extra
    cell, a column the table lacks puts every row there, and both are noted in the local log."""
    spec = layout.spec
    n_rows = len(frame)
    where = f"site {site}: " if site else ""

    def column(name: str) -> pd.Series:
        if name in frame.columns:
            return frame[name]
        log.warning("%sfairness statistics: column '%s' is not in this site's table; every row goes to its "
                    "'other' cell", where, name)
        return pd.Series([None] * n_rows, index=frame.index, dtype=object)

    axes = [layout.sensitive_factor, *layout.factors]
    cols = [column(f.column) for f in axes]
    for f, col in zip(axes, cols):
        if f.column in frame.columns and n_rows:
            k = f.unknown(col)
            if k:
                log.warning("%sfairness statistics: %d of %d rows of '%s' are outside the declared levels %s "
                            "(or missing): counted in its '%s' cell", where, k, n_rows, f.column,
                            list(f.levels) if f.edges is None else "bins", OTHER)
    codes = [f.codes(col) for f, col in zip(axes, cols)]
    a = codes[0]
    score = pd.to_numeric(column(spec.column(spec.prediction)), errors="coerce").to_numpy(dtype=np.float64)
    bad_score = ~np.isfinite(score)
    if bad_score.any():
        log.warning("%sfairness statistics: %d rows have no finite score: counted in A's '%s' cell with score 0",
                    where, int(bad_score.sum()), OTHER)
        a = np.where(bad_score, 2, a)
        codes[0] = a
    score = np.clip(np.where(bad_score, 0.0, score), 0.0, 1.0)  # what makes the sensitivity 1
    flat = np.ravel_multi_index(codes, layout.shape) if n_rows else np.zeros(0, np.int64)
    size = int(np.prod(layout.shape))

    def cells(w: np.ndarray | None) -> np.ndarray:
        return np.bincount(flat, weights=w, minlength=size).astype(np.float64).reshape(layout.shape)

    hist = None
    lab = layout.label_factor
    if lab is not None:
        y = codes[1 + layout.factors.index(lab)]
        keep = (a < 2) & (y < 2)  # a known group and label (the label's levels are 0|1: code 2 is "other")
        hist = np.bincount((a[keep] * 2 + y[keep]) * layout.score_bins + score_bin(score[keep], layout.score_bins),
                           minlength=4 * layout.score_bins).astype(np.float64).reshape(2, 2, layout.score_bins)
    return FairnessStats(layout, cells(None), cells(score), cells(score ** 2), hist, sites=[site] if site else [])


def release_statistics(stats: FairnessStats, releaser, prefix: str = "fairness") -> dict[str, Any]:
    """Every vector through the releaser (noise for its declared sensitivity, charged to the ledger); returns what
    the site sends: flat lists plus the noise std of each (``sigma_<name>``)."""
    out: dict[str, Any] = {
        # not suppressed below the release's min count: the cell's noised score sum is released anyway, and
        # zeroing small noised counts would bias the federated estimate (see _cells)
        "cells_n": releaser.release(f"{prefix}/cells_n", stats.n.ravel(), SENSITIVITY["cells_n"]),
        "cells_score": releaser.release(f"{prefix}/cells_score", stats.score.ravel(), SENSITIVITY["cells_score"]),
        "cells_score_sq": releaser.release(f"{prefix}/cells_score_sq", stats.score_sq.ravel(),
                                           SENSITIVITY["cells_score_sq"]),
    }
    if stats.hist is not None:
        out["hist"] = releaser.release_counts(f"{prefix}/hist", stats.hist.ravel(), SENSITIVITY["hist"])
    for name in list(out):
        out[f"sigma_{name}"] = float(releaser.released[f"{prefix}/{name}"])
    return out


SECURE_SUM = "secure-sum"  # a record's entry: how many sites' shares the vectors are the secure sum of
SECURE_SUM_SITES = "secure-sum-sites"  # ... and the names of those sites
SECURE_SUM_SITE = "secure sum"  # the release the server makes of the sum (it has no one site's cells)
SUMMED = ("cells_n", "cells_score", "cells_score_sq", "hist")  # the vectors a secure sum adds, in this order
# each site's noised cells within +-2**16 (a count or score sum of up to 65536 patients per cell; more is clipped):
# with the sum's 2**24 quantisation levels, a quantum of 2**-7, far below any share's noise
STATS_CLIPPING_RANGE = 2.0**16


def summed_shapes(layout: CellLayout) -> dict[str, tuple[int, ...]]:
    """The vectors a secure sum adds, in the order site and server both flatten them (a record's names)."""
    size = int(np.prod(layout.shape))
    shapes = {name: (size,) for name in SUMMED[:3]}
    if layout.label_factor is not None:
        shapes[SUMMED[3]] = (4 * layout.score_bins,)
    return shapes


def stats_from_record(record: Mapping[str, Any], layout: CellLayout, site: str = "") -> FairnessStats:
    """Parse one site's released record (what :func:`release_statistics` returned) on the server."""
    size = int(np.prod(layout.shape))

    def arr(name: str, n: int) -> np.ndarray:
        v = np.asarray(record[name], dtype=np.float64)
        if v.size != n:
            raise GraphError(f"site {site or '?'}: '{name}' has {v.size} values, the layout needs {n}: the site and "
                             "the server use different stats-fairness-* settings or graph")
        return v

    n = arr("cells_n", size).reshape(layout.shape)
    hist = arr("hist", 4 * layout.score_bins).reshape(2, 2, layout.score_bins) if "hist" in record else None
    sigma = {k: float(record.get(f"sigma_{k}", 0.0)) for k in SENSITIVITY}
    return FairnessStats(layout, n, arr("cells_score", size).reshape(layout.shape),
                         arr("cells_score_sq", size).reshape(layout.shape), hist, sigma, [site] if site else [])


def sum_statistics(parts: list[FairnessStats]) -> FairnessStats:
    """The consortium's statistics: entries add, independent noise stds add in quadrature."""
    if not parts:
        raise EstimationError("no site released fairness statistics")
    first = parts[0]
    hist = None if first.hist is None else sum(p.hist for p in parts)
    sigma = {k: math.sqrt(sum(p.sigma.get(k, 0.0) ** 2 for p in parts)) for k in SENSITIVITY}
    return FairnessStats(first.layout, sum(p.n for p in parts), sum(p.score for p in parts),
                         sum(p.score_sq for p in parts), hist, sigma, [s for p in parts for s in p.sites])


# --------------------------------------------------------------------------------------------- effects

def known_cells(layout: CellLayout, array: np.ndarray) -> np.ndarray:
    """The part of a released grid the estimates use: A in (a0, a1), each factor's declared levels (the extra
    "other" / "missing" cells dropped; a declared catch-all level is kept)."""
    return np.asarray(array)[tuple(slice(0, k) for k in layout.known_shape)]


def rows_in_other_cells(stats: FairnessStats) -> float:
    """The (noised) count of rows the estimates leave out: every released cell outside :func:`known_cells`."""
    return float(stats.n.sum() - known_cells(stats.layout, stats.n).sum())


def _cells(stats: FairnessStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The declared cells (counts, score sums, sums of squares) and which of them enter the estimate.

    Without noise: the non-empty cells, exactly the pooled table's patterns. With noise: every declared cell, as
    released. Clipping noised entries (n >= 0, 0 <= sum <= n) or dropping cells whose noised count is <= 0 adds mass
    to the small cells, which makes the groups look alike and pulls every effect toward zero; the estimators are
    smooth functions of sums of these entries, so zero-mean noise leaves them unbiased to first order."""
    n = known_cells(stats.layout, stats.n).astype(np.float64)
    t = known_cells(stats.layout, stats.score).astype(np.float64)
    q = known_cells(stats.layout, stats.score_sq).astype(np.float64)
    use = np.ones(n.shape, bool) if stats.noisy else n > 0
    return n, t, q, use


def _cell_moments(n: np.ndarray, t: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's score mean and std for the bootstrap's sampling model, kept in [0, 1] and [0, 1/2] (the score's
    range); a cell with under one (noised) row takes the mean and std of all cells."""
    with np.errstate(invalid="ignore", divide="ignore"):
        m_all = float(np.clip(t.sum() / n.sum(), 0.0, 1.0))
        v_all = float(np.clip(q.sum() / n.sum() - m_all ** 2, 0.0, 0.25))
        mean = np.where(n >= 1, np.clip(t / n, 0.0, 1.0), m_all)
        var = np.where(n >= 2, np.clip(q / n - mean ** 2, 0.0, 0.25), v_all)
    return mean, np.sqrt(var)


# noise std per count above this share of the mean count per cell: the cells say nothing about the effect
NOISE_DOMINATES = 0.5


def _perturbations(n0: np.ndarray, t0: np.ndarray, q0: np.ndarray, stats: FairnessStats, n_boot: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_boot`` draws (cells x replicates) of the change in cell counts and score sums that resampling rows and
    releasing again would make: a multinomial draw minus its expectation (the row bootstrap's law), the cell
    mean times that change plus a normal with the cell's within-cell variance, then fresh privacy noise."""
    rng = np.random.default_rng(seed)
    k = n0.size
    n_pos = np.maximum(n0, 0.0)
    total = int(round(n_pos.sum()))
    share = n_pos / n_pos.sum()
    mean, sd = _cell_moments(n0, t0, q0)
    s_n, s_t = stats.sigma.get("cells_n", 0.0), stats.sigma.get("cells_score", 0.0)
    dn, dt = np.empty((k, n_boot)), np.empty((k, n_boot))
    for j in range(n_boot):
        m = rng.multinomial(total, share).astype(np.float64)
        dn[:, j] = m - share * total
        dt[:, j] = mean * dn[:, j] + np.sqrt(m) * sd * rng.standard_normal(k)
        if stats.noisy:
            dn[:, j] += s_n * rng.standard_normal(k)
            dt[:, j] += s_t * rng.standard_normal(k)
    return dn, dt


def effects_from_statistics(stats: FairnessStats, *, n_boot: int = 200, seed: int = 0, ci: float = 0.95,
                            max_weight: float = 50.0, gformula_bins: int = 4, positivity_ratio: float = 20.0,
                            min_cell: int = 5, max_gformula_cells: int = 200_000) -> EffectTable:
    """:func:`fairness.pse.estimate_effects` on cell statistics. Column 0 is the data (noised entries as released,
    see :func:`_cells`). Each bootstrap replicate is a perturbation of the cells: counts by a multinomial draw
    minus its expectation (the row bootstrap's law), score sums by the cell mean times that change plus a normal
    with the cell's within-cell variance, and, when the cells are noised, fresh privacy noise of the released size
    (std ``stats.sigma``). Without noise the estimators are re-evaluated on the perturbed cells. With noise each
    effect is linearised around the estimate (finite differences in every cell,
    :class:`fairness.replicates.Linearized`) and the replicates are the estimate plus its gradient times the
    perturbation, so the CIs cover sampling and noise and are centred on the estimate; the primary estimate is
    then the g-formula with smooth (logit) models of the score and the mediators, whose fits pool all cells
    (:func:`fairness.gformula.smoothed_gformula`). Only the declared cells (:func:`known_cells`) enter: rows in
    the extra "other" cells are left out."""
    t0 = time.perf_counter()
    layout = stats.layout
    settings = Settings(n_boot=n_boot, ci=ci, max_weight=max_weight, gformula_bins=gformula_bins,
                        positivity_ratio=positivity_ratio, min_cell=min_cell, max_gformula_cells=max_gformula_cells)
    n0, t0c, q0, idx = _declared_cells(stats)
    dn, dt = _perturbations(n0, t0c, q0, stats, n_boot, seed)
    if not stats.noisy:
        N = np.concatenate([n0[:, None], n0[:, None] + dn], axis=1)
        T = np.concatenate([t0c[:, None], np.clip(t0c[:, None] + dt, 0.0, N[:, 1:])], axis=1)
        return effects_from_design(_cell_problem(layout, idx, N, T), layout.a_levels, settings, t0=t0)
    linearized = Linearized(dn, dt)
    N, T = linearized.columns(n0, t0c)
    table = effects_from_design(_cell_problem(layout, idx, N, T), layout.a_levels, settings,
                                extra=(smoothed_gformula,), replicates=linearized, checks=(noised_cell_checks,), t0=t0)
    _note_noise(table, stats, n0)
    return table


def _declared_cells(stats: FairnessStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The counts, score sums and sums of squares of the cells that enter (:func:`_cells`), flat, and each one's
    code on every axis of the declared grid."""
    layout, spec = stats.layout, stats.layout.spec
    n, t, q, use = _cells(stats)
    present = np.flatnonzero(use.ravel())
    if present.size == 0:
        raise EstimationError("every released cell is empty")
    if (n.reshape(2, -1).sum(1) <= 0).any():
        raise EstimationError(f"one of the groups {layout.a_levels} of '{spec.column(spec.sensitive)}' is empty")
    return n.ravel()[present], t.ravel()[present], q.ravel()[present], np.unravel_index(present, layout.known_shape)


def _cell_var(codes_axis: np.ndarray, f: Factor) -> Var:
    """A factor as the estimators' variable: the levels its cells use, coded 0..."""
    used = np.unique(codes_axis)
    values = [f.levels[i] for i in used]
    codes = np.searchsorted(used, codes_axis)
    numeric = f.edges is not None
    return Var(f.node, f.column, codes.astype(np.int64), values if not numeric else [float(v) for v in values],
               numeric, np.asarray(values, dtype=np.float64) if numeric else None)


def _cell_problem(layout: CellLayout, idx: tuple[np.ndarray, ...], N: np.ndarray, T: np.ndarray) -> Problem:
    """The cells (codes ``idx``) as the estimators' design: each cell one pattern, with counts ``N`` and score
    sums ``T`` per column."""
    spec = layout.spec
    ident = identify(spec)
    by_node = {f.node: (i, f) for i, f in enumerate(layout.factors)}
    meds = [_cell_var(idx[1 + by_node[m][0]], by_node[m][1]) for m in ident.mediators]
    covs = [_cell_var(idx[1 + by_node[c][0]], by_node[c][1]) for c in spec.covariates]
    lab = layout.label_factor
    label = None if lab is None else np.asarray([float(lab.levels[i]) for i in idx[1 + layout.factors.index(lab)]])
    k = len(idx[0])
    med = np.stack([m.codes for m in meds], axis=1) if meds else np.zeros((k, 0), np.int64)
    design = Design(idx[0].astype(np.int64), med, [c.codes for c in covs], label, N, T)
    return Problem(design, spec, ident, meds, covs)


def noised_cell_checks(fitted: Fitted, reps: dict) -> tuple[dict[str, Any], list[str]]:
    """The checks of the rows on noised cells: none. The weighting and cell g-formula rows that the bounds and
    the graph checks rest on are heavy-tailed there (as the graph checks would be); the notes say so."""
    ident = fitted.problem.ident
    notes = []
    if ident.interventional and ident.total_effect_identified:
        notes.append("no bounds on the PSEs themselves: the statistics are noised")
    notes.append("graph checks skipped: on noised cells the weighting and cell g-formula rows they compare are too "
                 "noisy to test the graph")
    return {"graph_checks": []}, notes


def _note_noise(table: EffectTable, stats: FairnessStats, n0: np.ndarray) -> None:
    """Say, in place, that the cells carry privacy noise, and when it swamps the effect (every CI then set to the
    effect's whole range: the fits saturate or collapse toward no effect, with intervals that look narrow)."""
    notes = table.diagnostics["notes"]
    notes.append(
        "federated: cells carry Gaussian privacy noise (std per cell: counts {:.3g}, score sums {:.3g}); the "
        "replicates add it again (linearised around the estimate), so the CIs include it; the primary "
        "estimate is the smoothed g-formula (logit models of the score and of each mediator, additive in A, "
        "fitted over all cells), the weighting and cell g-formula rows are unsmoothed checks".format(
            stats.sigma.get("cells_n", 0.0), stats.sigma.get("cells_score", 0.0)))
    k = n0.size
    s_n, per_cell = stats.sigma.get("cells_n", 0.0), float(np.maximum(n0, 0.0).sum()) / k
    imp = table.get("impermissible", estimator=table.primary)
    why = None
    if s_n > NOISE_DOMINATES * per_cell:
        why = (f"the counts' noise std ({s_n:.3g}) exceeds {NOISE_DOMINATES:g} x the mean count per cell "
               f"({per_cell:.3g} patients in each of {k} cells); every CI is set to the effect's whole range")
        for i, r in table.table.iterrows():
            bound = 2.0 if r["outcome"] == "amplification" else 1.0
            table.table.loc[i, ["ci_low", "ci_high", "p_value"]] = [-bound, bound, 1.0]
    elif not imp["ci_high"] - imp["ci_low"] < 0.5:
        why = f"the CI spans {imp['ci_high'] - imp['ci_low']:.2f} of the effect's [-1, 1] range"
    if why:
        table.diagnostics["uninformative"] = (
            f"The privacy noise dominates ({why}), so this audit cannot tell a large effect from none; it needs "
            "more patients per cell (larger sites, coarser stats-fairness-bins) or less release-noise (at a "
            "privacy cost).")
        notes.append(table.diagnostics["uninformative"])


# --------------------------------------------------------------------------------------------- group metrics

def _weighted_bundle(threshold: float):
    def bundle(y_true, y_score, sample_weight):
        y = np.asarray(y_true, dtype=np.int64)
        s = np.asarray(y_score, dtype=np.float64)
        w = np.asarray(sample_weight, dtype=np.float64)
        tot, pos, neg = w.sum(), w[y == 1].sum(), w[y == 0].sum()
        call = (s > threshold).astype(int)
        nan = math.nan
        ece_bins = np.minimum((s * 10).astype(int), 9)
        gap = np.abs(np.bincount(ece_bins, w * y, 10) - np.bincount(ece_bins, w * s, 10)).sum()
        return (
            float(tot),
            float((w * y).sum() / tot) if tot > 0 else nan,
            float((w * s).sum() / tot) if tot > 0 else nan,
            float(roc_auc_score(y, s, sample_weight=w)) if pos > 0 and neg > 0 else nan,
            float(true_positive_rate(y, call, pos_label=1, sample_weight=w)) if pos > 0 else nan,
            float(false_positive_rate(y, call, pos_label=1, sample_weight=w)) if neg > 0 else nan,
            float(false_negative_rate(y, call, pos_label=1, sample_weight=w)) if pos > 0 else nan,
            float(true_negative_rate(y, call, pos_label=1, sample_weight=w)) if neg > 0 else nan,
            float(selection_rate(y, call, pos_label=1, sample_weight=w)) if tot > 0 else nan,
            float(gap / tot) if tot > 0 else nan,
            float((w * (s - y) ** 2).sum() / tot) if tot > 0 else nan,
        )
    return bundle


def group_metrics_from_histogram(stats: FairnessStats, specificity: float = 0.8) -> dict[str, Any]:
    """Per-group metrics from the (A, label, score bin) counts, through fairlearn's MetricFrame with the counts as
    sample weights and each bin's scores at its midpoint. The threshold is the first bin edge at which the pooled
    negatives reach ``specificity``. Same keys as :meth:`fairness.group_metrics.GroupMetrics.to_dict`."""
    layout = stats.layout
    if stats.hist is None:
        raise GraphError("group metrics need an outcome (label) node in the spec")
    b = layout.score_bins
    h = np.maximum(stats.hist, 0.0)
    neg = h[:, 0, :].sum(0)
    cum = np.cumsum(neg) / max(neg.sum(), 1e-300)
    k = int(min(np.searchsorted(cum, specificity - 1e-12) + 1, b - 1))
    threshold = k / b
    mid = (np.arange(b) + 0.5) / b
    a_idx, y_idx, s_idx = (g.ravel() for g in np.meshgrid(np.arange(2), np.arange(2), np.arange(b), indexing="ij"))
    w = h.ravel()
    keep = w > 0
    lab = layout.label_factor
    y_vals = np.asarray([int(float(v)) for v in lab.levels])[y_idx[keep]]
    a_name = layout.spec.sensitive
    groups = np.asarray(layout.a_levels, dtype=object)[a_idx[keep]]
    mf = MetricFrame(metrics={"all": _weighted_bundle(threshold)}, y_true=y_vals, y_pred=mid[s_idx[keep]],
                     sensitive_features=pd.Series(groups, name=a_name),
                     sample_params={"all": {"sample_weight": w[keep]}})
    by_group = pd.DataFrame([list(v) for v in mf.by_group["all"].to_numpy()], index=mf.by_group.index,
                            columns=list(METRICS), dtype=np.float64)
    overall = dict(zip(METRICS, mf.overall["all"]))
    summary: dict[str, Any] = {"threshold": threshold, "realised_specificity": float(cum[k - 1]),
                               "groups": [str(g) for g in by_group.index], "score_bins": b}
    for m in GAP_METRICS:
        col = by_group[m]
        summary[f"{m}_min"], summary[f"{m}_max"] = float(col.min()), float(col.max())
        summary[f"{m}_gap"] = float(col.max() - col.min())
    summary["worst_group_auroc"] = summary["auroc_min"]
    summary["worst_auroc_group"] = str(by_group["auroc"].idxmin()) if by_group["auroc"].notna().any() else None
    summary["worst_fnr_group"] = str(by_group["fnr"].idxmax()) if by_group["fnr"].notna().any() else None

    return {"threshold": threshold, "specificity_target": specificity,
            "overall": jsonable(overall),
            "by_group": jsonable(by_group.reset_index().to_dict("records")),
            "summary": jsonable(summary), "control_features": [], "controlled": None,
            "controlled_summary": None, "ci": None,
            "note": f"from {b}-bin score histograms (scores at bin midpoints); threshold at a bin edge"}


# --------------------------------------------------------------------------------------------- the audit

def _site_effect(stats: FairnessStats, n_boot: int, seed: int) -> dict[str, Any]:
    try:
        eff = effects_from_statistics(stats, n_boot=n_boot, seed=seed)
    except (EstimationError, np.linalg.LinAlgError, ValueError) as err:
        return {"status": f"not estimable: {err}"}
    out = {"status": "ok", "n": eff.n}
    for effect in ("impermissible", "total"):
        out[effect] = jsonable({k: v for k, v in eff.get(effect).items() if k in ("estimate", "ci_low", "ci_high",
                                                                                 "p_value")})
    return out


def audit_from_statistics(stats: FairnessStats, per_site: Mapping[str, FairnessStats] | None = None, *,
                          n_boot: int = 200, seed: int = 0, specificity: float = 0.8, alpha: float = 0.05,
                          site_boot: int = 100) -> AuditResult:
    """The audit of :func:`fairness.audit.run_audit` from summed statistics, plus a ``federated`` section with
    each site's impermissible and total effects (for the forest plot) and the noise levels."""
    t0 = time.perf_counter()
    layout, spec = stats.layout, stats.layout.spec
    effects = effects_from_statistics(stats, n_boot=n_boot, seed=seed)
    t1 = time.perf_counter()
    gm = group_metrics_from_histogram(stats, specificity) if stats.hist is not None else None
    eff = effects.to_dict()
    return AuditResult(
        mode="federated", spec=spec.to_dict(), spec_source=spec.source,
        data={"n_rows": effects.n["total"], "n_by_group": effects.n, "levels": eff["levels"]},
        warnings=list(spec.warnings),
        paths=[p.to_dict() for p in effects.identification.paths],
        identification=eff.pop("identification"),
        effects=eff,
        group_metrics=gm,
        verdict=verdict(effects, alpha),
        federated={
            "sites": list(stats.sites), "noise_sigma": stats.sigma,
            "cells": {"shape": list(layout.shape), "estimated_shape": list(layout.known_shape), "factors": [
                {"node": f.node, "column": f.column, "levels": list(f.levels),
                 "other_cell": ("declared" if f.catch_all is not None
                                else "missing" if f.edges is not None else "extra"),
                 **({"edges": list(f.edges)} if f.edges is not None else {})} for f in layout.factors],
                "score_bins": layout.score_bins},
            # rows outside the declared levels (or missing), left out of the estimates; noised like every cell
            "rows_in_other_cells": rows_in_other_cells(stats),
        },
        robustness={},
        per_site={name: _site_effect(s, site_boot, seed) for name, s in (per_site or {}).items()} or None,
        timing_s={"effects": round(t1 - t0, 3), "total": round(time.perf_counter() - t0, 3)},
    )


def layout_for(audit: FairAuditConfig) -> CellLayout:
    """The layout of a run: its graph (``stats-fairness-graph``, a path or a shipped name) and cells."""
    return CellLayout.from_config(load_graph_spec(audit.graph), audit)
