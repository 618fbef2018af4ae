"""The edge g-formula on the (A, mediators, covariate cell) grid, in two forms.

* :func:`cell_gformula` (the cross-check): cell means ``E[T | a, m, c]`` and cell frequencies ``p(m_j | a, pa_j, c)``
  over covariates cut into ``gformula_bins`` quantile bins per numeric covariate; empty cells fall back to pooling
  over covariates. The total effect is model-free. It is a function of the per-cell counts and sums only (what a
  federated site can release), and gives the bounds of a recanting district (:func:`coupling_bounds`).
* :func:`smoothed_gformula` (the federated audit's primary on noised cells): logit models of the score and of each
  mediator fitted over all cells, covariates not coarsened. Its estimating equations are sums over cells, so the
  noise in one cell's count or sum is averaged out instead of divided by that cell's (small, noisy) count. Its
  contrasts are taken against the same formula with nothing switched, so the outcome model's noise cancels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import expit

from fairness.design import Design, Means, Problem, Settings, Var, mixed_radix
from fairness.identification import EFFECTS, Identification
from fairness.nuisance import features, fit_mean_logit

World = tuple[int, dict[str, int]]  # the outcome's A-value, each mediator factor's A-value


@dataclass(frozen=True)
class CellGrid:
    """The patterns summed into the (A, mediators, covariate cell) grid: counts ``N``, score sums ``T``, label
    sums ``L``, each of shape grid x design columns."""

    N: np.ndarray
    T: np.ndarray
    L: np.ndarray | None
    cov_keys: np.ndarray  # each covariate cell's mixed-radix key over the covariates' codes
    cov_sizes: tuple[int, ...]  # the covariates' code counts (empty: no covariates)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.N.shape[:-1]

    @property
    def m_axes(self) -> list[int]:
        return list(range(1, len(self.shape) - 1))

    @property
    def c_axis(self) -> int:
        return len(self.shape) - 1

    @property
    def cells(self) -> int:
        return int(np.prod(self.shape))

    def cov_codes(self, cell: np.ndarray) -> list[np.ndarray]:
        """Each covariate's code at the given covariate cells."""
        return list(np.unravel_index(self.cov_keys[cell], self.cov_sizes)) if self.cov_sizes else []

    @classmethod
    def build(cls, d: Design, levels: list[int], cov_columns: list[tuple[np.ndarray, int]],
              max_cells: int) -> "CellGrid | None":
        """The grid over mediators with ``levels`` levels and covariate cells of ``cov_columns`` (per covariate,
        each pattern's code and the code count); None when it has more than ``max_cells`` cells."""
        csizes = [s for _, s in cov_columns]
        if cov_columns:
            keys, ccell = np.unique(mixed_radix([c for c, _ in cov_columns], csizes), return_inverse=True)
        else:
            keys, ccell = np.zeros(0, np.int64), np.zeros(d.k, np.int64)
        shape = [2] + list(levels) + [len(keys) if cov_columns else 1]
        g = int(np.prod(shape))
        if g > max_cells:
            return None
        flat = mixed_radix([d.a] + [d.med[:, i] for i in range(len(levels))] + [ccell], shape)
        agg = sparse.csr_matrix((np.ones(d.k), (flat, np.arange(d.k))), shape=(g, d.k))
        b1 = d.N.shape[1]
        L = None if d.L is None else (agg @ d.L).reshape(shape + [b1])
        return cls((agg @ d.N).reshape(shape + [b1]), (agg @ d.T).reshape(shape + [b1]), L, keys, tuple(csizes))


def coarse_covariates(d: Design, covs: list[Var], bins: int) -> list[tuple[np.ndarray, int]]:
    """Each covariate's cell per pattern: a numeric one with more than ``bins`` levels cut at its (count-weighted)
    quantiles, any other its own codes."""
    out = []
    w0 = d.N[:, 0]
    for c, codes in zip(covs, d.cov):
        if c.numeric and len(c.levels) > bins:
            v = c.values[codes]
            order = np.argsort(v)
            cum = np.cumsum(w0[order]) / w0.sum()
            cuts = np.unique([v[order][np.searchsorted(cum, q)] for q in np.linspace(0, 1, bins + 1)[1:-1]])
            out.append((np.searchsorted(cuts, v, side="left"), len(cuts) + 1))
        else:
            out.append((codes, len(c.levels)))
    return out


def cell_mean(grid: CellGrid, S: np.ndarray) -> np.ndarray:
    """``S / N`` per cell; an empty cell takes its mean pooled over covariates, else over mediators too."""
    N, c_axis = grid.N, grid.c_axis
    every = tuple(grid.m_axes + [c_axis])
    with np.errstate(invalid="ignore", divide="ignore"):
        q = S / N
        pooled = S.sum(c_axis, keepdims=True) / N.sum(c_axis, keepdims=True)
        overall = S.sum(every, keepdims=True) / N.sum(every, keepdims=True)
    return np.where(N > 0, q, np.where(N.sum(c_axis, keepdims=True) > 0, pooled, overall))


def _stratum_counts(grid: CellGrid, j: int, pa: list[int]) -> np.ndarray:
    """Counts summed over every axis but A, mediator ``j``, its mediator parents ``pa`` and the covariate cell
    (every factor is estimated per A: needed for entries and their districts, harmless elsewhere)."""
    keep = {0, 1 + j, grid.c_axis} | {1 + p for p in pa}
    drop = tuple(ax for ax in range(len(grid.shape)) if ax not in keep)
    return grid.N.sum(drop, keepdims=True) if drop else grid.N


def cell_conditional(grid: CellGrid, j: int, pa: list[int]) -> tuple[np.ndarray, int]:
    """``p(m_j | a, parents, c)`` from cell frequencies; an empty stratum pools over covariates, else is uniform.
    Returns it and the number of empty strata."""
    sub = _stratum_counts(grid, j, pa)
    den = sub.sum(1 + j, keepdims=True)
    sub_nc = sub.sum(grid.c_axis, keepdims=True)
    den_nc = sub_nc.sum(1 + j, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(den > 0, sub / den, np.where(den_nc > 0, sub_nc / den_nc, 1.0 / grid.shape[1 + j]))
    return p, int((den[..., 0] == 0).sum())


def smooth_conditional(grid: CellGrid, j: int, pa: list[int], meds: list[Var], covs: list[Var]) -> np.ndarray:
    """``p(m_j | a, parents, c)`` from continuation-ratio logit fits (level l against the levels above it), each
    additive in A, the parents' joint one-hot and the covariate terms: like the outcome model, sums over all cells
    instead of ratios of small noisy counts."""
    sub = _stratum_counts(grid, j, pa)
    n_levels = grid.shape[1 + j]
    strata_shape = sub.shape[:1 + j] + sub.shape[2 + j:-1]
    k = int(np.prod(strata_shape))
    at = np.unravel_index(np.arange(k), strata_shape)
    strata_axis = [ax if ax < 1 + j else ax - 1 for ax in range(len(grid.shape))]  # grid axis -> strata axis
    med = np.stack([at[strata_axis[1 + p]] for p in pa], axis=1) if pa else np.zeros((k, 0), np.int64)
    counts = np.moveaxis(sub, 1 + j, -2).reshape(k, n_levels, -1)  # strata x levels x columns
    x = features(med, grid.cov_codes(at[strata_axis[grid.c_axis]]), list(range(len(pa))), [meds[p] for p in pa],
                 covs, np.maximum(counts[:, :, 0].sum(1), 1e-12), interactions=False)
    x = np.concatenate([x, at[0][:, None].astype(np.float64)], axis=1)
    probs, rest = [], np.ones((k, counts.shape[2]))
    for level in range(n_levels - 1):
        h = expit(x @ fit_mean_logit(x, counts[:, level], counts[:, level:].sum(1)))
        probs.append(rest * h)
        rest = rest * (1.0 - h)
    probs.append(rest)
    return np.moveaxis(np.stack(probs, axis=1).reshape(strata_shape + (n_levels, -1)), -2, 1 + j)


def smooth_outcome(grid: CellGrid, meds: list[Var], covs: list[Var], S: np.ndarray, with_a: bool) -> np.ndarray:
    """``E[T | a, m, c]`` per grid cell from :func:`fit_mean_logit` on the sums ``S``: the mediators' joint
    one-hot, covariate terms (no interactions) and, ``with_a`` (the graph lets A reach T other than through the
    observed mediators), an additive term in A, on the logit scale."""
    k = grid.cells
    idx = list(np.unravel_index(np.arange(k), grid.shape))
    med = np.stack(idx[1:1 + len(meds)], axis=1) if meds else np.zeros((k, 0), np.int64)
    n = grid.N.reshape(k, -1)
    x = features(med, grid.cov_codes(idx[-1]), list(range(len(meds))), meds, covs, np.maximum(n[:, 0], 1e-12),
                 interactions=False)
    if with_a:
        x = np.concatenate([x, idx[0][:, None].astype(np.float64)], axis=1)
    return expit(x @ fit_mean_logit(x, S.reshape(k, -1), n)).reshape(grid.N.shape)


def _worlds(ident: Identification) -> dict[str, World]:
    return {eff: (ident.outcome_world[eff], ident.factor_world[eff]) for eff in EFFECTS}


def _reference_covariates(grid: CellGrid) -> np.ndarray:
    """p(c | a0) per covariate cell and column."""
    n_a0 = grid.N[0].sum(tuple(ax - 1 for ax in grid.m_axes), keepdims=False)
    return n_a0 / n_a0.sum(0, keepdims=True)


def edge_means(grid: CellGrid, qs: dict[str, np.ndarray], conds: list[np.ndarray], names: list[str],
               worlds: dict[str, World], pc: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The edge g-formula's mean of each outcome (its cell means ``qs``) in each world: the outcome model at the
    world's A-value times each mediator's law at its factor's A-value, summed over the mediators and averaged
    over the reference group's covariate cells ``pc``."""
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in qs}
    m_sum = tuple(ax - 1 for ax in grid.m_axes)
    for eff, (ay, factor_world) in worlds.items():
        prod = np.ones([1] * len(conds) + [1, 1])
        for j, name in enumerate(names):
            prod = prod * conds[j][factor_world.get(name, ay)]
        for k, q in qs.items():
            out[k][eff] = (pc * (q[ay] * prod).sum(m_sum)).sum(0)
    return out


def _model_free_total(grid: CellGrid, S: np.ndarray, pc: np.ndarray) -> np.ndarray:
    """E[T | a1, c] averaged over the reference group's covariate cells (an empty cell: the a1 mean)."""
    m_sum = tuple(ax - 1 for ax in grid.m_axes)
    s, n = S[1].sum(m_sum), grid.N[1].sum(m_sum)
    overall = s.sum(0, keepdims=True) / np.maximum(n.sum(0, keepdims=True), 1e-300)
    inner = np.where(n > 0, s / np.where(n > 0, n, 1), overall)
    return (pc * inner).sum(0)


def cell_gformula(problem: Problem, settings: Settings) -> Means:
    """The g-formula with cell means and cell frequencies (see the module docstring)."""
    d, ident, names, meds = problem.d, problem.ident, problem.names, problem.meds
    cov_columns = coarse_covariates(d, problem.covs, settings.gformula_bins)
    grid = CellGrid.build(d, [len(m.levels) for m in meds], cov_columns, settings.max_gformula_cells)
    if grid is None:
        return Means.skip("gformula", "g-formula skipped: too many (A, mediator, covariate) cells")
    fallbacks = {"empty_outcome_cells": int((grid.N[..., 0] == 0).sum()), "empty_mediator_strata": 0}
    conds = []
    for j, name in enumerate(names):
        p, empty = cell_conditional(grid, j, [names.index(q) for q in problem.parents[name]])
        conds.append(p)
        fallbacks["empty_mediator_strata"] += empty
    sums = {"score": grid.T} if grid.L is None else {"score": grid.T, "label": grid.L}
    qs = {k: cell_mean(grid, s) for k, s in sums.items()}
    pc = _reference_covariates(grid)
    worlds = _worlds(ident)
    out = edge_means(grid, qs, conds, names, {e: w for e, w in worlds.items() if e != "total"}, pc)
    for k, s in sums.items():
        out[k]["total"] = _model_free_total(grid, s, pc)
    pair = bounded_pair(ident, meds, problem.parents)
    coupling = None if pair is None else {
        k: {eff: coupling_bounds(q, conds, pc, pair, worlds[eff], names) for eff in ("impermissible", "permissible")}
        for k, q in qs.items()}
    diag = {"cells": grid.cells, "covariate_cells": grid.shape[-1], "empty_cell_fallbacks": fallbacks}
    return Means("gformula", {"score": out["score"], "label": out.get("label", {})}, diag, coupling=coupling)


def smoothed_gformula(problem: Problem, settings: Settings) -> Means:
    """The g-formula with smooth models of the score and the mediators (see the module docstring); its baseline
    is the same formula with nothing switched."""
    d, ident, names, meds, covs = problem.d, problem.ident, problem.names, problem.meds, problem.covs
    cov_columns = [(codes, len(c.levels)) for c, codes in zip(covs, d.cov)]  # not coarsened
    grid = CellGrid.build(d, [len(m.levels) for m in meds], cov_columns, settings.max_gformula_cells)
    if grid is None:
        return Means.skip("smoothed", "smoothed g-formula skipped: too many (A, mediator, covariate) cells")
    conds = [smooth_conditional(grid, j, [names.index(q) for q in problem.parents[name]], meds, covs)
             for j, name in enumerate(names)]
    qs = {"score": smooth_outcome(grid, meds, covs, grid.T, ident.target in ident.entries)}
    if grid.L is not None:
        # a label that is a mediator is a coordinate of the cells (its cell means are exact): no model
        qs["label"] = (cell_mean(grid, grid.L) if problem.spec.outcome in names
                       else smooth_outcome(grid, meds, covs, grid.L, True))
    out = edge_means(grid, qs, conds, names, {**_worlds(ident), "none": (0, {})}, _reference_covariates(grid))
    baseline = {k: v.pop("none") for k, v in out.items()}
    return Means("smoothed", {"score": out["score"], "label": out.get("label", {})}, baseline=baseline)


def bounded_pair(ident: Identification, meds: list[Var], parents: dict[str, list[str]]) -> tuple[int, int] | None:
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


def coupling_bounds(q: np.ndarray, conds: list[np.ndarray], pc: np.ndarray, pair: tuple[int, int], world: World,
                    names: list[str]) -> tuple[np.ndarray, np.ndarray]:
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
