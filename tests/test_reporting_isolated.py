"""A run is never lost to its reporting: a failing analyser is recorded and the round goes on; the forest plot
draws every degenerate effect row."""

import math

from fairness.report import forest_figure
from fairness.results import AuditResult
from server.analysers import ANALYSERS, analyse
from server.site_statistics import SiteRelease


def test_a_failing_analyser_is_recorded_and_the_others_still_run(tmp_path):
    ran = []
    ANALYSERS["test-boom"] = lambda out, rnd, releases, cfg: (_ for _ in ()).throw(ValueError("xerr negative"))
    ANALYSERS["test-fine"] = lambda out, rnd, releases, cfg: ran.append(rnd)
    try:
        releases = [SiteRelease("a", "ok", {"test-boom": {}, "test-fine": {}})]
        failed = analyse(tmp_path, 3, releases, {}, ["test-boom", "test-fine"])
    finally:
        del ANALYSERS["test-boom"], ANALYSERS["test-fine"]
    assert failed == {"test-boom": "ValueError: xerr negative"}
    assert ran == [3]  # the analyser after the failing one still ran
    log = (tmp_path / "analysis_errors.log").read_text()
    assert "round 3: test-boom" in log and "Traceback" in log


def test_forest_plot_draws_degenerate_effects():
    def row(effect, est, lo, hi):
        return {"estimator": "weighting", "outcome": "score", "effect": effect, "estimate": est, "ci_low": lo,
                "ci_high": hi}

    effects = {"effects": [
        row("zero by construction", 1e-17, 0.0, 0.0),  # the estimate a rounding error outside its interval
        row("zero width", 0.1, 0.1, 0.1),
        row("no interval", 0.2, None, None),
        row("infinite bound", 0.1, -math.inf, 0.3),
        row("nan bound", 0.1, math.nan, 0.2),
        row("nan estimate", math.nan, 0.0, 1.0),
    ]}
    audit = AuditResult(mode="pooled", spec={}, spec_source="", data={}, warnings=[], paths=[], identification={},
                        effects=effects, group_metrics=None, verdict={},
                        per_site={"s": {"status": "ok", "impermissible": {"estimate": -1e-17, "ci_low": 0.0,
                                                                          "ci_high": 0.0}}})
    png = forest_figure(audit)
    assert isinstance(png, str) and len(png) > 1000
