"""The weighting estimator of the path-specific effects (the pooled audit's primary, with the robust one).

The rows of one group are reweighted by the product over switched entries M of ``p(m | a1, pa, c)/p(m | a0, pa, c)``,
each ratio obtained by Bayes from two logistic classifiers of A, ``odds(a1 | m, pa, c)/odds(a1 | pa, c)``, and a1 rows
additionally by ``p(c | a0)/p(c | a1)``; Hajek-normalised, clipped at ``max_weight``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fairness.design import Design, Means, Problem, Settings
from fairness.identification import EFFECTS
from fairness.nuisance import features, fit_logistic


class _LogOdds:
    """log odds(a1 | the chosen mediators, covariates) per pattern and column, one fit per mediator set."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, med_idx: list[int]) -> np.ndarray:
        key = tuple(sorted(med_idx))
        if key not in self.cache:
            p = self.problem
            x = features(p.d.med, p.d.cov, list(key), p.meds, p.covs, p.d.N[:, 0])
            self.cache[key] = x @ fit_logistic(x, p.d.a.astype(np.float64), p.d.N)
        return self.cache[key]

    def ratio(self, w: str) -> np.ndarray:
        """log p(w | a1, its parents, c) / p(w | a0, its parents, c), by Bayes from two classifiers."""
        names = self.problem.names
        pa = [names.index(p) for p in self.problem.parents[w]]
        return self(pa + [names.index(w)]) - self(pa)


def _log_weights(problem: Problem, log_odds: _LogOdds, eff: str) -> np.ndarray:
    """Each pattern's log weight (up to a constant) into the effect's world, -inf outside the group it reweights."""
    d, ident = problem.d, problem.ident
    ay = ident.outcome_world[eff]
    logw = np.zeros_like(d.N)
    for w, value in ident.factor_world[eff].items():
        if w in problem.names and value != ay:
            logw += log_odds.ratio(w) if ay == 0 else -log_odds.ratio(w)
    if ay == 1:
        logw -= log_odds([])
    mask = (d.a == ay)[:, None]
    logw = np.where(mask, logw, -np.inf)
    return logw - np.max(np.where(mask, logw, -np.inf), axis=0, keepdims=True)


def _reweighted(d: Design, logw: np.ndarray, ay: int, max_weight: float) -> tuple[dict, dict[str, Any]]:
    """The weighted means of the score and label (Hajek, clipped weights) and the weights' diagnostics."""
    mask = (d.a == ay)[:, None]
    w = np.exp(logw)
    nw = d.N * w
    w = w * (d.N * mask).sum(0, keepdims=True) / np.maximum(nw.sum(0, keepdims=True), 1e-300)
    over = w > max_weight
    wc = np.minimum(w, max_weight)
    den = (d.N * wc).sum(0)
    means = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        means["score"] = (d.T * wc).sum(0) / den
        if d.L is not None:
            means["label"] = (d.L * wc).sum(0) / den
    ng = float((d.N[:, 0] * mask[:, 0]).sum())
    s1 = float((d.N[:, 0] * wc[:, 0]).sum())
    s2 = float((d.N[:, 0] * wc[:, 0] ** 2).sum())
    return means, {
        "rows_reweighted": f"A=a{ay}", "n_rows": int(ng),
        "effective_sample_size": s1 * s1 / s2 if s2 > 0 else 0.0,
        "n_clipped": int((d.N[:, 0] * over[:, 0]).sum()),
        "max_weight": float(np.max(np.where(mask[:, 0] & (d.N[:, 0] > 0), w[:, 0], 0.0))),
    }


def weighting(problem: Problem, settings: Settings) -> Means:
    """The reweighted means in every effect's world. A recanting district's interventional analogue has none:
    reweighting the observed joint law of the mediators cannot make them independent."""
    log_odds = _LogOdds(problem)
    by_outcome: dict[str, dict[str, np.ndarray]] = {"score": {}, "label": {}}
    diag: dict[str, Any] = {}
    for eff in EFFECTS:
        ay = problem.ident.outcome_world[eff]
        means, diag[eff] = _reweighted(problem.d, _log_weights(problem, log_odds, eff), ay, settings.max_weight)
        for outcome, mean in means.items():
            by_outcome[outcome][eff] = mean
    if not problem.ident.interventional:
        return Means("weighting", by_outcome, diag)
    for by_eff in by_outcome.values():
        for eff in ("impermissible", "permissible"):
            if eff in by_eff:
                by_eff[eff] = np.full(problem.d.N.shape[1], np.nan)
    return Means("weighting", by_outcome, diag, notes=(
        "the interventional analogue has no weighting form (reweighting the observed joint law would keep the "
        "mediators' hidden dependence)",))
