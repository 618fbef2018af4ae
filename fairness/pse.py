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

**Estimators.** Both work on the rows compressed to patterns of (A, observed mediators, label, covariates)
(:class:`fairness.design.Design`): within a pattern only the score varies, so a bootstrap replicate is a vector of
pattern counts and score sums (exactly what refitting on the resampled rows would see), and every nuisance model is
refitted on every replicate at the cost of a few matrix products. That is what makes 100k rows × 200 replicates
take seconds.

* ``weighting`` (primary, :mod:`fairness.weighting`): the reference-group rows (or the a1 rows, when the score's own
  A-input is switched) are reweighted into each effect's world by ratios of mediator laws obtained by Bayes from
  logistic classifiers of A (one-hot of the mediators' joint levels, covariates linear + quadratic, covariate ×
  mediator interactions). Hajek-normalised (mean weight 1), clipped at ``max_weight``; the diagnostics report the
  clipped count, the effective sample size and positivity warnings.
* ``gformula`` (cross-check, :func:`fairness.gformula.cell_gformula`): the edge g-formula with cell means
  ``E[T | a, m, c]`` and cell frequencies ``p(m_j | a, pa_j, c)`` over (A, mediators, covariates cut into
  ``gformula_bins`` quantile bins per numeric covariate); empty cells fall back to pooling over covariates. It is a
  function of the per-cell counts and sums only (what a federated site can release).

:func:`effects_from_design` runs them on any design; the federated audit adds estimators (the smoothed g-formula),
a replicate map (:mod:`fairness.replicates`) and its own checks.

Tests of "effect = 0": Wald z with the bootstrap standard error (``p_value``); CIs are bootstrap percentiles.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from core_models.jsonable import jsonable
from fairness.design import (
    Design,
    EstimationError,
    Means,
    Problem,
    Settings,
    Var,
    categorical_var,
    covariate_var,
    mixed_radix,
)
from fairness.gformula import cell_gformula
from fairness.graph import CausalSpec
from fairness.identification import EFFECTS, Identification, identify
from fairness.replicates import bootstrap_replicates
from fairness.weighting import weighting

__all__ = ["EffectTable", "EstimationError", "Fitted", "effects_from_design", "estimate_effects",
           "primary_estimator"]

OUTCOMES = ("score", "label", "amplification")
ESTIMATORS = ("weighting", "gformula")
# the verdict's estimator, first that ran: robust (rows), smoothed (noised federated cells), weighting
PRIMARY_ORDER = ("robust", "smoothed", "weighting")


def primary_estimator(names) -> str:
    """The first of :data:`PRIMARY_ORDER` among ``names`` (an iterable of estimator names)."""
    present = set(names)
    return next((e for e in PRIMARY_ORDER if e in present), "weighting")


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


# --------------------------------------------------------------------------------------------- estimation

Estimator = Callable[[Problem, Settings], Means]
ReplicateMap = Callable[[np.ndarray], np.ndarray]  # an effect's values per column -> estimate, then replicates


@dataclass(frozen=True)
class Fitted:
    """The estimators' means on a problem, with what turns them into effects: the data's E[T | a0] per column
    (``base``) and the replicate map."""

    problem: Problem
    settings: Settings
    means: tuple[Means, ...]
    base: dict[str, np.ndarray]
    replicates: ReplicateMap

    def of(self, estimator: str) -> Means:
        return next(m for m in self.means if m.estimator == estimator)


# a check of the rows: (fitted, replicates per (outcome, effect, estimator)) -> (diagnostics entries, notes)
Check = Callable[[Fitted, dict], tuple[dict[str, Any], list[str]]]


def district_bounds(fitted: Fitted, reps: dict) -> tuple[dict[str, Any], list[str]]:
    """Bounds on a recanting district's PSEs (from the cell g-formula, :func:`fairness.gformula.coupling_bounds`),
    or why there are none."""
    ident = fitted.problem.ident
    cell = fitted.of("gformula")
    if not ident.total_effect_identified:
        return {}, []
    if cell.coupling is not None:
        district = ident.recanting_districts[0]
        return ({"bounds": _bound_rows(cell.coupling, fitted.base, fitted.settings.ci, fitted.replicates, district)},
                ["bounds: the impermissible and permissible PSEs for any dependence between the district's "
                 "mediators (" + ", ".join(district) + "), each drawn from its own law"])
    if not ident.interventional:
        return {}, []
    why = ("the g-formula was skipped" if cell.skipped else
           "they are computed for one recanting district of two binary mediators without mediator parents")
    return {}, [f"no bounds on the PSEs themselves: {why}"]


def graph_checks(fitted: Fitted, reps: dict) -> tuple[dict[str, Any], list[str]]:
    """The graph's testable implications (:func:`_graph_checks`)."""
    p = fitted.problem
    return {"graph_checks": _graph_checks(p.spec, p.ident, reps, fitted.settings.ci)}, []


PLAIN_CHECKS: tuple[Check, ...] = (district_bounds, graph_checks)


def effects_from_design(problem: Problem, levels: tuple[Any, Any], settings: Settings, *,
                        extra: Sequence[Estimator] = (), replicates: ReplicateMap = bootstrap_replicates,
                        checks: Sequence[Check] = PLAIN_CHECKS, t0: float | None = None) -> EffectTable:
    """The estimation proper, on pattern counts and sums (``d.N``, ``d.T``: column 0 the data, then one column per
    replicate). Shared by :func:`estimate_effects` (rows) and :mod:`fairness.federated` (cells): the weighting and
    cell g-formula estimators, then the ``extra`` ones; ``replicates`` turns each effect's column values into the
    estimate and its replicates; the ``checks`` add bounds and graph checks to the diagnostics."""
    t0 = time.perf_counter() if t0 is None else t0
    d, ident = problem.d, problem.ident
    notes = _hidden_cause_notes(problem)
    t_design = time.perf_counter() - t0
    means = tuple(estimator(problem, settings) for estimator in (weighting, cell_gformula, *extra))
    notes += [note for m in means for note in m.notes]
    t_fit = time.perf_counter() - t0 - t_design
    targets = _targets(ident, ident.effect_identified.get("direct", ident.total_effect_identified))
    if not ident.total_effect_identified:
        why = "not estimated: " + " ".join(r for r in ident.reasons if "total effect" in r)
        targets = {eff: (False, why) for eff in EFFECTS}
        means = tuple(_unidentified(m, d.N.shape[1]) for m in means)
    fitted = Fitted(problem, settings, means, _baseline(d), replicates)
    rows, reps = _effect_rows(fitted, targets)
    diagnostics = _diagnostics(fitted, notes, t_design, t_fit)
    for check in checks:
        entries, more = check(fitted, reps)
        diagnostics.update(entries)
        notes += more
    n0, n1 = float(d.N[d.a == 0, 0].sum()), float(d.N[d.a == 1, 0].sum())
    n = {"a0": int(round(n0)), "a1": int(round(n1)), "total": int(round(n0 + n1))}
    baseline = {k: float(v[0]) for k, v in fitted.base.items()}
    return EffectTable(table=pd.DataFrame(rows), identification=ident, diagnostics=diagnostics, levels=levels, n=n,
                       baseline=baseline, n_boot=settings.n_boot, ci=settings.ci,
                       seconds=time.perf_counter() - t0, replicates=reps)


def _hidden_cause_notes(problem: Problem) -> list[str]:
    hidden = [" <-> ".join(sorted(e)) for e in problem.bidirected]
    if not hidden:
        return []
    return ["hidden common causes " + "; ".join(hidden) + (
        ": the impermissible/permissible rows hold the interventional analogue (mediators drawn independently "
        "from their laws given their parents)" if problem.ident.interventional else
        ": each factor conditions on its district (Tian's factorisation) and takes its district's A-value")]


def _baseline(d: Design) -> dict[str, np.ndarray]:
    """E[T | A=a0] per column, for the score and the label."""
    m0 = (d.a == 0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        base = {"score": (d.T * m0).sum(0) / (d.N * m0).sum(0)}
        if d.L is not None:
            base["label"] = (d.L * m0).sum(0) / (d.N * m0).sum(0)
    return base


def _unidentified(means: Means, columns: int) -> Means:
    """The same estimator with every mean NaN (the total effect is not identified)."""
    return replace(means, by_outcome={outcome: {eff: np.full(columns, np.nan) for eff in by_eff}
                                      for outcome, by_eff in means.by_outcome.items()})


def _effect_rows(fitted: Fitted, targets: dict[str, tuple[bool, str]]) -> tuple[list[dict], dict]:
    """One row per (estimator, effect, outcome), the primary estimator's first, and the replicates of each."""
    rank = PRIMARY_ORDER + ("gformula",)
    rows, reps = [], {}
    for m in sorted(fitted.means, key=lambda m: rank.index(m.estimator)):
        base = fitted.base if m.baseline is None else m.baseline
        for eff in EFFECTS:
            effects = {}
            for outcome in ("score", "label"):
                mean = m.by_outcome.get(outcome, {}).get(eff)
                if mean is not None and outcome in fitted.base:
                    effects[outcome] = fitted.replicates(mean - base[outcome])
            if "score" in effects and "label" in effects:
                effects["amplification"] = effects["score"] - effects["label"]
            for outcome, rep in effects.items():
                reps[(outcome, eff, m.estimator)] = rep
                ok, text = targets[eff]
                # a difference of means of a [0, 1] score or label; amplification is a difference of two of them
                bound = 2.0 if outcome == "amplification" else 1.0
                rows.append({"outcome": outcome, "effect": eff, "estimator": m.estimator,
                             **_summarise(rep, fitted.settings.ci, bound),
                             "identified": bool(ok), "target": text})
    return rows, reps


def _diagnostics(fitted: Fitted, notes: list[str], t_design: float, t_fit: float) -> dict[str, Any]:
    p, s = fitted.problem, fitted.settings
    weights = fitted.of("weighting").diagnostics
    warnings = _positivity(p.d, p.meds, p.ident, s.positivity_ratio, s.min_cell)
    for eff, dg in weights.items():
        if dg["n_clipped"]:
            warnings.append(f"{eff}: {dg['n_clipped']} of {dg['n_rows']} reweighted rows had weights above "
                            f"{s.max_weight} (clipped)")
        if dg["n_rows"] and dg["effective_sample_size"] < 0.1 * dg["n_rows"]:
            warnings.append(f"{eff}: effective sample size {dg['effective_sample_size']:.0f} is under 10% of the "
                            f"{dg['n_rows']} reweighted rows")
    return {
        "weights": weights, "gformula": fitted.of("gformula").diagnostics, "notes": notes,
        "positivity_warnings": warnings, "patterns": p.d.k, "max_weight": s.max_weight,
        "timing_s": {"design_and_bootstrap": round(t_design, 3), "estimation": round(t_fit, 3)},
    }


def _bound_rows(coupling: dict, base: dict, ci: float, replicates: ReplicateMap, district: list[str]) -> list[dict]:
    """The bounds of :func:`fairness.gformula.coupling_bounds` as effects (minus the baseline E[T | a0]), each with a ``ci``
    interval for the whole range: the lower bound's lower and the upper bound's upper percentile over the
    replicates (conservative: it covers every value in the range, not only the true one)."""
    rows = []
    for outcome, by_effect in coupling.items():
        for eff, (low, high) in by_effect.items():
            low, high = replicates(low - base[outcome]), replicates(high - base[outcome])
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
            cell = mixed_radix([d.med[:, j]] + d.cov, [len(m.levels)] + [int(c.max()) + 1 for c in d.cov])
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


# --------------------------------------------------------------------------------------------- summaries

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


# --------------------------------------------------------------------------------------------- main entry

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
    frame, levels, a = _compared(frame, spec, levels)
    med_names = ident.mediators
    continuous = [m for m in med_names if frame[spec.column(m)].nunique() > max_mediator_levels]
    if continuous and not robust:
        categorical_var(frame, continuous[0], spec.column(continuous[0]), max_mediator_levels, "mediator")  # raises
    covs = [covariate_var(frame, c, spec.column(c), max_covariate_levels) for c in spec.covariates]
    label, score = _label_and_score(frame, spec)
    if continuous:
        table = _robust_only_table(ident, levels, a, score, label, n_boot, ci)
        table.diagnostics["notes"].append(
            "continuous mediator(s) " + ", ".join(continuous) + ": only the robust estimator (no bins) is given")
    else:
        meds = [categorical_var(frame, m, spec.column(m), max_mediator_levels, "mediator") for m in med_names]
        d = Design.from_rows(a, meds, label, spec.outcome in med_names, covs, score, n_boot, seed)
        settings = Settings(n_boot=n_boot, ci=ci, max_weight=max_weight, gformula_bins=gformula_bins,
                            positivity_ratio=positivity_ratio, min_cell=min_cell,
                            max_gformula_cells=max_gformula_cells)
        table = effects_from_design(Problem(d, spec, ident, meds, covs), levels, settings, t0=t0)
    if robust:
        _add_robust(table, frame, spec, a, seed=seed, ci=ci, learner=robust_learner, folds=robust_folds)
    table.seconds = time.perf_counter() - t0
    return table


def _compared(frame: pd.DataFrame, spec: CausalSpec, levels: tuple[Any, Any] | None
              ) -> tuple[pd.DataFrame, tuple[Any, Any], np.ndarray]:
    """The rows of the two compared levels of A, the levels (default: the spec's reference level, then the other
    one) and A per row (1 = a1)."""
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
    return frame, levels, a


def _label_and_score(frame: pd.DataFrame, spec: CausalSpec) -> tuple[np.ndarray | None, np.ndarray]:
    label = None
    if spec.outcome is not None:
        label = pd.to_numeric(frame[spec.column(spec.outcome)], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(label).any():
            raise EstimationError(f"outcome column '{spec.column(spec.outcome)}' is not numeric")
    score = pd.to_numeric(frame[spec.column(spec.prediction)], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(score).all():
        raise EstimationError(f"score column '{spec.column(spec.prediction)}' has non-numeric or infinite values")
    return label, score


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
