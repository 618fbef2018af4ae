"""The federated fairness audit: sites release noised cell statistics through the Releaser, the
server sums them and runs the same audit. Without noise it equals the pooled audit; with noise its CIs widen; the
client producer and server analyser write the report into the run folder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from core_models.config import keys_of, run_config_of
import torch
from sklearn.metrics import roc_auc_score

from client.ledger import PrivacyLedger
from client.statistics import Releaser
from fairness import estimate_effects, group_metrics, load_graph_spec
from fairness.federated import (
    CellLayout,
    audit_from_statistics,
    coarse_frame,
    effects_from_statistics,
    release_statistics,
    site_statistics,
    stats_from_record,
    sum_statistics,
)
from fairness.identification import EFFECTS
from simulations.scenario import SiteSpec
from tests.test_fairness import add_score, fast_truth

SITES = {"north": SiteSpec(name="north", p_a=0.3, p_s_a0=0.1, p_s_a1=0.5, age_mean=62),
         "south": SiteSpec(name="south", p_a=0.6, p_s_a0=0.3, p_s_a1=0.7, prevalence=0.4),
         "east": SiteSpec(name="east", p_a=0.5, p_s_a0=0.2, p_s_a1=0.6, age_mean=48)}


def manifest_frame(site: SiteSpec, n: int, seed: int) -> pd.DataFrame:
    """A site's manifest columns plus the model's score (the synthetic spec's column names)."""
    t = fast_truth(site, n, seed)
    add_score(t, site, seed)
    return pd.DataFrame({"group": t.A, "age": t.C, "scanner_legacy": t.S, "label": t.D, "score": t.score,
                         "site": site.name})


@pytest.fixture(scope="module")
def consortium():
    frames = {name: manifest_frame(s, 3000, seed=i) for i, (name, s) in enumerate(SITES.items())}
    spec = load_graph_spec("synthetic")
    return spec, CellLayout.from_config(spec, run_config_of({"stats-fairness-bins": "C:40|55|70"}).audit), frames


def released(frames, layout, releaser_for) -> dict:
    """Each site's statistics through its releaser, parsed back the way the server does."""
    return {name: stats_from_record(release_statistics(site_statistics(f, layout, name), releaser_for(name)),
                                    layout, name) for name, f in frames.items()}


def test_federated_audit_equals_pooled_audit_without_noise(consortium):
    spec, layout, frames = consortium
    per_site = released(frames, layout, lambda _name: Releaser(None, 0.0))
    fed = audit_from_statistics(sum_statistics(list(per_site.values())), per_site, n_boot=200, seed=0)
    pooled_frame = pd.concat(frames.values(), ignore_index=True)
    assert set(pooled_frame["age"].unique()) > {30, 50, 70}  # raw ages; the audit sees them in 4 bins
    pooled = estimate_effects(coarse_frame(pooled_frame, layout), spec, n_boot=200, seed=0)
    rows = {(r["outcome"], r["effect"], r["estimator"]): r for r in fed.effects["effects"]}
    assert len(rows) == 3 * len(EFFECTS) * 2
    for (outcome, effect, estimator), r in rows.items():
        p = pooled.get(effect, outcome, estimator)
        assert r["estimate"] == pytest.approx(p["estimate"], abs=1e-10), (outcome, effect, estimator)
        # a different bootstrap (cells, not rows) of the same sampling distribution: CIs of the same width
        if p["ci_high"] - p["ci_low"] > 1e-6:
            ratio = (r["ci_high"] - r["ci_low"]) / (p["ci_high"] - p["ci_low"])
            assert 0.75 < ratio < 1.33, (outcome, effect, estimator, ratio)
    assert fed.effects["n"] == pooled.n == {"a0": pooled.n["a0"], "a1": pooled.n["a1"], "total": 9000}
    assert fed.verdict["significant"] and fed.identification["identified"]
    # group metrics: exact at the histogram's threshold (a bin edge); AUROC = that of the binned scores
    gm = fed.group_metrics
    exact = group_metrics(pooled_frame, spec, threshold=gm["threshold"], control=None)
    for r in gm["by_group"]:
        g = r["A"]
        for m in ("count", "prevalence", "tpr", "fpr", "fnr", "specificity", "selection_rate"):
            assert r[m] == pytest.approx(exact.by_group.loc[g, m], abs=1e-12), (g, m)
        sub = pooled_frame[pooled_frame.group == g]
        mid = (np.clip(np.ceil(sub.score * 20) - 1, 0, 19) + 0.5) / 20
        assert r["auroc"] == pytest.approx(roc_auc_score(sub.label, mid), abs=1e-12)
        assert r["auroc"] == pytest.approx(exact.by_group.loc[g, "auroc"], abs=0.01)
    assert gm["summary"]["realised_specificity"] >= 0.8
    # per site: each site's own estimate, from its statistics alone
    for name, f in frames.items():
        alone = estimate_effects(coarse_frame(f, layout), spec, n_boot=20, seed=0).estimate("impermissible",
                                                                               estimator="weighting")
        assert fed.per_site[name]["impermissible"]["estimate"] == pytest.approx(alone, abs=1e-10)
    json.dumps(fed.to_json(), allow_nan=False)


def test_noise_widens_the_cis_and_every_release_is_charged(consortium, tmp_path):
    spec, layout, frames = consortium
    exact = sum_statistics(list(released(frames, layout, lambda _n: Releaser(None, 0.0)).values()))
    for n in frames:
        (tmp_path / n).mkdir()
    ledgers = {n: PrivacyLedger.open(tmp_path / n, delta=1e-5, max_epsilon=None, fingerprint=f"{i:x}" * 64)
               for i, n in enumerate(frames)}
    noisy = sum_statistics(list(released(
        frames, layout, lambda n: Releaser(ledgers[n], noise_multiplier=3.0, min_count=0,
                                           rng=np.random.default_rng(len(n)))).values()))
    assert noisy.sigma["cells_n"] == pytest.approx(3.0 * np.sqrt(3))  # three sites' noise adds in quadrature
    assert np.abs(noisy.n - exact.n).max() > 0.5  # the counts really are noised
    for n, ledger in ledgers.items():
        labels = [e["label"] for e in ledger.entries]
        assert labels == ["fairness/cells_n", "fairness/cells_score", "fairness/cells_score_sq", "fairness/hist"]
        assert all(e["sigma"] == 3.0 for e in ledger.entries) and ledger.epsilon() > 0
    # like with like: the noised cells' primary estimator (smoothed g-formula) and the same estimator on the exact
    # cells (a vanishing noise std selects it); the pooled sites differ, so weighting and smoothing differ a little
    e1 = effects_from_statistics(noisy, n_boot=200, seed=1)
    assert e1.primary == "smoothed"
    near_exact = dataclasses.replace(exact, sigma={k: 1e-9 for k in exact.sigma})
    for estimator in ("smoothed", "weighting"):
        e0 = effects_from_statistics(near_exact, n_boot=200, seed=1).get("impermissible", estimator=estimator)
        imp = e1.get("impermissible", estimator=estimator)
        assert imp["ci_high"] - imp["ci_low"] > 1.5 * (e0["ci_high"] - e0["ci_low"]), estimator
        # one noised draw: within three of its standard errors (a CI spans about four) of the exact value
        assert abs(imp["estimate"] - e0["estimate"]) < 0.75 * (imp["ci_high"] - imp["ci_low"]), estimator
    assert any("privacy noise" in note for note in e1.diagnostics["notes"])


def test_layout_errors_name_the_problem(consortium):
    spec, layout, frames = consortium
    with pytest.raises(ValueError, match="covariate 'C' needs fixed cells"):
        CellLayout.from_config(spec, run_config_of({"stats-fairness-bins": ""}).audit)
    with pytest.raises(ValueError, match="unknown node"):
        CellLayout.from_config(spec, run_config_of({"stats-fairness-levels": "Q:0|1"}).audit)
    # a value outside the declared levels is data, not a setting: it lands in the "other" cell, never in an error
    bad = release_statistics(site_statistics(frames["north"].assign(scanner_legacy=2), layout), Releaser(None, 0.0))
    clean = release_statistics(site_statistics(frames["north"], layout), Releaser(None, 0.0))
    assert {k: len(v) for k, v in bad.items() if isinstance(v, list)} == \
        {k: len(v) for k, v in clean.items() if isinstance(v, list)}
    three = CellLayout.from_config(spec, run_config_of({"stats-fairness-levels": "S:0|1|2"}).audit)
    with pytest.raises(ValueError, match="cells_n' has 135 values, the layout needs 180"):
        stats_from_record(release_statistics(site_statistics(frames["north"], layout), Releaser(None, 0.0)), three)


def test_client_producer_and_server_analyser_write_the_report(consortium, tmp_path):
    """The Flower-side glue: the producer scores a site's test split with the global model and releases; the
    analyser sums two sites and writes fairness_audit.html/.json into the run folder."""
    from client.fairness_stats import produce_fairness
    from client.site import LocalSite
    from core_models.data import SiteData
    from core_models.networks import build_model
    from server.fairness_audit import analyse_fairness, load_audit
    from server.site_statistics import SiteRelease

    torch.manual_seed(0)
    model = build_model("cnn", 2)
    cfg = {"stats-fairness-graph": "synthetic", "stats-fairness-bins": "C:40|55|70", "stats-fairness-boot": 50,
           "seed": 0}
    request = {**keys_of(run_config_of(cfg).audit), "seed": 0}  # the server's request carries every stats-* key
    releases = []
    for i, name in enumerate(("north", "south")):
        f = consortium[2][name].iloc[:240].copy()
        f["patient_id"] = [f"{name}-{k}" for k in range(len(f))]
        f["label"] = f["label"].astype(str)  # manifests arrive as text
        images = np.random.default_rng(i).random((len(f), 1, 32, 32)).astype(np.float32)
        split = pd.Series(np.where(np.arange(len(f)) % 3 == 0, "train", "test"))
        site = LocalSite(name, tmp_path, SiteData(images, f["label"].astype(int).to_numpy(), f.drop(columns="score"),
                                                  []), split)
        rec = produce_fairness(site, model, request, Releaser(None, 0.0))
        assert sum(rec["cells_n"]) == (split == "test").sum() == 160
        assert len(rec["hist"]) == 2 * 2 * 20 and rec["sigma_cells_n"] == 0.0
        releases.append(SiteRelease(name, "ok", {"fairness": rec}, epsilon=0.5 + i))
    releases.append(SiteRelease("west", "budget exhausted", {}))
    releases.append(SiteRelease("odd", "ok", {"fairness": {**releases[0].records["fairness"], "cells_n": [1.0] * 5}}))
    pd.DataFrame({"round": [1, 1], "phase": ["train", "train"], "site": ["north", "south"],
                  "epsilon": [0.4, 1.4]}).to_csv(tmp_path / "per_site.csv", index=False)
    analyse_fairness(tmp_path, 3, releases, cfg)
    audit = load_audit(tmp_path)
    assert audit.round == 3 and audit.data["n_rows"] == 320 and audit.mode == "federated"
    assert set(audit.per_site) == {"north", "south"}
    assert audit.federated["not_released"][0] == "west (budget exhausted)"
    assert "odd (unusable release: site odd: 'cells_n' has 5 values" in audit.federated["not_released"][1]
    assert audit.context["epsilon"]["south"] == {"epsilon": 1.4, "epsilon (after this release)": 1.5}
    html = (tmp_path / "fairness_audit.html").read_text()
    assert "round 3" in html and "no shift.csv in the run folder" in html and "1.5000" in html
    assert (tmp_path / "fairness" / "round_003.json").exists()


def test_release_noise_does_not_shrink_the_consortium_estimate(consortium):
    """Zero-mean noise in every cell must not pull the estimate toward zero (clipping noised cells or dropping
    the negative ones made sparse cells look alike: -21 % at this noise, -48 % at twice it). 100 seeded draws of
    2,000 patients with noise std 5 in every released entry: their mean is the noiseless large-sample value within
    3 standard errors of the mean, and the intervals cover it."""
    _spec, layout, _frames = consortium
    target = effects_from_statistics(site_statistics(manifest_frame(SITES["north"], 100_000, seed=50), layout),
                                     n_boot=10, seed=0).estimate("impermissible", estimator="weighting")
    rng = np.random.default_rng(51)
    estimates, covered = [], []
    for r in range(100):
        stats = site_statistics(manifest_frame(SITES["north"], 2000, seed=100 + r), layout)
        noise = lambda a: a + 5.0 * rng.standard_normal(a.shape)  # noqa: E731  what the releaser adds
        noisy = dataclasses.replace(stats, n=noise(stats.n), score=noise(stats.score),
                                    score_sq=noise(stats.score_sq), sigma={k: 5.0 for k in stats.sigma})
        row = effects_from_statistics(noisy, n_boot=100, seed=r).get("impermissible", estimator="smoothed")
        estimates.append(row["estimate"])
        covered.append(row["ci_low"] <= target <= row["ci_high"])
    mean, se = np.mean(estimates), np.std(estimates, ddof=1) / 10
    assert 0.05 < target < 0.09 and se < 0.003
    assert abs(mean - target) < 3 * se, (mean, target, se)
    assert np.mean(covered) >= 0.88


def test_an_audit_the_noise_swamps_says_so_instead_of_a_narrow_interval(consortium):
    """280 patients in 32 cells with noise std 10 per count: the cells carry no information about the effect (the
    fits collapse toward no effect with narrow-looking intervals). The audit must not report one."""
    _spec, layout, _frames = consortium
    rng = np.random.default_rng(7)
    stats = site_statistics(manifest_frame(SITES["north"], 280, seed=7), layout)
    noise = lambda a: a + 10.0 * rng.standard_normal(a.shape)  # noqa: E731
    noisy = dataclasses.replace(stats, n=noise(stats.n), score=noise(stats.score), score_sq=noise(stats.score_sq),
                                hist=noise(stats.hist), sigma={k: 10.0 for k in stats.sigma})
    table = effects_from_statistics(noisy, n_boot=50, seed=0)
    assert "noise dominates" in table.diagnostics["uninformative"] and "32 cells" in table.diagnostics["uninformative"]
    imp = table.get("impermissible")
    assert (imp["ci_low"], imp["ci_high"], imp["p_value"]) == (-1.0, 1.0, 1.0)
    assert (table.get("impermissible", "amplification")["ci_low"]) == -2.0
    audit = audit_from_statistics(noisy, {"north": noisy}, n_boot=50, seed=0)
    assert "cannot tell a large effect from none" in audit.verdict["text"] and not audit.verdict["significant"]
    # the same site at 2,000 patients and the same noise is informative
    big = site_statistics(manifest_frame(SITES["north"], 2000, seed=7), layout)
    big = dataclasses.replace(big, n=noise(big.n), score=noise(big.score), score_sq=noise(big.score_sq),
                              sigma={k: 10.0 for k in big.sigma})
    assert "uninformative" not in effects_from_statistics(big, n_boot=50, seed=0).diagnostics
