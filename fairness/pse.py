"""Path-specific effects of the sensitive attribute on the model's score and on the label, with bootstrap CIs.

For A switched from a0 (reference) to a1, and effects defined in the reference group (contrasts of
``E[T(α) | A=a0]`` with ``E[T | A=a0]`` for T = the score Ŷ and T = the label Y):

* ``total``: A switched on every path;
* ``impermissible``: A switched on the impermissible paths only (the social-pathway effect to test and remove);
* ``permissible``: A switched on the permissible paths only (e.g. biology through the disease);
* ``direct``: A switched only on paths that avoid every observed mediator (zero under the generator's graph: an
  estimate away from zero says the graph misses a path, e.g. A visible in the image).

The ``amplification`` rows are score effect minus label effect (paired bootstrap): does the model carry more of A's
influence than the label does? Identification and the A-setting of each entry come from
:func:`fairness.identification.identify`.

**Estimators.** Both work on the rows compressed to patterns of (A, observed mediators, label, covariates): within a
pattern only the score varies, so a bootstrap replicate is a vector of pattern counts and score sums (exactly what
refitting on the resampled rows would see), and every nuisance model is refitted on every replicate at the cost of a
few matrix products. That is what makes 100k rows × 200 replicates take seconds.

* ``weighting`` (primary): the reference-group rows (or the a1 rows, when the score's own A-input is switched) are
  reweighted by the product over switched entries M of ``p(m | a1, pa, c)/p(m | a0, pa, c)``, each ratio obtained by
  Bayes from two logistic classifiers of A, ``odds(a1 | m, pa, c)/odds(a1 | pa, c)`` (one-hot of the mediators'
  joint levels, covariates linear + quadratic, covariate × mediator interactions), and a1 rows additionally by
  ``p(c | a0)/p(c | a1)``. Hajek-normalised (mean weight 1), clipped at ``max_weight``; the diagnostics report the
  clipped count, the effective sample size and positivity warnings.
* ``gformula`` (cross-check): the edge g-formula with cell means ``E[T | a, m, c]`` and cell frequencies
  ``p(m_j | a, pa_j, c)`` over (A, mediators, covariates cut into ``gformula_bins`` quantile bins per numeric
  covariate); empty cells fall back to pooling over covariates. It is a function of the per-cell counts and sums only
  (what a federated site can release).

Tests of "effect = 0": Wald z with the bootstrap standard error (``p_value``); CIs are bootstrap percentiles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import expit
from scipy.stats import norm

from core_models.jsonable import jsonable
from fairness.graph import CausalSpec, GraphError
from fairness.identification import EFFECTS, Identification, identify

OUTCOMES = ("score", "label", "amplification")
ESTIMATORS = ("weighting", "gformula")
# the verdict's estimator, first that ran: robust (rows), smoothed (noised federated cells), weighting
PRIMARY_ORDER = ("robust", "smoothed", "weighting")


def primary_estimator(names) -> str:
    """The first of :data:`PRIMARY_ORDER` among ``names`` (an iterable of estimator names)."""
    present = set(names)
    return next((e for e in PRIMARY_ORDER if e in present), "weighting")


class EstimationError(GraphError):
    """The data cannot be analysed as asked (e.g. a continuous mediator, one group empty)."""


# --------------------------------------------------------------------------------------------- result

@dataclass
class EffectTable:
    """Effects of A on the score and the label, both estimators, with CIs; ``table`` has one row per
    (outcome, effect, estimator) and columns estimate, ci_low, ci_high, se, p_value, n_boot_ok, identified, target."""

    table: pd.DataFrame
    identification: Identification
    diagnostics: dict[str, Any]
    levels: tuple[Any, Any]
    n: dict[str, int]
    baseline: dict[str, float]
    n_boot: int
    ci: float
    seconds: float
    replicates: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def primary(self) -> str:
        """The estimator the verdict reads: the first of :data:`PRIMARY_ORDER` that ran."""
        return primary_estimator(self.table.estimator)

    def get(self, effect: str, outcome: str = "score", estimator: str | None = None) -> dict[str, Any]:
        """One row; without ``estimator``, the first of robust, smoothed, weighting, g-formula with an estimate (the
        interventional analogue of a recanting district, for one, has no weighting form; its robust form needs
        categorical mediators without mediator parents)."""
        if estimator is None:
            t = self.table
            for name in PRIMARY_ORDER + ("gformula",):
                row = t[(t.outcome == outcome) & (t.effect == effect) & (t.estimator == name)]
                if not row.empty and np.isfinite(float(row.iloc[0]["estimate"])):
                    return row.iloc[0].to_dict()
            estimator = self.primary
        t = self.table
        row = t[(t.outcome == outcome) & (t.effect == effect) & (t.estimator == estimator)]
        if row.empty:
            raise KeyError(f"no row for outcome={outcome!r}, effect={effect!r}, estimator={estimator!r}")
        return row.iloc[0].to_dict()

    def estimate(self, effect: str, outcome: str = "score", estimator: str | None = None) -> float:
        return float(self.get(effect, outcome, estimator)["estimate"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": {"a0": jsonable(self.levels[0]), "a1": jsonable(self.levels[1])},
            "n": self.n, "baseline": self.baseline, "n_boot": self.n_boot, "ci": self.ci,
            "seconds": round(self.seconds, 3),
            "effects": [{k: jsonable(v) for k, v in r.items()} for r in self.table.to_dict("records")],
            "diagnostics": jsonable(self.diagnostics),
            "identification": self.identification.to_dict(),
        }

    def __str__(self) -> str:
        t = self.table[self.table.estimator == self.primary]
        lines = [f"effects of A ({self.levels[0]!r} -> {self.levels[1]!r}) in the reference group, "
                 f"{self.n_boot} bootstrap replicates, {self.ci:.0%} CI"]
        for r in t.itertuples():
            flag = "" if r.identified else "  [not the requested effect: see identification]"
            lines.append(f"  {r.outcome:13s} {r.effect:13s} {r.estimate:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
                         f"  p={r.p_value:.3g}{flag}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- data prep

@dataclass
class Var:
    name: str
    column: str
    codes: np.ndarray  # per row
    levels: list[Any]
    numeric: bool = False
    values: np.ndarray | None = None  # numeric covariates: value per code


def _categorical(frame: pd.DataFrame, node: str, column: str, max_levels: int, what: str) -> Var:
    col = frame[column]
    levels = sorted(pd.unique(col).tolist(), key=lambda x: (str(type(x)), x))
    if len(levels) > max_levels:
        raise EstimationError(f"{what} '{node}' (column '{column}') has {len(levels)} levels; the estimator needs "
                              f"categorical {what}s with at most {max_levels} levels: bin it first")
    codes = pd.Categorical(col, categories=levels).codes.astype(np.int64)
    return Var(node, column, codes, levels)


def _covariate(frame: pd.DataFrame, node: str, column: str, max_levels: int) -> Var:
    col = frame[column]
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        v = col.to_numpy(dtype=np.float64)
        uniq = np.unique(v)
        if len(uniq) <= max_levels:
            codes = np.searchsorted(uniq, v)
            return Var(node, column, codes, uniq.tolist(), True, uniq)
        edges = np.unique(np.quantile(v, np.linspace(0, 1, max_levels + 1)[1:-1]))
        codes = np.searchsorted(edges, v, side="right")
        means = np.bincount(codes, weights=v) / np.maximum(np.bincount(codes), 1)
        return Var(node, column, codes, [f"bin{i}" for i in range(len(means))], True, means)
    return _categorical(frame, node, column, max_levels, "covariate")


def _mixed_radix(cols: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    key = np.zeros(len(cols[0]) if cols else 0, dtype=np.int64)
    for c, s in zip(cols, sizes):
        key = key * s + c
    return key


# --------------------------------------------------------------------------------------------- nuisance

def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float = 1e-3, max_iter: int = 50,
                 tol: float = 1e-9) -> np.ndarray:
    """Logistic regressions of y on x with frequency weights, one per column of ``w`` (K x B), by Newton's method
    vectorised over the columns; small ridge ``lam`` keeps separated cells finite. Returns beta (p x B)."""
    k, p = x.shape
    b = w.shape[1]
    beta = np.zeros((p, b))
    eye = lam * np.eye(p)
    for _ in range(max_iter):
        mu = expit(x @ beta)
        grad = x.T @ (w * (y[:, None] - mu)) - lam * beta
        h = w * mu * (1.0 - mu)
        hess = np.einsum("kp,kb,kq->bpq", x, h, x, optimize=True) + eye
        step = np.linalg.solve(hess, grad.T[..., None])[..., 0].T
        step = np.clip(step, -10.0, 10.0)
        beta += step
        if np.max(np.abs(step)) < tol:
            break
    return beta


class Design:
    """Patterns of (A, mediators, label, covariates) with per-replicate counts and sums."""

    def __init__(self, a: np.ndarray, meds: list[Var], label: np.ndarray | None, label_in_meds: bool,
                 covs: list[Var], score: np.ndarray, n_boot: int, seed: int):
        cols = [a] + [m.codes for m in meds] + [c.codes for c in covs]
        sizes = [2] + [len(m.levels) for m in meds] + [len(c.levels) for c in covs]
        if label is not None and not label_in_meds:
            lab_levels, lab_codes = np.unique(label, return_inverse=True)
            cols.append(lab_codes)
            sizes.append(len(lab_levels))
        key = _mixed_radix(cols, sizes)
        uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
        self.k = len(uniq)
        self.pattern = inv
        self.a = a[first]
        self.med = np.stack([m.codes[first] for m in meds], axis=1) if meds else np.zeros((self.k, 0), np.int64)
        self.cov = [c.codes[first] for c in covs]
        self.label = None if label is None else label[first].astype(np.float64)
        n = len(a)
        b1 = n_boot + 1
        self.N = np.empty((self.k, b1))
        self.T = np.empty((self.k, b1))
        self.N[:, 0] = np.bincount(inv, minlength=self.k)
        self.T[:, 0] = np.bincount(inv, weights=score, minlength=self.k)
        rng = np.random.default_rng(seed)
        for j in range(1, b1):
            idx = rng.integers(0, n, n)
            p = inv[idx]
            self.N[:, j] = np.bincount(p, minlength=self.k)
            self.T[:, j] = np.bincount(p, weights=score[idx], minlength=self.k)
        self.L = None if self.label is None else self.N * self.label[:, None]


def _features(d: Design, med_idx: list[int], meds: list[Var], covs: list[Var], n_rows: np.ndarray,
              interactions: bool = True) -> np.ndarray:
    """Pattern-level design matrix: one-hot of the joint levels of the chosen mediators (or an intercept),
    numeric covariates standardised (+ square when > 2 levels, + interaction with the mediator one-hot),
    categorical covariates one-hot (first level dropped)."""
    parts = []
    if med_idx:
        joint = _mixed_radix([d.med[:, i] for i in med_idx], [len(meds[i].levels) for i in med_idx])
        _u, jcode = np.unique(joint, return_inverse=True)
        onehot = np.eye(len(_u))[jcode]
    else:
        onehot = np.ones((d.k, 1))
    parts.append(onehot)
    # feature scaling only: weights floored at 0 (noised federated counts can be negative)
    w = np.maximum(np.asarray(n_rows, dtype=np.float64), 0.0)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / max(len(w), 1))
    for c, codes in zip(covs, d.cov):
        if c.numeric:
            v = c.values[codes]
            mu = float(w @ v)
            sd = math.sqrt(float(w @ (v - mu) ** 2)) or 1.0
            z = (v - mu) / sd
            cols = [z] + ([z ** 2] if len(c.levels) > 2 else [])
            for zc in cols:
                parts.append(zc[:, None])
                if interactions and onehot.shape[1] > 1:
                    parts.append(onehot[:, 1:] * zc[:, None])
        else:
            parts.append(np.eye(len(c.levels))[codes][:, 1:])
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------------------------- estimators

def _weighting(d: Design, ident: Identification, meds: list[Var], covs: list[Var], max_weight: float,
               parents: dict[str, list[str]]) -> tuple[dict, dict, dict]:
    names = [m.name for m in meds]
    n0 = d.N[:, 0]
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def eta(med_idx: list[int]) -> np.ndarray:
        key = tuple(sorted(med_idx))
        if key not in cache:
            x = _features(d, list(key), meds, covs, n0)
            cache[key] = x @ fit_logistic(x, d.a.astype(np.float64), d.N)
        return cache[key]

    def log_ratio(w: str) -> np.ndarray:  # log p(w | a1, given, c) / p(w | a0, given, c), by Bayes from two classifiers
        pa = [names.index(p) for p in parents[w]]
        return eta(pa + [names.index(w)]) - eta(pa)

    worlds = {eff: {m: v for m, v in ident.factor_world[eff].items() if m in names} for eff in EFFECTS}
    eta_cov = eta([])
    means: dict[str, dict[str, np.ndarray]] = {"score": {}, "label": {}}
    diag: dict[str, Any] = {}
    for eff in EFFECTS:
        ay = ident.outcome_world[eff]
        logw = np.zeros_like(d.N)
        for w, value in worlds[eff].items():
            if value != ay:
                logw += log_ratio(w) if ay == 0 else -log_ratio(w)
        if ay == 1:
            logw -= eta_cov
        mask = (d.a == ay)[:, None]
        logw = np.where(mask, logw, -np.inf)
        logw -= np.max(np.where(mask, logw, -np.inf), axis=0, keepdims=True)
        w = np.exp(logw)
        nw = d.N * w
        w = w * (d.N * mask).sum(0, keepdims=True) / np.maximum(nw.sum(0, keepdims=True), 1e-300)
        over = w > max_weight
        wc = np.minimum(w, max_weight)
        den = (d.N * wc).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means["score"][eff] = (d.T * wc).sum(0) / den
            if d.L is not None:
                means["label"][eff] = (d.L * wc).sum(0) / den
        ng = float((d.N[:, 0] * mask[:, 0]).sum())
        s1 = float((d.N[:, 0] * wc[:, 0]).sum())
        s2 = float((d.N[:, 0] * wc[:, 0] ** 2).sum())
        diag[eff] = {
            "rows_reweighted": f"A=a{ay}", "n_rows": int(ng),
            "effective_sample_size": s1 * s1 / s2 if s2 > 0 else 0.0,
            "n_clipped": int((d.N[:, 0] * over[:, 0]).sum()),
            "max_weight": float(np.max(np.where(mask[:, 0] & (d.N[:, 0] > 0), w[:, 0], 0.0))),
        }
    return means["score"], means["label"], diag


def fit_mean_logit(x: np.ndarray, sums: np.ndarray, counts: np.ndarray, lam: float = 0.1, max_iter: int = 50,
                   tol: float = 1e-9) -> np.ndarray:
    """A logit-link model of a cell's mean, ``sums / counts`` (values in [0, 1]), one fit per column of the K x B
    arrays: the root of ``x' (sums - counts * expit(x beta)) = 0``, which is linear in the cells' counts and sums
    (noise in them enters as a sum over cells). Fisher scoring with the counts floored at 0 in the curvature
    (the root is the same). ``lam``: a ridge that keeps beta finite when noised sums and counts admit no root
    (0.1: against the thousands of rows' information at consortium sizes it moves nothing measurable; at 1.0 the
    intervals under noise covered 0.89-0.95 instead of 0.91-0.95). Returns beta (p x B)."""
    p, b = x.shape[1], sums.shape[1]
    beta = np.zeros((p, b))
    w = np.maximum(counts, 0.0)
    eye = lam * np.eye(p)
    for _ in range(max_iter):
        mu = expit(x @ beta)
        grad = x.T @ (sums - counts * mu) - lam * beta
        hess = np.einsum("kp,kb,kq->bpq", x, w * mu * (1.0 - mu), x, optimize=True) + eye
        step = np.clip(np.linalg.solve(hess, grad.T[..., None])[..., 0].T, -10.0, 10.0)
        beta += step
        if np.max(np.abs(step)) < tol:
            break
    return beta


def _smooth_outcome(meds: list[Var], covs: list[Var], codes: list[np.ndarray], N: np.ndarray,
                    S: np.ndarray, with_a: bool) -> np.ndarray:
    """``E[T | a, m, c]`` on the (A, mediators, covariate cell) grid (``codes``: each grid point's codes, ``N``,
    ``S``: its counts and sums, grid shape x replicates) from :func:`fit_mean_logit`: the mediators' joint
    one-hot, covariate terms (no interactions) and, ``with_a`` (the graph lets A reach T other than through the
    observed mediators), an additive term in A, on the logit scale. Its estimating
    equations are sums over all cells, so noise in one cell's count or sum is averaged out instead of divided by
    that cell's (small, noisy) count."""
    grid = type("Grid", (), {})()
    grid.k = codes[0].size
    grid.med = np.stack(codes[1:1 + len(meds)], axis=1) if meds else np.zeros((grid.k, 0), np.int64)
    grid.cov = codes[1 + len(meds):]
    n = N.reshape(grid.k, -1)
    x = _features(grid, list(range(len(meds))), meds, covs, np.maximum(n[:, 0], 1e-12), interactions=False)
    if with_a:
        x = np.concatenate([x, codes[0][:, None].astype(np.float64)], axis=1)
    return expit(x @ fit_mean_logit(x, S.reshape(grid.k, -1), n)).reshape(N.shape)


def _gformula(d: Design, ident: Identification, meds: list[Var], covs: list[Var], bins: int,
              parents: dict[str, list[str]], max_cells: int, outcome: str = "cells", label_is_axis: bool = False
              ) -> tuple[dict, dict, dict] | None:
    """The edge g-formula on (A, mediators, covariate cells). ``outcome="cells"``: each cell's mean score (the
    total effect model-free). ``"smooth"``: :func:`_smooth_outcome`, covariates not coarsened (each covariate cell
    one pattern), and the returned means include ``"none"``, the same formula with nothing switched (its estimate
    of ``E[T | a0]``, the baseline its contrasts are taken against, so the outcome model's noise cancels)."""
    names = [m.name for m in meds]
    # coarse covariate cell per pattern
    ccols, csizes = [], []
    w0 = d.N[:, 0]
    for c, codes in zip(covs, d.cov):
        if c.numeric and len(c.levels) > bins and outcome == "cells":
            v = c.values[codes]
            order = np.argsort(v)
            cum = np.cumsum(w0[order]) / w0.sum()
            cuts = np.unique([v[order][np.searchsorted(cum, q)] for q in np.linspace(0, 1, bins + 1)[1:-1]])
            cc = np.searchsorted(cuts, v, side="left")
            ccols.append(cc)
            csizes.append(len(cuts) + 1)
        else:
            ccols.append(codes)
            csizes.append(len(c.levels))
    if ccols:
        _u, ccell = np.unique(_mixed_radix(ccols, csizes), return_inverse=True)
        lc = len(_u)
    else:
        ccell, lc = np.zeros(d.k, np.int64), 1
    lm = [len(m.levels) for m in meds]
    shape = [2] + lm + [lc]
    g = int(np.prod(shape))
    if g > max_cells:
        return None
    flat = _mixed_radix([d.a] + [d.med[:, i] for i in range(len(meds))] + [ccell], shape)
    agg = sparse.csr_matrix((np.ones(d.k), (flat, np.arange(d.k))), shape=(g, d.k))
    b1 = d.N.shape[1]
    N = (agg @ d.N).reshape(shape + [b1])
    T = (agg @ d.T).reshape(shape + [b1])
    L = None if d.L is None else (agg @ d.L).reshape(shape + [b1])
    m_axes = list(range(1, 1 + len(meds)))
    c_axis = 1 + len(meds)
    fallbacks = {"empty_outcome_cells": int((N[..., 0] == 0).sum()), "empty_mediator_strata": 0}

    def cell_mean(S: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            q = S / N
            pooled = S.sum(c_axis, keepdims=True) / N.sum(c_axis, keepdims=True)
            overall = S.sum(tuple(m_axes + [c_axis]), keepdims=True) / N.sum(tuple(m_axes + [c_axis]), keepdims=True)
        q = np.where(N > 0, q, np.where(N.sum(c_axis, keepdims=True) > 0, pooled, overall))
        return q

    def conditional(j: int) -> np.ndarray:
        name = names[j]
        keep = {1 + j, c_axis} | {1 + names.index(p) for p in parents[name]}
        keep.add(0)  # every factor is estimated per A (needed for entries and their districts; harmless elsewhere)
        drop = tuple(ax for ax in range(len(shape)) if ax not in keep)
        sub = N.sum(drop, keepdims=True) if drop else N
        den = sub.sum(1 + j, keepdims=True)
        sub_nc = sub.sum(c_axis, keepdims=True)
        den_nc = sub_nc.sum(1 + j, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(den > 0, sub / den, np.where(den_nc > 0, sub_nc / den_nc, 1.0 / lm[j]))
        fallbacks["empty_mediator_strata"] += int((den[..., 0] == 0).sum())
        return p

    def cov_codes(cell: np.ndarray) -> list[np.ndarray]:
        return list(np.unravel_index(_u[cell], csizes)) if ccols else []

    def smooth_conditional(j: int) -> np.ndarray:
        """``p(m_j | a, parents, c)`` from continuation-ratio logit fits (level l against the levels above it),
        each additive in A, the parents' joint one-hot and the covariate terms: like the outcome model, sums over
        all cells instead of ratios of small noisy counts."""
        name = names[j]
        pa = [names.index(p) for p in parents[name]]
        keep = {0, 1 + j, c_axis} | {1 + p for p in pa}
        drop = tuple(ax for ax in range(len(shape)) if ax not in keep)
        sub = N.sum(drop, keepdims=True) if drop else N
        strata_shape = sub.shape[:1 + j] + sub.shape[2 + j:-1]
        k = int(np.prod(strata_shape))
        at = np.unravel_index(np.arange(k), strata_shape)
        axis_of = lambda ax: ax if ax < 1 + j else ax - 1  # noqa: E731  (axis in the strata grid)
        grid = type("Grid", (), {})()
        grid.k = k
        grid.med = np.stack([at[axis_of(1 + p)] for p in pa], axis=1) if pa else np.zeros((k, 0), np.int64)
        grid.cov = cov_codes(at[axis_of(c_axis)])
        counts_all = np.moveaxis(sub, 1 + j, -2).reshape(k, lm[j], -1)  # strata x levels x replicates
        x = _features(grid, list(range(len(pa))), [meds[p] for p in pa], covs,
                      np.maximum(counts_all[:, :, 0].sum(1), 1e-12), interactions=False)
        x = np.concatenate([x, at[0][:, None].astype(np.float64)], axis=1)
        probs, rest = [], np.ones((k, counts_all.shape[2]))
        for level in range(lm[j] - 1):
            h = expit(x @ fit_mean_logit(x, counts_all[:, level], counts_all[:, level:].sum(1)))
            probs.append(rest * h)
            rest = rest * (1.0 - h)
        probs.append(rest)
        p = np.stack(probs, axis=1).reshape(strata_shape + (lm[j], -1))
        return np.moveaxis(p, -2, 1 + j)

    conds = [(smooth_conditional if outcome == "smooth" else conditional)(j) for j in range(len(meds))]
    if outcome == "smooth":
        grid = list(np.unravel_index(np.arange(g), shape))
        codes = grid[:-1] + cov_codes(grid[-1])
        qs = {"score": _smooth_outcome(meds, covs, codes, N, T, ident.target in ident.entries)}
        if L is not None:
            # a label that is a mediator is a coordinate of the cells (its cell means are exact): no model
            qs["label"] = cell_mean(L) if label_is_axis else _smooth_outcome(meds, covs, codes, N, L, True)
    else:
        qs = {"score": cell_mean(T)}
        if L is not None:
            qs["label"] = cell_mean(L)
    n_a0 = N[0].sum(tuple(ax - 1 for ax in m_axes), keepdims=False)  # (lc, b1)
    pc = n_a0 / n_a0.sum(0, keepdims=True)
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in qs}
    worlds = {eff: (ident.outcome_world[eff], ident.factor_world[eff]) for eff in EFFECTS}
    if outcome == "smooth":
        worlds["none"] = (0, {})
    for eff, (ay, factor_world) in worlds.items():
        prod = np.ones([1] * len(lm) + [1, 1])
        for j, name in enumerate(names):
            p = conds[j]
            a_idx = factor_world.get(name, ay)
            prod = prod * p[a_idx]
        for k, q in qs.items():
            if eff == "total" and outcome == "cells":  # model-free: E[T | a1, c] averaged over the reference group's covariates
                s = (T if k == "score" else L)[1].sum(tuple(ax - 1 for ax in m_axes))
                n = N[1].sum(tuple(ax - 1 for ax in m_axes))
                overall = s.sum(0, keepdims=True) / np.maximum(n.sum(0, keepdims=True), 1e-300)
                inner = np.where(n > 0, s / np.where(n > 0, n, 1), overall)
            else:
                inner = (q[ay] * prod).sum(tuple(ax - 1 for ax in m_axes))
            out[k][eff] = (pc * inner).sum(0)
    diag = {"cells": g, "covariate_cells": lc, "empty_cell_fallbacks": fallbacks}
    pair = _bounded_pair(ident, meds, parents) if outcome == "cells" else None
    if pair is not None:
        diag["bounds"] = {k: {eff: _coupling_bounds(q, conds, pc, pair, worlds[eff], names) for eff in
                              ("impermissible", "permissible")} for k, q in qs.items()}
    return out["score"], out.get("label", {}), diag


def _bounded_pair(ident: Identification, meds: list[Var], parents: dict[str, list[str]]) -> tuple[int, int] | None:
    """The two mediators (their indices) of a recanting district whose joint cross-world law the data leave open,
    when the bounds below apply: one district of two binary mediators, neither with a mediator parent."""
    if not ident.interventional or len(ident.recanting_districts) != 1:
        return None
    names = [m.name for m in meds]
    district = list(ident.recanting_districts[0])
    if len(district) != 2 or any(v not in names for v in district):
        return None
    j1, j2 = (names.index(v) for v in district)
    if any(len(meds[j].levels) != 2 or parents[names[j]] for j in (j1, j2)):
        return None
    return j1, j2


def _coupling_bounds(q: np.ndarray, conds: list[np.ndarray], pc: np.ndarray, pair: tuple[int, int],
                     world: tuple[int, dict[str, int]], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the edge g-formula's mean when the two district mediators M1, M2 (switched to different A-values)
    may depend on each other in any way: each is drawn from its own identified law, p(m1 | a', c) and
    p(m2 | a'', c), and their coupling is free (the Frechet class; the interventional analogue takes the
    independent one). Per covariate cell the mean is linear in t = P(M1 = 1, M2 = 1), with slope the outcome's
    interaction mu11 - mu10 - mu01 + mu00, and t ranges over [max(0, p1 + p2 - 1), min(p1, p2)]; the other
    mediators follow their own laws given M1, M2. Returns (lower, upper) per column."""
    ay, factor_world = world
    j1, j2 = pair
    n_meds = len(conds)
    mu = q[ay]
    for j, p in enumerate(conds):
        if j not in pair:
            mu = mu * p[factor_world.get(names[j], ay)]
    others = tuple(j for j in range(n_meds) if j not in pair)
    if others:
        mu = mu.sum(others, keepdims=True)

    def at(arr: np.ndarray, v1: int, v2: int) -> np.ndarray:
        idx = tuple(v1 if j == j1 else v2 if j == j2 else 0 for j in range(n_meds))
        return np.broadcast_to(arr, np.broadcast_shapes(arr.shape, mu.shape))[idx]

    p1 = at(conds[j1][factor_world.get(names[j1], ay)], 1, 0)
    p2 = at(conds[j2][factor_world.get(names[j2], ay)], 0, 1)
    m00, m10, m01, m11 = at(mu, 0, 0), at(mu, 1, 0), at(mu, 0, 1), at(mu, 1, 1)
    fixed = m00 + (m10 - m00) * p1 + (m01 - m00) * p2
    slope = m11 - m10 - m01 + m00
    t_low, t_high = np.maximum(0.0, p1 + p2 - 1.0), np.minimum(p1, p2)
    lower = fixed + np.minimum(slope * t_low, slope * t_high)
    upper = fixed + np.maximum(slope * t_low, slope * t_high)
    return (pc * lower).sum(0), (pc * upper).sum(0)


# --------------------------------------------------------------------------------------------- main entry

def _summarise(rep: np.ndarray, ci: float, bound: float = math.inf) -> dict[str, float]:
    """Estimate, percentile CI (intersected with [-bound, bound], the range the effect can take: a replicate
    outside it is noise, and cutting the interval there keeps its coverage), bootstrap SE and Wald p-value."""
    est = float(rep[0])
    boot = rep[1:]
    boot = boot[np.isfinite(boot)]
    if len(boot) < 2:
        return {"estimate": est, "ci_low": math.nan, "ci_high": math.nan, "se": math.nan, "p_value": math.nan,
                "n_boot_ok": int(len(boot))}
    lo, hi = np.clip(np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2]), -bound, bound)
    se = float(np.std(boot, ddof=1))
    if se > 0:
        p = float(2 * norm.sf(abs(est) / se))
    else:
        p = 1.0 if abs(est) < 1e-12 else 0.0
    return {"estimate": est, "ci_low": float(lo), "ci_high": float(hi), "se": se, "p_value": p,
            "n_boot_ok": int(len(boot))}


def _targets(ident: Identification, direct_ok: bool) -> dict[str, tuple[bool, str]]:
    y, a = ident.target, ident.sensitive
    imp_entries = [w for w, v in ident.switch["impermissible"].items() if v]
    per_entries = [w for w, v in ident.switch["permissible"].items() if v]
    out = {"total": (ident.total_effect_identified, f"total effect of {a} on every path")}
    if ident.identified:
        out["impermissible"] = (True, "effect along the impermissible paths (" +
                                "; ".join(str(p) for p in ident.paths if not p.permissible) + ")")
        out["permissible"] = (True, "effect along the permissible paths (" +
                              "; ".join(str(p) for p in ident.paths if p.permissible) + ")")
    elif ident.interventional:
        dist = "; ".join("{" + ", ".join(d) + "}" for d in ident.recanting_districts)
        out["impermissible"] = (False, "NOT the impermissible PSE (recanting district " + dist + "): its "
                                "interventional analogue, " + ", ".join(imp_entries) + " drawn from the a1 law "
                                "given parents and covariates, the other mediators independently from the a0 law")
        out["permissible"] = (False, "NOT the permissible PSE (recanting district " + dist + "): its "
                              "interventional analogue, " + ", ".join(per_entries) + " drawn from the a1 law")
    else:
        out["impermissible"] = (False, "NOT the impermissible PSE (not identified): edge effect of "
                                + (", ".join(f"{a} -> {w}" for w in imp_entries) or "no edge"))
        out["permissible"] = (False, "NOT the permissible PSE (not identified): edge effect of "
                              + (", ".join(f"{a} -> {w}" for w in per_entries) or "no edge"))
    if y in ident.entries:
        out["direct"] = (direct_ok, f"effect along paths from {a} to {y} through no observed mediator")
    else:
        out["direct"] = (direct_ok, f"zero under the graph (every path from {a} to {y} passes an observed "
                                    "mediator); away from zero means the graph misses a path")
    return out


def estimate_effects(frame: pd.DataFrame, spec: CausalSpec, *, n_boot: int = 200, seed: int = 0,
                     levels: tuple[Any, Any] | None = None, ci: float = 0.95, max_weight: float = 50.0,
                     max_covariate_levels: int = 50, max_mediator_levels: int = 20, gformula_bins: int = 4,
                     positivity_ratio: float = 20.0, min_cell: int = 5, max_gformula_cells: int = 200_000,
                     robust: bool = True, robust_learner: str = "quadratic", robust_folds: int = 5
                     ) -> EffectTable:
    """Estimate total, impermissible, permissible and direct effects of the sensitive attribute on the score (and
    on the label, when the spec has an outcome node): the cross-fitted multiply robust estimator
    (:mod:`fairness.robust`, Wald intervals; with the TV decomposition and E-values) when ``robust``, and the
    weighting and g-formula estimators with ``n_boot`` bootstrap replicates as second opinions.

    ``levels=(a0, a1)`` picks the two levels to compare (default: the spec's reference level, then the other one).
    The weighting and g-formula estimators need categorical mediators (at most ``max_mediator_levels`` levels;
    with a continuous one only the robust rows are given); numeric covariates with more than
    ``max_covariate_levels`` distinct values are cut into that many quantile bins for the weights.
    """
    t0 = time.perf_counter()
    spec.validate(frame)
    ident = identify(spec)
    a_node = spec.nodes[spec.sensitive]
    col_a = frame[a_node.column]
    if levels is None:
        present = sorted(pd.unique(col_a).tolist(), key=lambda x: (str(type(x)), x))
        if len(present) != 2:
            raise EstimationError(f"sensitive column '{a_node.column}' has {len(present)} levels {present}; "
                                  "pass levels=(a0, a1)")
        a0 = a_node.reference if a_node.reference is not None else present[0]
        a1 = next(v for v in present if v != a0)
        levels = (a0, a1)
    else:
        frame = frame[col_a.isin(levels)]
        col_a = frame[a_node.column]
    a = (col_a.to_numpy() == levels[1]).astype(np.int64)
    if a.sum() == 0 or a.sum() == len(a):
        raise EstimationError(f"one of the groups {levels} of '{a_node.column}' is empty")

    med_names = ident.mediators
    continuous = [m for m in med_names if frame[spec.column(m)].nunique() > max_mediator_levels]
    if continuous and not robust:
        _categorical(frame, continuous[0], spec.column(continuous[0]), max_mediator_levels, "mediator")  # raises
    covs = [_covariate(frame, c, spec.column(c), max_covariate_levels) for c in spec.covariates]
    out_node = spec.outcome
    label = None
    if out_node is not None:
        label = pd.to_numeric(frame[spec.column(out_node)], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(label).any():
            raise EstimationError(f"outcome column '{spec.column(out_node)}' is not numeric")
    score = pd.to_numeric(frame[spec.column(spec.prediction)], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(score).all():
        raise EstimationError(f"score column '{spec.column(spec.prediction)}' has non-numeric or infinite values")

    if continuous:
        table = _robust_only_table(ident, levels, a, score, label, n_boot, ci)
        table.diagnostics["notes"].append(
            "continuous mediator(s) " + ", ".join(continuous) + ": only the robust estimator (no bins) is given")
    else:
        meds = [_categorical(frame, m, spec.column(m), max_mediator_levels, "mediator") for m in med_names]
        d = Design(a, meds, label, out_node in med_names, covs, score, n_boot, seed)
        table = effects_from_design(d, spec, ident, meds, covs, levels, n_boot=n_boot, ci=ci,
                                    max_weight=max_weight, gformula_bins=gformula_bins,
                                    positivity_ratio=positivity_ratio, min_cell=min_cell,
                                    max_gformula_cells=max_gformula_cells, t0=t0)
    if robust:
        _add_robust(table, frame, spec, a, seed=seed, ci=ci, learner=robust_learner, folds=robust_folds)
    table.seconds = time.perf_counter() - t0
    return table


def _robust_only_table(ident: Identification, levels, a, score, label, n_boot: int, ci: float) -> EffectTable:
    n0, n1 = int((a == 0).sum()), int((a == 1).sum())
    baseline = {"score": float(score[a == 0].mean())}
    if label is not None:
        baseline["label"] = float(label[a == 0].mean())
    return EffectTable(table=pd.DataFrame(columns=["outcome", "effect", "estimator", "estimate", "ci_low",
                                                   "ci_high", "se", "p_value", "n_boot_ok", "identified", "target"]),
                       identification=ident, diagnostics={"notes": [], "positivity_warnings": [], "graph_checks": []},
                       levels=levels, n={"a0": n0, "a1": n1, "total": n0 + n1}, baseline=baseline, n_boot=n_boot,
                       ci=ci, seconds=0.0)


def _add_robust(table: EffectTable, frame: pd.DataFrame, spec: CausalSpec, a: np.ndarray, *, seed: int, ci: float,
                learner: str, folds: int) -> None:
    """Append the robust estimator's rows (effects, TV decomposition, E-values on the score) and compare it with
    the weighting estimator, in place."""
    from fairness.robust import e_value, robust_effects

    res = robust_effects(frame, spec, a, folds=folds, seed=seed, ci=ci, learner=learner)
    ident = table.identification

    def targets_for(idt: Identification) -> dict[str, tuple[bool, str]]:
        if not idt.total_effect_identified:
            return {eff: (False, "not estimated: confounding of the sensitive attribute") for eff in EFFECTS}
        return _targets(idt, idt.effect_identified.get("direct", True))

    by_outcome = {"score": targets_for(ident), "amplification": targets_for(ident)}
    if spec.outcome is not None:
        by_outcome["label"] = targets_for(identify(spec, spec.outcome))
    targets = by_outcome["score"]
    decomposition = {
        "tv": (True, "observed disparity E[T | a1] - E[T | a0] = ctf-direct - ctf-indirect - ctf-spurious"),
        "ctf-direct": (targets["direct"][0], "counterfactual direct effect in the reference group (x-DE)"),
        "ctf-indirect": (targets["direct"][0] and ident.total_effect_identified,
                         "counterfactual indirect effect E[T(a1, M(a0)) - T(a1) | a0] (x-IE)"),
        "ctf-spurious": (ident.total_effect_identified,
                         "counterfactual spurious effect E[T(a1) | a0] - E[T | a1]: the part of the disparity "
                         "due to the covariates differing between the groups (x-SE)"),
    }
    sd = res.diagnostics["score_sd_a0"]
    rows = []
    for (outcome, eff), r in res.estimates.items():
        ok, text = by_outcome[outcome].get(eff) or decomposition[eff]
        row = {"outcome": outcome, "effect": eff, "estimator": "robust", "estimate": r.estimate,
               "ci_low": r.ci_low, "ci_high": r.ci_high, "se": r.se, "p_value": r.p_value, "n_boot_ok": 0,
               "identified": bool(ok), "target": text}
        if outcome == "score" and eff in EFFECTS:
            row["e_value"], row["e_value_ci"] = e_value(r.estimate, r.ci_low, r.ci_high, sd)
        rows.append(row)
    table.table = pd.concat([table.table, pd.DataFrame(rows)], ignore_index=True)
    table.diagnostics["robust"] = res.diagnostics
    table.diagnostics["sensitivity"] = _sensitivity_text(table)
    checks = table.diagnostics.setdefault("graph_checks", [])
    for eff in ("impermissible", "permissible"):
        try:
            w, r = table.get(eff, estimator="weighting"), table.get(eff, estimator="robust")
        except KeyError:
            continue
        diff = r["estimate"] - w["estimate"]
        se = math.hypot(r["se"], w["se"])
        if math.isfinite(diff) and se > 0 and abs(diff) >= 0.01 and abs(diff) / se > norm.ppf(0.995):
            checks.append(f"{eff}: robust {r['estimate']:+.4f} and weighting {w['estimate']:+.4f} disagree "
                          f"(difference {diff:+.4f}, z = {diff / se:.1f}); under the graph they estimate the same "
                          "quantity: an edge between mediators (e.g. S -> D), a covariate link or a hidden common "
                          "cause may be missing, or a nuisance model is poor")


def _sensitivity_text(table: EffectTable) -> list[str]:
    """Plain-language E-values of the robust effects on the score."""
    out = []
    for eff in ("impermissible", "total"):
        r = table.get(eff, "score", "robust")
        if not math.isfinite(r.get("e_value", math.nan)):
            continue
        out.append(f"{eff}: an unmeasured confounder (of a mediator and the score, e.g. site or scanner effects, "
                   f"or of the sensitive attribute and a mediator) associated with both by a risk ratio of "
                   f"{r['e_value']:.2f} each, beyond the covariates, could explain the estimate away; to move the "
                   f"interval to include zero it needs {r['e_value_ci']:.2f} (1 = the interval already does).")
    return out


def effects_from_design(d: "Design", spec: CausalSpec, ident: Identification, meds: list[Var], covs: list[Var],
                        levels: tuple[Any, Any], *, n_boot: int, ci: float, max_weight: float, gformula_bins: int,
                        positivity_ratio: float, min_cell: int, max_gformula_cells: int,
                        t0: float | None = None, smoothed: bool = False, replicate_map=None) -> EffectTable:
    """The estimation proper, on pattern counts and sums (``d.N``, ``d.T``: column 0 the data, then one column
    per bootstrap replicate). Shared by :func:`estimate_effects` (rows) and :mod:`fairness.federated` (cells).
    ``smoothed`` adds the g-formula with a smooth outcome model (:func:`_smooth_outcome`);
    ``replicate_map`` (when the columns are not replicates but finite-difference steps) turns each effect's column
    values into the estimate and its replicates."""
    t0 = time.perf_counter() if t0 is None else t0
    med_names = [m.name for m in meds]
    proj, bidirected = spec.projection()
    graph_parents = {m: [p for p in proj.predecessors(m) if p in med_names] for m in med_names}
    # hidden common causes: each factor conditions on Tian's set; a recanting district: the interventional
    # analogue, each mediator drawn from its own law given its parents (the district's dependence left out)
    parents = graph_parents if ident.interventional else {
        m: [p for p in ident.conditioning.get(m, graph_parents[m]) if p in med_names] for m in med_names}
    hidden = [" <-> ".join(sorted(e)) for e in bidirected]
    direct_ok = ident.effect_identified.get("direct", ident.total_effect_identified)
    t_design = time.perf_counter() - t0

    # baseline E[T | A=a0] per replicate
    m0 = (d.a == 0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        base = {"score": (d.T * m0).sum(0) / (d.N * m0).sum(0)}
        if d.L is not None:
            base["label"] = (d.L * m0).sum(0) / (d.N * m0).sum(0)

    notes: list[str] = []
    if hidden:
        notes.append("hidden common causes " + "; ".join(hidden) + (
            ": the impermissible/permissible rows hold the interventional analogue (mediators drawn independently "
            "from their laws given their parents)" if ident.interventional else
            ": each factor conditions on its district (Tian's factorisation) and takes its district's A-value"))
    w_score, w_label, w_diag = _weighting(d, ident, meds, covs, max_weight, parents)
    if ident.interventional:  # reweighting the observed joint law of the mediators cannot make them independent
        for by_out in (w_score, w_label):
            for eff in ("impermissible", "permissible"):
                if eff in by_out:
                    by_out[eff] = np.full(d.N.shape[1], np.nan)
        notes.append("the interventional analogue has no weighting form (reweighting the observed joint law would "
                     "keep the mediators' hidden dependence)")
    g = _gformula(d, ident, meds, covs, gformula_bins, parents, max_gformula_cells)
    if g is None:
        notes.append("g-formula skipped: too many (A, mediator, covariate) cells")
        g_score, g_label, g_diag = {}, {}, {}
    else:
        g_score, g_label, g_diag = g
    coupling = g_diag.pop("bounds", None)
    s_score, s_label, s_base = {}, {}, {}
    if smoothed:
        sm = _gformula(d, ident, meds, covs, gformula_bins, parents, max_gformula_cells, outcome="smooth",
                       label_is_axis=spec.outcome in med_names)
        if sm is None:
            notes.append("smoothed g-formula skipped: too many (A, mediator, covariate) cells")
        else:
            s_score, s_label = sm[0], sm[1]
            s_base = {k: v.pop("none") for k, v in (("score", s_score), ("label", s_label)) if "none" in v}
    t_fit = time.perf_counter() - t0 - t_design

    targets = _targets(ident, direct_ok)
    if not ident.total_effect_identified:
        why = "not estimated: " + " ".join(r for r in ident.reasons if "total effect" in r)
        targets = {eff: (False, why) for eff in EFFECTS}
        for by_out in (w_score, w_label, g_score, g_label, s_score, s_label):
            for eff in list(by_out):
                by_out[eff] = np.full(d.N.shape[1], np.nan)
    rows, reps = [], {}
    est_means = {"weighting": {"score": w_score, "label": w_label}, "gformula": {"score": g_score, "label": g_label}}
    if smoothed:
        est_means = {"smoothed": {"score": s_score, "label": s_label}, **est_means}
    for estimator, by_out in est_means.items():
        for eff in EFFECTS:
            effects = {}
            for outcome in ("score", "label"):
                mean = by_out[outcome].get(eff)
                if mean is None or outcome not in base:
                    continue
                effects[outcome] = mean - (s_base[outcome] if estimator == "smoothed" else base[outcome])
                if replicate_map is not None:
                    effects[outcome] = replicate_map(effects[outcome])
            if "score" in effects and "label" in effects:
                effects["amplification"] = effects["score"] - effects["label"]
            for outcome, rep in effects.items():
                reps[(outcome, eff, estimator)] = rep
                ok, text = targets[eff]
                # a difference of means of a [0, 1] score or label; amplification is a difference of two of them
                bound = 2.0 if outcome == "amplification" else 1.0
                rows.append({"outcome": outcome, "effect": eff, "estimator": estimator,
                             **_summarise(rep, ci, bound),
                             "identified": bool(ok), "target": text})
    table = pd.DataFrame(rows)

    diagnostics = {
        "weights": w_diag, "gformula": g_diag, "notes": notes,
        "positivity_warnings": _positivity(d, meds, ident, positivity_ratio, min_cell),
        "patterns": d.k, "max_weight": max_weight,
        "timing_s": {"design_and_bootstrap": round(t_design, 3), "estimation": round(t_fit, 3)},
    }
    for eff, dg in w_diag.items():
        if dg["n_clipped"]:
            diagnostics["positivity_warnings"].append(
                f"{eff}: {dg['n_clipped']} of {dg['n_rows']} reweighted rows had weights above {max_weight} (clipped)")
        if dg["n_rows"] and dg["effective_sample_size"] < 0.1 * dg["n_rows"]:
            diagnostics["positivity_warnings"].append(
                f"{eff}: effective sample size {dg['effective_sample_size']:.0f} is under 10% of the "
                f"{dg['n_rows']} reweighted rows")
    if smoothed:  # on noised cells the cell g-formula the bounds rest on is heavy-tailed (as the graph checks)
        coupling = None
    if coupling is not None and ident.total_effect_identified:
        diagnostics["bounds"] = _bound_rows(coupling, base, ci, replicate_map, ident.recanting_districts[0])
        notes.append("bounds: the impermissible and permissible PSEs for any dependence between the district's "
                     "mediators (" + ", ".join(ident.recanting_districts[0]) + "), each drawn from its own law")
    elif ident.interventional and ident.total_effect_identified:
        why = ("the statistics are noised" if smoothed else "the g-formula was skipped" if g is None else
               "they are computed for one recanting district of two binary mediators without mediator parents")
        notes.append(f"no bounds on the PSEs themselves: {why}")
    if smoothed:  # the unsmoothed rows the checks compare are heavy-tailed on noised cells: no test of the graph
        diagnostics["graph_checks"] = []
        notes.append("graph checks skipped: on noised cells the weighting and cell g-formula rows they compare are "
                     "too noisy to test the graph")
    else:
        diagnostics["graph_checks"] = _graph_checks(spec, ident, reps, ci)
    n0, n1 = float(d.N[d.a == 0, 0].sum()), float(d.N[d.a == 1, 0].sum())
    n = {"a0": int(round(n0)), "a1": int(round(n1)), "total": int(round(n0 + n1))}
    baseline = {k: float(v[0]) for k, v in base.items()}
    return EffectTable(table=table, identification=ident, diagnostics=diagnostics, levels=levels, n=n,
                       baseline=baseline, n_boot=n_boot, ci=ci, seconds=time.perf_counter() - t0, replicates=reps)


def _bound_rows(coupling: dict, base: dict, ci: float, replicate_map, district: list[str]) -> list[dict]:
    """The bounds of :func:`_coupling_bounds` as effects (minus the baseline E[T | a0]), each with a ``ci``
    interval for the whole range: the lower bound's lower and the upper bound's upper percentile over the
    replicates (conservative: it covers every value in the range, not only the true one)."""
    rows = []
    for outcome, by_effect in coupling.items():
        for eff, (low, high) in by_effect.items():
            low, high = low - base[outcome], high - base[outcome]
            if replicate_map is not None:
                low, high = replicate_map(low), replicate_map(high)
            lo_b, hi_b = low[1:][np.isfinite(low[1:])], high[1:][np.isfinite(high[1:])]
            q = (1 - ci) / 2
            rows.append({"outcome": outcome, "effect": eff, "district": list(district),
                         "lower": float(low[0]), "upper": float(high[0]),
                         "ci_low": float(np.clip(np.quantile(lo_b, q), -1, 1)) if len(lo_b) else math.nan,
                         "ci_high": float(np.clip(np.quantile(hi_b, 1 - q), -1, 1)) if len(hi_b) else math.nan})
    return rows


def _positivity(d: Design, meds: list[Var], ident: Identification, ratio: float, min_cell: int) -> list[str]:
    out = []
    n0 = d.N[:, 0]
    tot = [float(n0[d.a == g].sum()) for g in (0, 1)]
    names = [m.name for m in meds]
    for w in ident.switch["total"]:
        if w not in names:
            continue
        j = names.index(w)
        m = meds[j]
        for code, lev in enumerate(m.levels):
            sel = d.med[:, j] == code
            c0, c1 = float(n0[sel & (d.a == 0)].sum()), float(n0[sel & (d.a == 1)].sum())
            share0, share1 = c0 / tot[0], c1 / tot[1]
            r = share1 / share0 if share0 > 0 else math.inf
            if min(c0, c1) < min_cell or r > ratio or r < 1 / ratio:
                out.append(f"{w}={lev!r} (column '{m.column}'): {int(c0)} rows in group a0 vs {int(c1)} in a1 "
                           f"(p({w}|a1)/p({w}|a0) = {r:.3g}): positivity is doubtful, weights for this level are "
                           "extreme or undefined")
        if d.cov:
            cell = _mixed_radix([d.med[:, j]] + d.cov, [len(m.levels)] + [int(c.max()) + 1 for c in d.cov])
            u, inv = np.unique(cell, return_inverse=True)
            c0 = np.bincount(inv, weights=n0 * (d.a == 0), minlength=len(u))
            c1 = np.bincount(inv, weights=n0 * (d.a == 1), minlength=len(u))
            thin = int(((c0 == 0) & (c1 >= min_cell)).sum())
            if thin:
                out.append(f"{w}: {thin} of {len(u)} ({w}, covariate) cells have >= {min_cell} rows in group a1 and "
                           "none in group a0")
    return out


def _graph_checks(spec: CausalSpec, ident: Identification, reps: dict, ci: float, min_effect: float = 0.005,
                  alpha: float = 0.01) -> list[str]:
    """Testable implications of the graph, from the estimates (each flagged when p < ``alpha`` and the effect is at
    least ``min_effect``, or, for the estimator comparison, when the paired CI of the difference excludes 0 and the
    difference is at least 0.01):

    * the two estimators target the same quantity under the graph; a disagreement says an edge is missing (e.g.
      S -> D: the g-formula assumes D ⊥ S | A, C, the weighting does not);
    * the direct effect is zero when every path from A to the score passes an observed mediator;
    * the label's impermissible effect is zero when no impermissible path reaches the label.
    """
    out = []
    for eff in ("impermissible", "permissible", "direct"):
        w, g = reps.get(("score", eff, "weighting")), reps.get(("score", eff, "gformula"))
        if w is None or g is None or not (np.isfinite(w[0]) and np.isfinite(g[0])):
            continue
        diff = w - g
        boot = diff[1:][np.isfinite(diff[1:])]
        if len(boot) > 1:
            lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
            if (lo > 0 or hi < 0) and abs(diff[0]) >= 0.01:
                out.append(f"{eff}: weighting {w[0]:+.4f} and g-formula {g[0]:+.4f} disagree (difference "
                           f"{diff[0]:+.4f}, {ci:.0%} CI [{lo:+.4f}, {hi:+.4f}]); under the graph they estimate the "
                           "same quantity: an edge between mediators (e.g. S -> D) or a covariate link may be missing")

    def significant(rep: np.ndarray | None) -> tuple[bool, float]:
        if rep is None or not np.isfinite(rep[0]):
            return False, math.nan
        s = _summarise(rep, ci)
        return (s["p_value"] < alpha and abs(s["estimate"]) >= min_effect), s["p_value"]

    if spec.prediction not in ident.entries:
        hit, p = significant(reps.get(("score", "direct", "weighting")))
        if hit:
            out.append(f"direct effect on the score is {reps[('score', 'direct', 'weighting')][0]:+.4f} (p={p:.2g}) "
                       f"although every path from {spec.sensitive} to {spec.prediction} passes an observed mediator: "
                       "the graph may miss a path (e.g. the group visible in the image: A -> X)")
    if spec.outcome is not None and spec.outcome in ident.mediators:
        label_paths = spec.classify_paths(spec.outcome)
        if all(pp.permissible for pp in label_paths):
            hit, p = significant(reps.get(("label", "impermissible", "weighting")))
            if hit:
                out.append(f"the label's impermissible effect is {reps[('label', 'impermissible', 'weighting')][0]:+.4f}"
                           f" (p={p:.2g}) although no impermissible path reaches '{spec.outcome}': the graph may miss "
                           f"an edge from a social mediator into '{spec.outcome}'")
    return out
