"""equifed: causal fairness audit of a model's scores. Imports no Flower code.

Public API::

    from fairness import load_graph_spec, identify, estimate_effects, group_metrics, run_audit

    spec = load_graph_spec("synthetic")            # fairness/graphs/synthetic.toml, or any path
    warnings = spec.validate(frame)                # columns exist, no missing values, two groups
    spec.classify_paths()                          # every A -> ... -> Ŷ path, permissible or not
    ident = identify(spec)                         # .identified, .recanting_witnesses, .identified_alternative,
                                                   # .assumptions, .positivity, .estimands
    effects = estimate_effects(frame, spec, n_boot=200, seed=0)
    effects.table                                  # outcome (score|label|amplification) x effect (total|
                                                   # impermissible|permissible|direct) x estimator (weighting|
                                                   # gformula): estimate, ci_low, ci_high, se, p_value, identified
    effects.get("impermissible")                   # the score's social-pathway effect, weighting estimator
    effects.diagnostics                            # effective sample sizes, clipped weights, positivity warnings,
                                                   # graph checks (testable implications)
    gm = group_metrics(frame, spec)                # fairlearn MetricFrame: by_group, summary (worst-group AUROC,
                                                   # gaps at specificity 0.8), controlled (within permissible
                                                   # mediator strata)
    audit = run_audit(frame, spec)                 # all of it as a read-only AuditResult (.verdict, .effects,
                                                   # ...; .to_json(), .write(path), AuditResult.read(path))

    audit = run_audit(frame, spec, placebo=True, dowhy=True, site_column="site")   # + robustness, per site
    write_report(audit, "out/")                    # fairness_audit.html (self-contained) + fairness_audit.json

Modules: :mod:`fairness.graph` (spec, validation, paths, projection; errors :class:`GraphError`,
:class:`SpecError`, :class:`CycleError`, :class:`RoleError`, :class:`MissingColumnError`),
:mod:`fairness.identification` (recanting witness / district criterion), :mod:`fairness.pse` (the effect table
from its parts: :mod:`fairness.design` (the rows as codes), :mod:`fairness.nuisance` (the small regressions),
:mod:`fairness.weighting`, :mod:`fairness.gformula` (cell and smoothed), :mod:`fairness.replicates` (bootstrap or
linearised replicates)), :mod:`fairness.group_metrics`, :mod:`fairness.audit`, :mod:`fairness.results` (the audit's result), :mod:`fairness.dowhy_checks` (DoWhy total effect,
refuters, kernel independence tests), :mod:`fairness.federated` (the audit from per-site DP-noised cell
statistics), :mod:`fairness.report` (HTML + JSON) and :mod:`fairness.cli` (``equifed-audit``).
"""

from fairness.audit import run_audit, verdict, write_audit_json
from fairness.results import AuditResult
from fairness.graph import (
    CausalPath,
    CausalSpec,
    CycleError,
    GraphError,
    MissingColumnError,
    RoleError,
    SpecError,
    load_graph_spec,
)
from fairness.group_metrics import GroupMetrics, group_metrics
from fairness.identification import Identification, identify
from fairness.pse import EffectTable, EstimationError, estimate_effects

__all__ = [
    "CausalPath", "CausalSpec", "CycleError", "EffectTable", "EstimationError", "GraphError", "GroupMetrics",
    "Identification", "MissingColumnError", "RoleError", "SpecError", "estimate_effects", "group_metrics",
    "AuditResult", "identify", "load_graph_spec", "run_audit", "verdict", "write_audit_json", "write_report",
]


def __getattr__(name: str):
    # the report pulls in matplotlib (about a second): loaded when asked for, not by every process that
    # imports a part of this package (a ClientApp task reads only the audit's statistics)
    if name == "write_report":
        from fairness.report import write_report

        return write_report
    raise AttributeError(f"module 'fairness' has no attribute {name!r}")
