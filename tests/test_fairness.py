"""Causal fairness audit: graph specs and their errors, identification (recanting witnesses), path-specific effect
estimators against the generator's counterfactual truth, fairlearn group metrics, the audit dict.

The score is a known function f(A, S, D, C, noise) of the generator's structural rows (no images, no CNN), so the true
effects follow from evaluating f at the counterfactual mediators the generator provides (S_a1: S under A=1 with the
same U_S; D_S_cf: D with S switched, same U_D)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from fairness import (
    CycleError,
    MissingColumnError,
    RoleError,
    SpecError,
    estimate_effects,
    group_metrics,
    identify,
    load_graph_spec,
    run_audit,
)
from fairness.audit import verdict
from fairness.graph import CausalSpec
from simulations.generator import causal_rates, sample_truth, structural_rows
from simulations.scenario import SiteSpec

TRUTH_COLUMNS = {"A": "A", "C": "C", "S": "S", "D": "D"}


@pytest.fixture(scope="module")
def spec() -> CausalSpec:
    return load_graph_spec("synthetic").with_columns(TRUTH_COLUMNS)


def f_score(a, s, d, c, eps, gamma=0.0):
    """The synthetic model's score: depends on the disease, the scanner (the social shortcut), age, optionally A."""
    return expit(1.5 * d + 0.8 * s + 0.2 * (c - 55) / 15 + gamma * a - 1.0 + eps)


def fast_truth(site: SiteSpec, n: int, seed: int) -> pd.DataFrame:
    """The generator's structural equations on vectorised exogenous draws (sample_truth draws per patient: slow)."""
    rng = np.random.default_rng(seed)
    exo = pd.DataFrame({k: rng.random(n) for k in ("u_source", "U_A", "U_S", "U_D", "u_sex")})
    exo["z_age"] = rng.standard_normal(n)
    return structural_rows(site, exo, causal_rates(site)["base_logit"])


def add_score(t: pd.DataFrame, site: SiteSpec, seed: int, gamma: float = 0.0) -> dict[str, float]:
    """Score the rows; return the true effects in the reference group (mean over A=0 rows of f(counterfactual) − f)."""
    eps = np.random.default_rng(seed + 99).normal(0.0, 0.5, len(t))
    t["score"] = f_score(t.A, t.S, t.D, t.C, eps, gamma)
    a0 = (t.A == 0).to_numpy()
    b0 = float(t.base_logit.iloc[0])

    def d_under(a, s):  # D with A and S set, same U_D
        return (t.U_D < expit(b0 + site.beta_a * a + site.beta_c * (t.C - 55) / 15 + site.beta_s * s)).astype(int)

    def effect(a, s, d):
        return float(np.mean((f_score(a, s, d, t.C, eps, gamma) - t.score)[a0]))

    return {
        # A -> S switched, everything downstream follows (D_S_cf = D under the switched S)
        "impermissible": effect(t.A, t.S_a1, t.D_S_cf),
        "permissible": effect(t.A, t.S, d_under(1, t.S)),
        "direct": effect(1, t.S, t.D),
        "total": effect(1, t.S_a1, d_under(1, t.S_a1)),
    }


# ------------------------------------------------------------------------------------------------- graph spec

def test_spec_classifies_the_generator_paths_and_projects_the_image_away(spec):
    paths = {str(p): p for p in spec.classify_paths()}
    assert set(paths) == {"A -> D -> X -> Yhat", "A -> S -> X -> Yhat"}
    assert paths["A -> D -> X -> Yhat"].permissible
    assert not paths["A -> S -> X -> Yhat"].permissible
    assert paths["A -> S -> X -> Yhat"].impermissible_edges == (("A", "S"),)
    assert {p.entry for p in paths.values()} == {"S", "D"}
    proj, bidirected = spec.projection()
    assert set(proj.edges) == {("A", "S"), ("A", "D"), ("C", "D"), ("S", "Yhat"), ("D", "Yhat")}
    assert bidirected == []
    assert spec.mediators() == ["S", "D"] or spec.mediators() == ["D", "S"]
    # round trip through the TOML-shaped dict
    again = CausalSpec.from_dict(spec.to_dict())
    assert [str(p) for p in again.classify_paths()] == [str(p) for p in spec.classify_paths()]
    # a manifest-shaped frame validates against the shipped spec
    manifest = pd.DataFrame({"group": [0, 1, 0], "age": [40, 50, 60], "scanner_legacy": [0, 1, 1],
                             "label": [0, 1, 0], "score": [0.1, 0.8, 0.3]})
    assert load_graph_spec("synthetic").validate(manifest) == []


def test_resolving_node_changes_only_paths_through_it(spec):
    sp = spec.with_edges(add=[("S", "D", True)])
    cls = {str(p): p.permissible for p in sp.classify_paths()}
    assert cls["A -> S -> D -> X -> Yhat"] is False  # contains A -> S
    res = sp.with_edges(nodes={"D": {"resolving": True}})
    cls = {str(p): p.permissible for p in res.classify_paths()}
    assert cls == {"A -> D -> X -> Yhat": True, "A -> S -> D -> X -> Yhat": True, "A -> S -> X -> Yhat": False}


def test_cycle_error_names_the_cycle(spec):
    with pytest.raises(CycleError) as exc:
        spec.with_edges(add=[("S", "D", True), ("D", "S", True)])
    msg = str(exc.value)
    assert "cycle: S -> D -> S" in msg or "cycle: D -> S -> D" in msg
    assert set(exc.value.cycle) == {"S", "D"} and exc.value.cycle[0] == exc.value.cycle[-1]
    with pytest.raises(CycleError, match=r"cycle: (X -> S -> X|S -> X -> S)"):
        spec.with_edges(add=[("X", "S", True)])


def test_role_and_key_errors_name_what_is_wrong(spec):
    raw = spec.to_dict()
    raw["nodes"]["Yhat"]["role"] = "mediator"
    with pytest.raises(RoleError, match="no node has role 'prediction'"):
        CausalSpec.from_dict(raw)
    raw = spec.to_dict()
    raw["nodes"]["C"]["role"] = "sensitive"
    with pytest.raises(RoleError, match=r"2 nodes have role 'sensitive': A, C"):
        CausalSpec.from_dict(raw)
    with pytest.raises(RoleError, match=r"covariate 'C' is a descendant .*A -> C"):
        spec.with_edges(add=[("A", "C", True)])
    raw = spec.to_dict()
    del raw["edges"][0]["permissible"]  # A -> D
    with pytest.raises(SpecError, match=r"edge A -> D leaves the sensitive node.*edges\[0\]\.permissible"):
        CausalSpec.from_dict(raw)
    with pytest.raises(SpecError, match="unknown node 'Q'"):
        spec.with_edges(add=[("Q", "D", True)])
    raw = spec.to_dict()
    raw["nodes"]["S"]["colour"] = "red"
    with pytest.raises(SpecError, match="unknown key 'nodes.S.colour'"):
        CausalSpec.from_dict(raw)
    with pytest.raises(SpecError, match="has role 'covariate' but no 'column'"):
        spec.with_edges(nodes={"Z": {"role": "covariate"}})


def test_missing_columns_are_named(spec):
    frame = pd.DataFrame({"A": [0, 1], "C": [50, 60], "D": [0, 1]})
    with pytest.raises(MissingColumnError) as exc:
        spec.validate(frame)
    assert exc.value.missing == {"S": "S", "Yhat": "score"}
    assert "'S' (node S)" in str(exc.value) and "'score' (node Yhat)" in str(exc.value)
    bad_ref = pd.DataFrame({"A": [1, 2], "C": [50, 60], "S": [0, 1], "D": [0, 1], "score": [0.2, 0.4]})
    with pytest.raises(Exception, match="reference level 0 not found"):
        spec.validate(bad_ref)


# ------------------------------------------------------------------------------------------------- identification

def test_generator_graph_is_identified_with_the_mediation_formula(spec):
    ident = identify(spec)
    assert ident.identified and ident.recanting_witnesses == []
    assert ident.entries == {"S": "impermissible", "D": "permissible"}
    assert ident.switch["impermissible"] == {"S": 1, "D": 0} and ident.outcome_world["impermissible"] == 0
    assert "p(s | A=a1, c) · p(d | A=a0, c)" in ident.estimands["impermissible"]
    assert "Positivity" in ident.positivity and "(S)" in ident.positivity
    # S -> D under the default rule: A -> S -> D -> ... is impermissible too; still an edge effect, identified
    ident = identify(spec.with_edges(add=[("S", "D", True)]))
    assert ident.identified and ident.recanting_witnesses == []
    assert "p(d | A=a0, s, c)" in ident.estimands["impermissible"]


def test_recanting_witness_is_reported_and_named(spec):
    # S -> D with the disease resolving: A -> S -> X -> Yhat impermissible, A -> S -> D -> X -> Yhat permissible
    ident = identify(spec.with_edges(add=[("S", "D", True)], nodes={"D": {"resolving": True}}))
    assert not ident.identified
    assert ident.recanting_witnesses == ["S"]
    assert ident.witness_paths["S"] == {"impermissible": "A -> S -> X -> Yhat",
                                        "permissible": "A -> S -> D -> X -> Yhat"}
    names = [a["name"] for a in ident.identified_alternative]
    assert names[:2] == ["edge effect of A -> S", "total effect"]
    assert "NOT identified" in ident.summary() and "'S' is a recanting witness" in ident.summary()
    # D is the witness when the disease feeds the social mediator along an impermissible edge
    ident = identify(spec.with_edges(add=[("D", "S", False)]))
    assert not ident.identified and ident.recanting_witnesses == ["D"]
    # an unmeasured common cause of S and D: a recanting district, not a witness
    ident = identify(spec.with_edges(add=[("U", "S", True), ("U", "D", True)], nodes={"U": {"role": "latent"}}))
    assert not ident.identified and ident.recanting_witnesses == [] and ident.recanting_districts == [["D", "S"]]
    # the same latent cause of S and A: not even the total effect
    ident = identify(spec.with_edges(add=[("U", "S", True), ("U", "A", True)], nodes={"U": {"role": "latent"}}))
    assert not ident.total_effect_identified


# ------------------------------------------------------------------------------------------------- estimation

@pytest.fixture(scope="module")
def large_run(spec):
    site = SiteSpec(name="hosp_a", p_s_a0=0.2, p_s_a1=0.6, beta_a=0.5)
    t = sample_truth(site, seed=11, n=20_000)
    truth = add_score(t, site, seed=11)
    return t, truth, estimate_effects(t, spec, n_boot=200, seed=0)


def test_both_estimators_recover_the_true_effects_on_large_n(large_run):
    _t, truth, eff = large_run
    assert truth["impermissible"] > 0.03  # the score really uses the scanner
    for effect in ("impermissible", "permissible", "total"):
        for estimator in ("weighting", "gformula"):
            assert abs(eff.estimate(effect, "score", estimator) - truth[effect]) <= 0.01, (effect, estimator)
    assert abs(eff.estimate("direct")) <= 0.01
    imp = eff.get("impermissible")
    assert imp["identified"] and imp["ci_low"] > 0 and imp["p_value"] < 1e-6
    assert eff.diagnostics["weights"]["impermissible"]["n_clipped"] == 0
    assert eff.diagnostics["positivity_warnings"] == [] and eff.diagnostics["graph_checks"] == []


def test_a_recanting_witness_verdict_gives_the_edge_effect_only(large_run, spec):
    """The verdict of a non-identified effect names what is estimated instead, once, and nothing after it."""
    t, _, _ = large_run
    witness = spec.with_edges(add=[("S", "D", True)], nodes={"D": {"resolving": True}})
    text = verdict(estimate_effects(t, witness, n_boot=20, seed=0))["text"]
    assert "What is identified instead, the edge effect of A -> S, is" in text
    assert "Only the total effect" not in text and "to lie between" not in text


def test_label_has_no_social_effect_while_the_score_does(large_run):
    _t, _truth, eff = large_run
    lab = eff.get("impermissible", "label")
    assert abs(lab["estimate"]) < 0.01 and lab["ci_low"] <= 0 <= lab["ci_high"]
    assert eff.get("impermissible", "amplification")["ci_low"] > 0.02
    # the permissible (biological) effect is what the label carries
    assert eff.estimate("permissible", "label") > 0.05


def test_s_to_d_and_a_direct_path_are_recovered(spec):
    site = SiteSpec(name="hosp_b", p_s_a0=0.2, p_s_a1=0.6, beta_s=1.2)
    t = fast_truth(site, 40_000, seed=5)
    truth = add_score(t, site, seed=5, gamma=0.3)
    full = spec.with_edges(add=[("S", "D", True), ("A", "X", True)])
    eff = estimate_effects(t, full, n_boot=50, seed=1)
    for effect in ("impermissible", "direct", "total"):
        for estimator in ("weighting", "gformula"):
            assert abs(eff.estimate(effect, "score", estimator) - truth[effect]) <= 0.01, (effect, estimator)
    assert eff.diagnostics["graph_checks"] == []
    # the generator's graph (no S -> D, no A -> X) on the same data: the graph checks notice
    wrong = estimate_effects(t, spec, n_boot=50, seed=1)
    checks = " ".join(wrong.diagnostics["graph_checks"])
    assert "impermissible: weighting" in checks and "disagree" in checks
    assert "direct effect on the score" in checks and "label's impermissible effect" in checks


def test_ci_coverage_over_seeds(spec):
    site = SiteSpec(name="hosp_c", p_s_a0=0.2, p_s_a1=0.5)
    big = fast_truth(site, 1_000_000, seed=1234)
    population = add_score(big, site, seed=1234)["impermissible"]
    covered, biases = 0, []
    for seed in range(30):
        t = fast_truth(site, 2_000, seed=seed)
        add_score(t, site, seed=seed)
        imp = estimate_effects(t, spec, n_boot=200, seed=seed).get("impermissible")
        covered += imp["ci_low"] <= population <= imp["ci_high"]
        biases.append(imp["estimate"] - population)
    assert 0.85 <= covered / 30 <= 1.0
    assert abs(np.mean(biases)) < 0.005


def test_no_social_effect_gives_a_null_pse(spec):
    site = SiteSpec(name="hosp_d", p_s_a0=0.3, p_s_a1=0.3)
    t = fast_truth(site, 5_000, seed=3)
    assert abs(add_score(t, site, seed=3)["impermissible"]) < 1e-12  # S_a1 == S: the true PSE is exactly 0
    imp = estimate_effects(t, spec, n_boot=200, seed=0).get("impermissible")
    assert imp["ci_low"] <= 0 <= imp["ci_high"] and imp["p_value"] > 0.05


def test_placebo_permuted_group_gives_null_effects(spec):
    site = SiteSpec(name="hosp_e", p_s_a0=0.1, p_s_a1=0.7)
    t = fast_truth(site, 5_000, seed=4)
    add_score(t, site, seed=4)
    real = estimate_effects(t, spec, n_boot=100, seed=0)
    assert real.get("impermissible")["ci_low"] > 0.02
    t["A"] = np.random.default_rng(0).permutation(t["A"].to_numpy())
    placebo = estimate_effects(t, spec, n_boot=200, seed=0)
    for effect in ("impermissible", "total"):
        row = placebo.get(effect)
        assert row["ci_low"] <= 0 <= row["ci_high"], effect


def test_positivity_problems_are_reported(spec):
    site = SiteSpec(name="hosp_f", p_s_a0=0.01, p_s_a1=0.95)
    t = fast_truth(site, 4_000, seed=6)
    add_score(t, site, seed=6)
    eff = estimate_effects(t, spec, n_boot=20, seed=0, max_weight=20.0)
    warns = " ".join(eff.diagnostics["positivity_warnings"])
    assert "S=1 (column 'S')" in warns and "positivity is doubtful" in warns
    w = eff.diagnostics["weights"]["impermissible"]
    assert w["n_clipped"] > 0 and f"{w['n_clipped']} of" in warns
    assert w["effective_sample_size"] < 0.2 * w["n_rows"]


# ------------------------------------------------------------------------------------------------- group metrics

def test_group_metrics_through_metricframe(large_run, spec):
    t, _truth, _eff = large_run
    gm = group_metrics(t, spec)
    assert list(gm.by_group.index) == [0, 1]
    assert gm.by_group["count"].sum() == len(t)
    for g in (0, 1):
        sub = t[t.A == g]
        assert gm.by_group.loc[g, "auroc"] == pytest.approx(roc_auc_score(sub.D, sub.score), abs=1e-12)
        pos = sub.score[sub.D == 1]
        assert gm.by_group.loc[g, "fnr"] == pytest.approx(np.mean(pos <= gm.threshold), abs=1e-12)
        assert gm.summary["worst_group_auroc"] <= gm.by_group.loc[g, "auroc"]
    assert gm.summary["auroc_gap"] == pytest.approx(gm.by_group.auroc.max() - gm.by_group.auroc.min())
    assert gm.summary["realised_specificity"] == pytest.approx(0.8, abs=1e-3)
    assert gm.by_group["tpr"].add(gm.by_group["fnr"]).tolist() == pytest.approx([1.0, 1.0])
    # within strata of the permissible mediator (the disease): TPR only where D=1, FPR only where D=0
    assert gm.control_features == ["D"]
    assert gm.controlled.loc[(1, 0), "tpr"] == pytest.approx(gm.by_group.loc[0, "tpr"])
    assert np.isnan(gm.controlled.loc[(0, 0), "tpr"]) and np.isnan(gm.controlled.loc[(1, 1), "fpr"])


# ------------------------------------------------------------------------------------------------- the audit

def test_run_audit_is_json_and_states_a_verdict(large_run, spec):
    t, _truth, eff = large_run
    audit = run_audit(t, spec, n_boot=50)
    text = json.dumps(audit.to_json(), allow_nan=False)
    back = json.loads(text)
    assert back["identification"]["identified"] is True
    assert {r["effect"] for r in back["effects"]["effects"]} == {"total", "impermissible", "permissible", "direct",
                                                                 "tv", "ctf-direct", "ctf-indirect", "ctf-spurious"}
    assert {r["estimator"] for r in back["effects"]["effects"]} == {"robust", "weighting", "gformula"}
    assert back["verdict"]["significant"] is True
    assert f"{eff.estimate('impermissible'):+.3f}" in back["verdict"]["text"]
    assert back["group_metrics"]["summary"]["worst_group_auroc"] <= min(
        r["auroc"] for r in back["group_metrics"]["by_group"])


def test_fairness_imports_without_flower():
    code = ("import sys, fairness; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('flwr', 'server', 'client', 'torch')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
