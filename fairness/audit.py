"""One call for the whole audit of a table of predictions: graph checks, identification, effects, group metrics, a
plain-language verdict and optional robustness checks, as an :class:`fairness.results.AuditResult` (what
:mod:`fairness.report` renders)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core_models.jsonable import jsonable
from fairness.graph import CausalSpec, GraphError, load_graph_spec
from fairness.group_metrics import group_metrics
from fairness.pse import EffectTable, estimate_effects
from fairness.results import AuditResult, as_result


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.3f}" if round(x, 3) != 0 else "0.000"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _bounds_sentence(effects: EffectTable) -> str:
    """The bounds on a non-identified impermissible effect (a recanting district's), when they were computed."""
    bound = next((b for b in effects.diagnostics.get("bounds", [])
                  if b["outcome"] == "score" and b["effect"] == "impermissible"), None)
    if bound is None:
        return ""
    return (f" Whatever the dependence between {' and '.join(bound['district'])}, the effect itself is estimated "
            f"to lie between {_fmt(bound['lower'])} and {_fmt(bound['upper'])} ({effects.ci:.0%} CI for that range "
            f"[{_fmt(bound['ci_low'])}, {_fmt(bound['ci_high'])}])"
            + ("; the effect is positive across that interval." if bound["ci_low"] > 0 else
               "; the effect is negative across that interval." if bound["ci_high"] < 0 else "."))


def verdict(effects: EffectTable, alpha: float = 0.05) -> dict[str, Any]:
    """The headline: the impermissible (social-pathway) effect on the score, its CI and test, against the label's."""
    ident = effects.identification
    s = effects.get("impermissible", "score")
    a0, a1 = effects.levels
    sig = bool(s["p_value"] < alpha)
    who = f"{ident.sensitive} ({a0!r} -> {a1!r})"
    ci = f"[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"
    if not ident.identified:
        text = (f"The social-pathway (impermissible) effect of {who} on the score is not identified from these data: "
                + " ".join(ident.reasons))
        alt = ident.identified_alternative[0]["name"] if ident.identified_alternative else None
        tot = effects.get("total", "score")
        if alt and alt != "total effect" and math.isfinite(s["estimate"]):
            text += (f" What is identified instead, the {alt}, is {_fmt(s['estimate'])} ({effects.ci:.0%} CI {ci}, "
                     f"{_p(s['p_value'])}).") + _bounds_sentence(effects)
        elif not ident.total_effect_identified:
            text += " Nothing is estimated: adjusting for the covariates does not remove the confounding."
        elif math.isfinite(tot["estimate"]):
            text += (f" Only the total effect is estimated: {_fmt(tot['estimate'])} ({effects.ci:.0%} CI "
                     f"[{_fmt(tot['ci_low'])}, {_fmt(tot['ci_high'])}]).")
    else:
        text = (f"The social-pathway (impermissible) effect of {who} on the score is {_fmt(s['estimate'])} "
                f"({effects.ci:.0%} CI {ci}, {_p(s['p_value'])}): "
                + ("significant" if sig else "not significant") + f" at the {alpha:g} level.")
    out: dict[str, Any] = {"identified": ident.identified, "significant": sig, "alpha": alpha,
                           "impermissible_score": s}
    try:
        lab = effects.get("impermissible", "label")
        if not math.isfinite(lab["estimate"]):
            raise KeyError("no label estimate")
        amp = effects.get("impermissible", "amplification")
        text += (f" The label's own effect along the same paths is {_fmt(lab['estimate'])} "
                 f"[{_fmt(lab['ci_low'])}, {_fmt(lab['ci_high'])}]; the score's exceeds it by {_fmt(amp['estimate'])} "
                 f"[{_fmt(amp['ci_low'])}, {_fmt(amp['ci_high'])}]"
                 + (" (the model adds social-pathway dependence the label does not have)."
                    if amp["ci_low"] > 0 else "."))
        out["impermissible_label"], out["amplification"] = lab, amp
    except KeyError:
        pass
    if effects.diagnostics.get("uninformative"):
        text += " " + effects.diagnostics["uninformative"]
    warn = effects.diagnostics.get("positivity_warnings", []) + effects.diagnostics.get("graph_checks", [])
    if warn:
        text += f" {len(warn)} warning(s) on positivity or the graph: see diagnostics."
    out["text"] = text
    return out


def _row(effects: EffectTable, effect: str) -> dict[str, Any]:
    r = effects.get(effect)
    return jsonable({k: r[k] for k in ("estimate", "ci_low", "ci_high", "p_value")})


def _decomposition(effects: EffectTable) -> dict[str, Any] | None:
    """TV = ctf-direct - ctf-indirect - ctf-spurious of the score, when the robust estimator ran."""
    try:
        return {e: _row(effects, e) for e in ("tv", "ctf-direct", "ctf-indirect", "ctf-spurious")}
    except KeyError:
        return None


def placebo_check(frame: pd.DataFrame, spec: CausalSpec, *, n_boot: int, seed: int,
                  effects_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PSE with the sensitive column randomly permuted: every effect of the placebo must be null (its CI
    covering 0); one that is not says the estimator finds structure that is not there."""
    col = spec.column(spec.sensitive)
    shuffled = frame.assign(**{col: np.random.default_rng(seed + 7919).permutation(frame[col].to_numpy())})
    eff = estimate_effects(shuffled, spec, n_boot=n_boot, seed=seed, **(effects_kwargs or {}))
    out = {effect: _row(eff, effect) for effect in ("impermissible", "total")}
    for r in out.values():
        r["covers_zero"] = bool(r["ci_low"] is not None and r["ci_low"] <= 0 <= r["ci_high"])
    out["passed"] = all(r["covers_zero"] for r in out.values())
    return out


def per_site_effects(frame: pd.DataFrame, spec: CausalSpec, site_column: str, *, n_boot: int, seed: int,
                     effects_kwargs: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each site's impermissible and total effect on the score (the forest plot's rows); a site whose data do not
    allow the estimate (one group missing, ...) says why."""
    if site_column not in frame.columns:
        raise GraphError(f"site column '{site_column}' not in the data (columns: {', '.join(map(str, frame.columns))})")
    out = {}
    for name, sub in frame.groupby(site_column, sort=True):
        try:
            eff = estimate_effects(sub, spec, n_boot=n_boot, seed=seed, **(effects_kwargs or {}))
        except (GraphError, np.linalg.LinAlgError, ValueError) as err:
            out[str(name)] = {"status": f"not estimable: {err}"}
            continue
        out[str(name)] = {"status": "ok", "n": eff.n, "impermissible": _row(eff, "impermissible"),
                          "total": _row(eff, "total"), "decomposition": _decomposition(eff)}
    return out


def run_audit(frame: pd.DataFrame, spec: CausalSpec | str | Path, *, n_boot: int = 200, seed: int = 0,
              specificity: float = 0.8, alpha: float = 0.05, effects_kwargs: dict[str, Any] | None = None,
              metrics_kwargs: dict[str, Any] | None = None, placebo: bool = False, dowhy: bool = False,
              dowhy_kwargs: dict[str, Any] | None = None, site_column: str | None = None) -> AuditResult:
    """Audit one table of predictions (a column per observed node of ``spec``): ``spec``, ``data``, ``warnings``,
    ``paths``, ``identification``, ``effects`` (see :class:`EffectTable`), ``group_metrics`` (see
    :class:`GroupMetrics`), ``verdict`` and ``timing_s``; with ``placebo`` the permuted-A check, with ``dowhy``
    DoWhy's total effect, refuters and independence tests (:mod:`fairness.dowhy_checks`), with ``site_column`` each
    site's effects (``per_site``)."""
    t0 = time.perf_counter()
    if not isinstance(spec, CausalSpec):
        spec = load_graph_spec(spec)
    warnings = spec.validate(frame)
    effects = estimate_effects(frame, spec, n_boot=n_boot, seed=seed, **(effects_kwargs or {}))
    t1 = time.perf_counter()
    gm = group_metrics(frame, spec, specificity=specificity, **(metrics_kwargs or {})) if spec.outcome else None
    t2 = time.perf_counter()
    robustness: dict[str, Any] = {}
    if placebo:
        robustness["placebo"] = placebo_check(frame, spec, n_boot=n_boot, seed=seed, effects_kwargs=effects_kwargs)
    if dowhy:
        from fairness.dowhy_checks import dowhy_checks

        robustness["dowhy"] = dowhy_checks(frame, spec, levels=effects.levels, seed=seed, alpha=alpha,
                                           **(dowhy_kwargs or {}))
    per_site = None
    if site_column:
        per_site = per_site_effects(frame, spec, site_column, n_boot=min(n_boot, 100), seed=seed,
                                    effects_kwargs=effects_kwargs)
    t3 = time.perf_counter()
    eff = effects.to_dict()
    eff["decomposition"] = _decomposition(effects)
    return AuditResult(
        mode="pooled", spec=spec.to_dict(), spec_source=spec.source,
        data={"n_rows": int(len(frame)), "n_by_group": effects.n, "levels": eff["levels"]},
        warnings=warnings,
        paths=[p.to_dict() for p in effects.identification.paths],
        identification=eff.pop("identification"),
        effects=eff,
        group_metrics=gm.to_dict() if gm is not None else None,
        verdict=verdict(effects, alpha),
        robustness=robustness,
        per_site=per_site,
        timing_s={"effects": round(t1 - t0, 3), "group_metrics": round(t2 - t1, 3),
                  "robustness_and_sites": round(t3 - t2, 3), "total": round(time.perf_counter() - t0, 3)},
    )


def write_audit_json(audit: AuditResult | dict[str, Any], path: str | Path) -> Path:
    """Write an audit as strict JSON (NaN written as null)."""
    return as_result(audit).write(path)
