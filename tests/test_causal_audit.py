"""The audit on structural models whose effects are known: identification with hidden common causes, the robust
estimator (continuous mediators, strong confounding), the TV decomposition and E-values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fairness import estimate_effects, identify, run_audit
from fairness.report import render_html
from fairness.robust import e_value
from simulations.causal_models import MODELS, StructuralModel, sample, true_effects


@pytest.fixture(scope="module")
def truths():
    return {name: true_effects(m, n=400_000, seed=3) for name, m in MODELS.items()}


def test_hidden_cause_of_a_and_the_covariate_is_adjusted_for():
    ident = identify(MODELS["latent_a_c"].spec())
    assert ident.identified and ident.total_effect_identified
    assert not ident.reasons


def test_hidden_cause_of_scanner_and_image_moves_the_outcome_regression_to_the_a1_world(truths):
    spec = MODELS["latent_s_image"].spec()
    ident = identify(spec)
    assert ident.identified
    assert ident.outcome_world["impermissible"] == 1 and ident.factor_world["impermissible"]["D"] == 0
    assert "E[Yhat | A=a1" in ident.estimands["impermissible"]
    assert not ident.effect_identified["direct"]  # S(a0) and Yhat(a1) would share a district
    frame = sample(MODELS["latent_s_image"], 20_000, np.random.default_rng(11))
    eff = estimate_effects(frame, spec, n_boot=50, seed=0)
    truth = truths["latent_s_image"]["impermissible"]
    robust = eff.get("impermissible", estimator="robust")
    assert robust["estimate"] == pytest.approx(truth, abs=0.006)
    assert robust["ci_low"] <= truth <= robust["ci_high"]
    # the Markovian formula (the hidden cause left out of the graph) is biased by more than that
    markov = StructuralModel(name="no_latent").spec()
    wrong = estimate_effects(frame, markov, n_boot=20, seed=0).estimate("impermissible", estimator="robust")
    assert abs(wrong - truth) > 2 * abs(robust["estimate"] - truth) and abs(wrong - truth) > 0.008


def test_recanting_district_is_named_and_its_interventional_analogue_estimated(truths):
    spec = MODELS["latent_s_d"].spec()
    ident = identify(spec)
    assert not ident.identified and ident.total_effect_identified and ident.interventional
    assert ident.recanting_districts == [["D", "S"]]
    assert ident.identified_alternative[0]["name"] == "interventional analogue"
    frame = sample(MODELS["latent_s_d"], 20_000, np.random.default_rng(5))
    audit = run_audit(frame, spec, n_boot=50)
    rows = {r["estimator"]: r for r in audit.effects["effects"]
            if r["effect"] == "impermissible" and r["outcome"] == "score"}
    truth = truths["latent_s_d"]["interventional"]
    for estimator in ("robust", "gformula"):  # the influence-function form and the plug-in
        assert rows[estimator]["estimate"] == pytest.approx(truth, abs=0.006), estimator
        assert rows[estimator]["identified"] is False and "interventional analogue" in rows[estimator]["target"]
    assert rows["robust"]["ci_low"] <= truth <= rows["robust"]["ci_high"]
    assert "interventional analogue" in audit.verdict["text"] and "recanting district" in audit.verdict["text"]
    assert f"{rows['robust']['estimate']:+.3f}" in audit.verdict["text"]


def test_a_recanting_district_bounds_the_pse_itself(truths):
    """The PSE of a recanting district is bounded over every coupling of S(a1) and D(a0) that the two identified
    laws allow: the range holds the true PSE (S and D share a hidden cause) and the interventional analogue (the
    independent coupling); it is one point when the score is additive in S and D and wide when it is their
    product, and the verdict states it."""
    m = MODELS["latent_s_d"]
    frame = sample(m, 20_000, np.random.default_rng(5))
    audit = run_audit(frame, m.spec(), n_boot=50)
    bounds = {(b["outcome"], b["effect"]): b for b in audit.effects["diagnostics"]["bounds"]}
    imp = bounds[("score", "impermissible")]
    assert imp["district"] == ["D", "S"]
    analogue = next(r for r in audit.effects["effects"] if r["effect"] == "impermissible"
                    and r["outcome"] == "score" and r["estimator"] == "gformula")["estimate"]
    assert imp["ci_low"] <= imp["lower"] <= analogue <= imp["upper"] <= imp["ci_high"]
    truth = truths["latent_s_d"]
    for effect in ("impermissible", "permissible"):
        b = bounds[("score", effect)]
        assert b["ci_low"] <= truth[effect] <= b["ci_high"], (effect, b, truth[effect])
    assert f"to lie between {imp['lower']:+.3f} and {imp['upper']:+.3f}" in audit.verdict["text"]
    assert "Only the total effect" not in audit.verdict["text"]
    html = render_html(audit)
    assert "Bounds on the path-specific effects" in html and f"<td>{imp['upper']:.4f}</td>" in html

    def bounds_for(score: np.ndarray) -> dict:
        eff = estimate_effects(frame.assign(score=score), m.spec(), n_boot=10, seed=0)
        b = next(b for b in eff.diagnostics["bounds"] if b["outcome"] == "score" and b["effect"] == "impermissible")
        return {**b, "analogue": eff.estimate("impermissible", estimator="gformula")}

    s, d = frame["S"].to_numpy(float), frame["D"].to_numpy(float)
    additive = bounds_for(0.2 + 0.3 * s + 0.2 * d)
    assert additive["lower"] == pytest.approx(additive["upper"], abs=1e-9)
    assert additive["lower"] == pytest.approx(additive["analogue"], abs=1e-9)
    product = bounds_for(s * d)
    assert product["upper"] - product["lower"] > 0.05
    assert product["lower"] < product["analogue"] < product["upper"]


def test_continuous_mediator_is_estimated_without_bins(truths):
    m = MODELS["continuous_s"]
    frame = sample(m, 8_000, np.random.default_rng(2))
    assert frame["S"].nunique() == len(frame)
    eff = estimate_effects(frame, m.spec(), n_boot=20, seed=0)
    assert set(eff.table.estimator) == {"robust"}
    for effect in ("impermissible", "permissible", "total"):
        r = eff.get(effect)
        assert r["estimate"] == pytest.approx(truths["continuous_s"][effect], abs=0.015), effect
        assert 0 < r["ci_high"] - r["ci_low"] < 0.08


def test_strong_confounding_biases_the_binned_gformula_not_the_robust_estimator(truths):
    m = MODELS["strong_c"]
    frame = sample(m, 20_000, np.random.default_rng(9))
    eff = estimate_effects(frame, m.spec(), n_boot=20, seed=0)
    truth = truths["strong_c"]
    assert eff.estimate("total", estimator="robust") == pytest.approx(truth["total"], abs=0.006)
    assert eff.estimate("impermissible", estimator="robust") == pytest.approx(truth["impermissible"], abs=0.004)
    assert eff.estimate("total", estimator="gformula") - truth["total"] > 0.02  # C in 4 bins


def test_robust_intervals_cover_over_replications(truths):
    m = MODELS["markovian"]
    truth = truths["markovian"]["impermissible"]
    covered, estimates = [], []
    for r in range(20):
        frame = sample(m, 1_500, np.random.default_rng(500 + r))
        row = estimate_effects(frame, m.spec(), n_boot=20, seed=r).get("impermissible", estimator="robust")
        covered.append(row["ci_low"] <= truth <= row["ci_high"])
        estimates.append(row["estimate"])
    assert np.mean(covered) >= 0.85
    assert abs(np.mean(estimates) - truth) < 0.004


def test_total_variation_splits_into_direct_indirect_and_spurious():
    m = MODELS["strong_c"]
    frame = sample(m, 4_000, np.random.default_rng(1))
    eff = estimate_effects(frame, m.spec(), n_boot=20, seed=0)
    get = lambda e: eff.estimate(e, estimator="robust")  # noqa: E731
    observed = frame.score[frame.A == 1].mean() - frame.score[frame.A == 0].mean()
    assert get("tv") == pytest.approx(observed, abs=1e-12)
    assert get("tv") == pytest.approx(get("ctf-direct") - get("ctf-indirect") - get("ctf-spurious"), abs=1e-12)
    assert get("ctf-spurious") < -0.1  # C raises both A and the score: much of the disparity is spurious


def test_e_values():
    sd = 0.2
    est = sd * math.log(2.0) / 0.91  # an approximate risk ratio of 2
    point, limit = e_value(est, est / 2, est * 1.5, sd)
    assert point == pytest.approx(2 + math.sqrt(2), rel=1e-9)
    rr_limit = math.sqrt(2.0)  # the limit nearest zero is half the estimate: exp(0.91 d / 2) = sqrt(2)
    assert limit == pytest.approx(rr_limit + math.sqrt(rr_limit * (rr_limit - 1)), rel=1e-9)
    assert e_value(est, -0.01, est * 2, sd)[1] == 1.0  # the interval covers zero
    m = MODELS["markovian"]
    eff = estimate_effects(sample(m, 3_000, np.random.default_rng(4)), m.spec(), n_boot=20, seed=0)
    assert any("risk ratio" in t for t in eff.diagnostics["sensitivity"])
    assert eff.get("impermissible", estimator="robust")["e_value"] > 1.2


def test_hidden_causes_table_is_a_latent_node_with_two_children():
    raw = MODELS["markovian"].spec().to_dict()
    raw["hidden_causes"] = [{"between": ["S", "X"], "why": "site effects"}]
    from fairness.graph import CausalSpec, SpecError

    spec = CausalSpec.from_dict(raw)
    assert spec.nodes["U_S_X"].role == "latent"
    assert identify(spec).estimands == identify(MODELS["latent_s_image"].spec()).estimands
    raw["hidden_causes"] = [{"between": ["S", "Q"]}]
    with pytest.raises(SpecError, match="unknown node 'Q'"):
        CausalSpec.from_dict(raw)
