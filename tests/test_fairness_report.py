"""The audit report, DoWhy's checks and the equifed-audit command, and how the
identification output reads an S -> D edge."""

from __future__ import annotations

import base64
from html import escape as html_escape
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fairness import identify, load_graph_spec, run_audit
from fairness.cli import main as audit_main
from fairness.graph import GRAPH_DIR
from fairness.dowhy_checks import independence_tests
from fairness.report import SECTIONS, run_context, write_report
from fairness.results import AuditResult
from simulations.scenario import SiteSpec
from fairness.mitigation import ScoreShiftCorrection
from tests.test_fairness import add_score, f_score, fast_truth


def predictions(site: SiteSpec, n: int, seed: int) -> tuple[pd.DataFrame, dict[str, float]]:
    t = fast_truth(site, n, seed)
    truth = add_score(t, site, seed)
    frame = pd.DataFrame({"group": t.A, "age": t.C, "scanner_legacy": t.S, "label": t.D, "score": t.score,
                          "site": np.where(np.arange(n) % 2 == 0, "north", "south")})
    return frame, truth


@pytest.fixture(scope="module")
def audited():
    frame, truth = predictions(SiteSpec(name="r", p_s_a0=0.2, p_s_a1=0.6), 3000, seed=21)
    audit = run_audit(frame, load_graph_spec("synthetic"), n_boot=100, seed=0, placebo=True, dowhy=True,
                      dowhy_kwargs={"max_rows": 1500, "max_rows_independence": 300, "num_simulations": 8},
                      site_column="site")
    return frame, truth, audit


def test_dowhy_total_effect_refuters_and_independence_tests(audited):
    _frame, truth, audit = audited
    dw = audit.robustness["dowhy"]
    te = dw["total_effect"]
    assert te["status"] == "ok" and te["backdoor_variables"] == [] and te["n_rows"] == 1500
    assert te["estimate"] == pytest.approx(truth["total"], abs=0.03)
    refuters = {r["refuter"]: r for r in te["refuters"]}
    assert abs(refuters["placebo (permuted A)"]["new_effect"]) < 0.02
    assert refuters["random common cause"]["new_effect"] == pytest.approx(te["estimate"], abs=0.01)
    assert all(r["passed"] for r in te["refuters"])
    tests = {t["test"]: t for t in dw["independence_tests"]}
    assert set(tests) == {"A ⫫ S", "A ⫫ D | C", "S ⫫ D | A, C"}
    assert tests["A ⫫ S"]["p_value"] < 1e-3 and tests["A ⫫ S"]["consistent"]
    assert tests["S ⫫ D | A, C"]["p_value"] > 0.05 and tests["S ⫫ D | A, C"]["consistent"]
    # the placebo PSE (our estimator, A permuted) covers 0 while the real one does not
    assert audit.robustness["placebo"]["passed"]
    assert audit.robustness["placebo"]["impermissible"]["ci_low"] <= 0 <= \
        audit.robustness["placebo"]["impermissible"]["ci_high"]
    assert audit.verdict["impermissible_score"]["ci_low"] > 0


def test_independence_test_flags_a_missing_s_to_d_edge():
    frame, _truth = predictions(SiteSpec(name="sd", p_s_a0=0.2, p_s_a1=0.6, beta_s=1.5), 3000, seed=22)
    tests = {t["test"]: t for t in independence_tests(frame, load_graph_spec("synthetic"), max_rows=300)}
    sd = tests["S ⫫ D | A, C"]
    assert sd["p_value"] < 0.01 and not sd["consistent"] and "misses an edge" in sd["reading"]


def test_identification_says_who_is_the_recanting_witness_for_s_to_d():
    spec = load_graph_spec("synthetic")
    plain = identify(spec.with_edges(add=[("S", "D", True)]))
    assert plain.identified and plain.recanting_witnesses == []
    assert plain.notes and "'D' is NOT a recanting witness" in plain.notes[0]
    resolving = identify(spec.with_edges(add=[("S", "D", True)], nodes={"D": {"resolving": True}}))
    assert not resolving.identified and resolving.recanting_witnesses == ["S"]
    assert "'S' (not 'D') is the recanting witness" in resolving.notes[0]
    assert identify(spec).notes == []


def test_report_renders_every_section_with_images(audited, tmp_path):
    frame, _truth, audit = audited
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"round": [1, 2, 2], "phase": ["train"] * 3, "site": ["north", "north", "south"],
                  "epsilon": [1.0, 2.25, 3.5]}).to_csv(run / "per_site.csv", index=False)
    pd.DataFrame({"round": [1, 2], "site": ["north", "north"], "shift": ["none", "covariate"],
                  "p_covariate": [0.5, 0.001]}).to_csv(run / "shift.csv", index=False)
    paths = write_report(audit, tmp_path / "out", context=run_context(run))
    html = paths["html"].read_text()
    for section in SECTIONS:
        assert f"<h2 id='{section}'" in html, section
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 3  # graph, forest plot, group metrics
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "src=\"http" not in html and "<script" not in html  # self-contained
    assert html_escape(audit.verdict["text"]) in html
    assert "IMPERMISSIBLE" in html and "S ⫫ D | A, C" in html and "placebo (permuted A)" in html
    assert "2.2500" in html and "3.5000" in html  # last epsilon per site
    assert "covariate" in html and "0.0010" in html  # latest round of shift.csv only
    assert "<td>north</td><td>ok</td>" in html and "<td>south</td><td>ok</td>" in html  # per-site table
    back = json.loads(paths["json"].read_text())
    assert back["context"]["epsilon"] == {"north": {"epsilon": 2.25}, "south": {"epsilon": 3.5}}
    assert set(back["per_site"]) == {"north", "south"}
    # without a run folder: the sections are there and say what is missing
    bare = write_report(audit, tmp_path / "bare", context=run_context(tmp_path / "empty"))["html"].read_text()
    assert "no shift summary available" in bare and "no per_site.csv" in bare


def test_cli_writes_the_report_and_rejects_bad_input(tmp_path, capsys):
    frame, _ = predictions(SiteSpec(name="c", p_s_a0=0.2, p_s_a1=0.6), 1500, seed=23)
    csv = tmp_path / "preds.csv"
    frame.rename(columns={"score": "prob"}).to_csv(csv, index=False)
    out = tmp_path / "audit"
    rc = audit_main(["--predictions", str(csv), "--graph", "synthetic", "--out", str(out), "--columns",
                     "Yhat=prob", "--n-boot", "50", "--no-dowhy", "--site-column", "site"])
    assert rc == 0
    assert "social-pathway (impermissible) effect" in capsys.readouterr().out
    audit = AuditResult.read(out / "fairness_audit.json")
    assert audit.robustness["placebo"]["passed"] and set(audit.per_site) == {"north", "south"}
    assert (out / "fairness_audit.html").stat().st_size > 10_000

    def fails(args: list[str], message: str) -> None:
        assert audit_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("equifed-audit: error:") and message in err, err

    base = ["--graph", "synthetic", "--out", str(tmp_path / "x"), "--no-dowhy"]
    fails(["--predictions", str(tmp_path / "nope.csv"), *base], "predictions file not found")
    fails(["--predictions", str(csv), *base], "columns missing from the data: 'score' (node Yhat)")
    cyclic = tmp_path / "cyclic.toml"
    cyclic.write_text((GRAPH_DIR / "synthetic.toml").read_text()
                      + '\n[[edges]]\nfrom = "Yhat"\nto = "A"\npermissible = true\n')
    fails(["--predictions", str(csv), "--graph", str(cyclic), "--out", str(tmp_path / "x")], "cycle")
    fails(["--predictions", str(csv), "--graph", "no_such_graph", "--out", str(tmp_path / "x")], "not found")
    # the installed console script, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "fairness.cli", "--predictions", str(csv), "--graph", "synthetic",
                           "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert proc.returncode == 2 and "columns missing" in proc.stderr


def test_cli_fits_the_post_processing_correction(tmp_path, capsys):
    """--fit-correction: the JSON a site applies at inference; the true social effect (rows re-scored with S under
    a1) is gone after it, and the audit's after-estimate says so."""
    site = SiteSpec(name="c", p_s_a0=0.2, p_s_a1=0.7)
    t = fast_truth(site, 4000, 29)
    truth = add_score(t, site, 29)
    frame = pd.DataFrame({"group": t.A, "age": t.C, "scanner_legacy": t.S, "label": t.D, "score": t.score})
    csv, out = tmp_path / "preds.csv", tmp_path / "corr" / "correction.json"
    frame.to_csv(csv, index=False)
    base = ["--predictions", str(csv), "--graph", "synthetic", "--out", str(tmp_path / "audit"), "--n-boot", "50",
            "--no-dowhy", "--no-placebo"]
    assert audit_main(base + ["--fit-correction", str(out)]) == 0
    assert "correction: logit shift" in capsys.readouterr().out
    c = json.loads(out.read_text())
    assert c["mediator_column"] == "scanner_legacy" and c["delta"][0] == 0 and c["delta"][1] > 0
    assert truth["impermissible"] > 0.03 and c["before"]["estimate"] == pytest.approx(truth["impermissible"], abs=0.02)
    assert c["covariate_columns"] == ["age"] and np.shape(c["cell_delta"]) == (2, len(c["covariate_edges"][0]) + 1)
    corr = ScoreShiftCorrection.from_dict(c)
    eps = np.random.default_rng(29 + 99).normal(0.0, 0.5, len(t))  # add_score's noise: the rows' own scores
    a0 = (t.A == 0).to_numpy()
    cf = corr.transform(f_score(t.A, t.S_a1, t.D_S_cf, t.C, eps, 0.0), t.S_a1, c=t.C)
    after_true = float(np.mean((cf - corr.transform(t.score, t.S, c=t.C))[a0]))
    assert abs(after_true) < 0.15 * truth["impermissible"]
    assert c["after"]["ci_low"] < 0 < c["after"]["ci_high"] and abs(c["after"]["estimate"]) < 0.01
    html = (tmp_path / "audit" / "fairness_audit.html").read_text()
    assert "<h2 id='correction'>Post-processing correction</h2>" in html and f"{c['delta'][1]:.4f}" in html
    # a mediator not coded 0..k: a clear error, nothing written
    frame.assign(scanner_legacy=frame.scanner_legacy + 1).to_csv(csv, index=False)
    assert audit_main(base + ["--fit-correction", str(tmp_path / "bad.json")]) == 2
    assert "coded 0..k" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_a_shipped_graph_is_named_by_name_not_by_where_it_was_installed(tmp_path):
    """The consortium's report names the graph a reader can find (the server runs from a temporary install)."""
    assert load_graph_spec("synthetic").source == "synthetic (shipped with equifed: fairness/graphs/synthetic.toml)"
    own = tmp_path / "ours.toml"
    own.write_text((GRAPH_DIR / "synthetic.toml").read_text())
    assert load_graph_spec(own).source == str(own)  # a consortium's own file: its path
