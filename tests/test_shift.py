"""Dataset shift: what a site releases (noise for the declared sensitivity, ledger charges, small-cell
suppression), the server's tests and label-shift estimates on generated hospitals whose shift is known, new-site
prior adaptation, the generator's pure label-shift knob, and one real Flower run with `statistics=shift`."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client.app import statistics
from client.cli import main as client_cli
from client.ledger import PrivacyLedger, dataset_fingerprint
from client.shift_stats import (intensity_hist, manufacturer_counts, model_outputs, release_shift, request_settings,
                                rff_features, rff_map)
from client.statistics import Releaser
from core_models.config import app_defaults
from core_models.label_shift import N_BINS
from core_models.networks import build_model
from core_models.training import make_loader, train_epochs
from server.shift import ShiftStats, analyse_shift, compare_site, consortium_summary
from server.site_statistics import SiteRelease
from simulations.generator import generate_consortium, render, sample_truth
from simulations.scenario import SiteSpec, scenario_from_dict, scenario_hash
from tests.test_client import RUN_CONFIG, _context, consortium  # noqa: F401  (shared fixture)

SIZE = 32
# the stats-* keys every statistics request carries (the server sends them all)
STATS_KEYS = {k: v for k, v in app_defaults(Path(__file__).resolve().parent.parent / "pyproject.toml").items()
              if k.startswith("stats-")}
SETTINGS = request_settings({**STATS_KEYS, "stats-rff-dim": 32, "stats-feature-clip": 20.0, "stats-rff-bandwidth": 0.5,
                             "seed": 3, "stats-manufacturers": "GE,Siemens"})


pytestmark = pytest.mark.usefixtures("task_identity")


def _images(spec: SiteSpec, n: int, seed: int = 5):
    truth = sample_truth(spec, seed, n, image_size=SIZE)
    x = np.stack([render(r) for r in truth.to_dict("records")])[:, None].astype(np.float32)
    return x, truth["D"].to_numpy()


@pytest.fixture(scope="module")
def model():
    """A SmallCNN trained briefly on one reference hospital (prevalence 0.3)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = _images(SiteSpec(name="train", n=1000, lesion_contrast=0.6), 1000)
    net = build_model("cnn")
    train_epochs(net, make_loader(x, y, 32, shuffle=True, seed=0), epochs=4, optimizer="adam", lr=0.003)
    return net


def _release(net, spec: SiteSpec, n: int, releaser: Releaser, name: str) -> ShiftStats:
    """A site's released shift statistics, every image a holdout image, through the real release code."""
    x, y = _images(spec, n)
    logits, feats = model_outputs(net, x)
    values = release_shift(releaser, 2, y, x, ["GE"] * n, y, logits, feats, SETTINGS)
    return ShiftStats.from_record(name, values)


# ------------------------------------------------------------------------------------------------ what is released

def test_each_statistic_noised_for_its_sensitivity_and_charged(tmp_path):
    """Three classes, so the output histograms' sensitivity is sqrt(3); the noise std of every release is
    noise multiplier x sensitivity, measured on the released values, and each is one ledger charge."""
    rng = np.random.default_rng(0)
    n, k, z = 400, 3, 2.0
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 3, (n, k))
    feats = rng.normal(0, 5, (n, 16))
    images = rng.random((n, 1, 8, 8))
    ledger = PrivacyLedger.open(tmp_path, delta=1e-5, max_epsilon=None, fingerprint="a" * 64)
    draws = []
    for i in range(30):
        rel = Releaser(ledger, noise_multiplier=z, min_count=-1e9, rng=np.random.default_rng(i))
        draws.append(release_shift(rel, k, labels, images, ["GE"] * n, labels, logits, feats, SETTINGS))
    first = draws[0]
    assert first["sigma_output_hist"] == pytest.approx(z * np.sqrt(3))
    for name in ("label_counts", "confusion", "rff_sum", "intensity_hist", "manufacturers"):
        assert first[f"sigma_{name}"] == z
    # measured noise: released minus the exact (unnoised) statistics
    exact = release_shift(Releaser(None, 0.0), k, labels, images, ["GE"] * n, labels, logits, feats, SETTINGS)
    for name, expected in (("output_hist", z * np.sqrt(3)), ("rff_sum", z), ("confusion", z)):
        noise = np.array([d[name] for d in draws]) - np.array(exact[name])
        assert noise.std() == pytest.approx(expected, rel=0.08), name
        assert abs(noise.mean()) < 0.1 * expected
    assert len(exact["output_hist"]) == k * k * N_BINS and len(exact["rff_sum"]) == k * 32
    labels_charged = [e["label"] for e in ledger.entries]
    assert len(labels_charged) == 30 * 6
    assert labels_charged[:6] == ["shift/label_counts", "shift/confusion", "shift/output_hist", "shift/rff_sum",
                                  "shift/intensity_hist", "shift/manufacturers"]
    assert all(e["sigma"] == z and e["kind"] == "release" for e in ledger.entries)


def test_small_cells_suppressed_large_cells_kept(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, delta=1e-5, max_epsilon=None, fingerprint="b" * 64)
    rel = Releaser(ledger, noise_multiplier=0.05, min_count=5, rng=np.random.default_rng(1))
    labels = np.array([0] * 60 + [1] * 3)  # three patients of label 1: every cell of theirs is small
    logits = np.column_stack([np.where(labels == 1, -4.0, 3.0), np.where(labels == 1, 4.0, -3.0)])
    out = release_shift(rel, 2, labels, np.zeros((63, 1, 4, 4)), ["GE"] * 63, labels, logits,
                        np.ones((63, 4)), SETTINGS)
    assert out["label_counts"][0] == pytest.approx(60, abs=0.3) and out["label_counts"][1] == 0.0
    confusion = np.array(out["confusion"]).reshape(2, 2)
    assert confusion[1].sum() == 0.0 and confusion[0, 1] == 0.0 and confusion[0, 0] == pytest.approx(60, abs=0.3)
    hist = np.array(out["output_hist"]).reshape(2, 1, N_BINS)
    assert hist[1].sum() == 0.0 and hist[0].max() == pytest.approx(60, abs=0.3)
    assert out["manufacturers"] == pytest.approx([63, 0, 0], abs=0.3)


def test_random_features_bounded_and_shared():
    """Every record's random-feature vector has norm 1 (the declared sensitivity of a sum), features are clipped
    before the map, and the map depends only on the server's seed."""
    rng = np.random.default_rng(2)
    feats = rng.normal(0, 10, (50, 8))
    freqs = rff_map(7, 8, 32, 0.5)
    phi = rff_features(feats, freqs, clip=5.0)
    assert np.allclose(np.linalg.norm(phi, axis=1), 1.0)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True) * 5.0  # all beyond the clip: clipped to norm 5
    assert np.allclose(rff_features(feats * 100, freqs, 5.0), rff_features(unit, freqs, 5.0))
    assert np.array_equal(rff_map(7, 8, 32, 0.5), freqs) and not np.allclose(rff_map(8, 8, 32, 0.5), freqs)
    hist = intensity_hist(rng.random((10, 1, 6, 6)))
    assert hist.sum() == pytest.approx(10.0)  # each image's histogram sums to 1
    assert list(manufacturer_counts(["GE Healthcare", "siemens", "Acme", None], ["GE", "Siemens"])) == [1, 1, 2]


def test_query_handler_releases_shift(consortium):  # noqa: F811
    gamma = consortium[0]
    # the policy's smallest release noise (1.0), so that the counts below can be checked tightly; six releases at
    # sigma 1 cost more than the default budget of 10, so this site's own node config allows more
    noise = 1.0
    ctx = _context({"data-path": str(gamma), "site": "gamma", "max-epsilon": 50.0},
                   **{"release-noise": noise, "release-min-count": 0})
    before = len(PrivacyLedger.open(gamma, delta=1e-5, max_epsilon=None,
                                    fingerprint=dataset_fingerprint(gamma)).entries)
    content = RecordDict({"arrays": ArrayRecord(build_model("cnn").state_dict()),
                          "config": ConfigRecord({**STATS_KEYS, "statistics": "shift", "server-round": 2,
                                                  "seed": 4})})
    reply = statistics(Message(content=content, dst_node_id=7, message_type=MessageType.QUERY), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    rec = reply.content["shift"]
    assert rec["num_classes"] == 2 and rec["bins"] == N_BINS and rec["sigma_output_hist"] == noise
    assert len(rec["rff_sum"]) == 2 * 64  # the default map: 64 features per label
    ledger = PrivacyLedger.open(gamma, delta=1e-5, max_epsilon=None, fingerprint=dataset_fingerprint(gamma))
    new = ledger.entries[before:]
    assert [e["label"] for e in new][0] == "shift/label_counts" and len(new) == 6
    assert all(e["round"] == 2 and e["sigma"] == noise for e in new)
    assert reply.content["metrics"]["epsilon"] > reply.content["metrics"]["epsilon-before"]
    # the label counts cover every patient of every split (one image each), each cell within 5 noise sds of the
    # exact count; counting the train split alone would miss by far more than that
    manifest = pd.read_csv(gamma / "manifest.csv").drop_duplicates("patient_id")
    exact = np.bincount(manifest["label"].to_numpy(), minlength=2).astype(float)
    sigma = rec["sigma_label_counts"]
    assert sigma == noise  # sensitivity 1
    bound = 5 * sigma
    assert np.abs(np.asarray(rec["label_counts"]) - exact).max() <= bound, (rec["label_counts"], exact)
    from client.site import open_site
    site = open_site(gamma, image_size=32, seed=int(RUN_CONFIG["seed"]))
    train_only = np.bincount(site.part("train")[1], minlength=2)
    assert np.abs(train_only - exact).max() > 2 * bound  # (the check above tells the two apart)
    # the model statistics only the val/test splits (their patients, one image each); zero cells are clipped at
    # the minimum count (0), so allow each of the 4 cells its full deviation
    holdout = int(site.split.isin(["val", "test"]).sum())
    assert abs(sum(rec["confusion"]) - holdout) <= 4 * 5 * rec["sigma_confusion"] < len(manifest) - holdout


# ------------------------------------------------------------------------------------------------ server analysis

@pytest.fixture(scope="module")
def shift_sites(model, tmp_path_factory):
    """Three reference sites, and one site each with no shift, strong scanner noise, and pure label shift."""
    ledger = PrivacyLedger.open(tmp_path_factory.mktemp("ledger"), delta=1e-5, max_epsilon=None,
                                fingerprint="c" * 64)

    def rel(i):
        return Releaser(ledger, noise_multiplier=1.5, min_count=5, rng=np.random.default_rng(i))

    ref = dict(lesion_contrast=0.6, prevalence=0.3)
    rest = [_release(model, SiteSpec(name=f"ref{i}", **ref), 250, rel(i), f"ref{i}") for i in range(3)]
    return {
        "rest": rest,
        "none": [_release(model, SiteSpec(name=f"same{i}", **ref), 300, rel(10 + i), f"same{i}") for i in range(4)],
        "covariate": _release(model, SiteSpec(name="noisy", extra_noise_std=0.08, **ref), 300, rel(11), "noisy"),
        "label": _release(model, SiteSpec(name="prior", label_prior=0.7, **ref), 300, rel(12), "prior"),
    }


def test_unshifted_not_flagged_shifted_flagged_and_labelled(shift_sites):
    rest = shift_sites["rest"]
    rows = {kind: compare_site(shift_sites[kind], rest, np.random.default_rng(0), n_boot=300)
            for kind in ("covariate", "label")}
    nulls = [compare_site(site, rest, np.random.default_rng(0), n_boot=300) for site in shift_sites["none"]]
    # four unshifted sites: a 5%-level test may flag one by chance (here none is), never with p < 0.01
    assert sum(r["p_covariate"] < 0.05 for r in nulls) == 0 and min(r["p_covariate"] for r in nulls) > 0.01
    assert np.mean([r["p_covariate"] for r in nulls]) > 0.25
    assert sum(r["shift"] != "none" for r in nulls) <= 1
    rows["none"] = nulls[0]
    assert rows["covariate"]["p_covariate"] < 0.01 and rows["covariate"]["shift"] == "covariate"
    assert rows["label"]["shift"] == "label" and rows["label"]["p_covariate"] > 0.05
    # label shift: both label-blind estimates find the true prior 0.7 (the rest has 0.3)
    assert rows["label"]["prior_mlls_1"] == pytest.approx(0.7, abs=0.08)
    assert rows["label"]["prior_bbse_1"] == pytest.approx(0.7, abs=0.08)
    assert rows["label"]["prior_mlls_lo_1"] < 0.7 < rows["label"]["prior_mlls_hi_1"]
    assert all(r["prior_mlls_1"] == pytest.approx(0.3, abs=0.08) for r in nulls)
    assert rows["label"]["label_shift_l1"] > 0.6 and max(r["label_shift_l1"] for r in nulls) < 0.16
    # effect sizes order as the truth does
    assert rows["covariate"]["tv_covariate"] > max(r["tv_covariate"] for r in nulls) + 0.1  # measured +0.19..0.25
    assert rows["covariate"]["mmd2_cond"] > max(r["mmd2_cond"] for r in nulls) + 0.005
    assert max(abs(r["mmd2_cond"]) for r in nulls) < 0.002
    assert rows["covariate"]["p_intensity"] < 0.05  # measured 0.003-0.013 across machines


def test_analyser_writes_table_figure_and_consortium(shift_sites, tmp_path):
    stats = [*shift_sites["rest"], shift_sites["covariate"]]
    releases = [SiteRelease(site=s.site, status="ok", records={"shift": _as_record(s)}, epsilon=1.0) for s in stats]
    releases.append(SiteRelease(site="gone", status="budget exhausted", records={}))
    cfg = {"seed": 1, "model": "cnn", "image-size": SIZE, "stats-bootstrap": 200}
    analyse_shift(tmp_path, 3, releases, cfg)
    analyse_shift(tmp_path, 3, releases, cfg)  # a rerun round replaces its rows
    table = pd.read_csv(tmp_path / "shift.csv")
    assert len(table) == 5 and list(table["round"].unique()) == [3]
    noisy = table[table["site"] == "noisy"].iloc[0]
    assert noisy["shift"] == "covariate" and noisy["p_covariate"] < 0.01
    assert table[table["site"] == "gone"]["status"].iloc[0] == "budget exhausted"
    assert (tmp_path / "shift.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "shift_consortium.json").read_text())
    assert summary["round"] == 3 and summary["num_classes"] == 2 and len(summary["sites"]) == 4
    # suppressed mass is put back: each label's pooled histogram sums to the pooled confusion row
    assert np.asarray(summary["output_hist"]).sum(-1).ravel() == pytest.approx(
        np.clip(summary["confusion"], 0, None).sum(1), rel=0.02)


def _as_record(s: ShiftStats) -> dict:
    return {"label_counts": s.label_counts.tolist(), "confusion": s.confusion.ravel().tolist(),
            "output_hist": s.output_hist.ravel().tolist(), "rff_sum": s.rff_sum.ravel().tolist(),
            "intensity_hist": s.intensity.tolist(), "manufacturers": s.manufacturers.tolist(),
            "num_classes": 2, "num_outputs": 1, "bins": N_BINS, "rff_dim": s.rff_sum.shape[1],
            "min_count": s.min_count, **{f"sigma_{n}": s.sigma[n] for n in (
                "label_counts", "confusion", "output_hist", "rff_sum", "intensity_hist", "manufacturers")}}


# ------------------------------------------------------------------------------------------------ new-site adaptation

@pytest.fixture(scope="module")
def early_model():
    """The global model after little training (2 epochs): still close to calibrated at its training prior, which
    prior correction assumes. (The 4-epoch model above is near-separating and overconfident: correcting its
    probabilities gains nothing.)"""
    torch.manual_seed(0)
    x, y = _images(SiteSpec(name="train", n=1000, lesion_contrast=0.6), 1000)
    net = build_model("cnn")
    train_epochs(net, make_loader(x, y, 32, shuffle=True, seed=0), epochs=2, optimizer="adam", lr=0.003)
    return net


def test_adapt_improves_a_label_shifted_site(early_model, tmp_path, capsys):
    """A new hospital with prevalence 0.75 (the consortium trained at 0.3) estimates its prior from its unlabelled
    images and the released statistics; the corrected probabilities score better."""
    model = early_model
    releaser = Releaser(PrivacyLedger.open(tmp_path, delta=1e-5, max_epsilon=None, fingerprint="d" * 64), 1.5, 5,
                        rng=np.random.default_rng(0))
    ref = dict(lesion_contrast=0.6, prevalence=0.3)
    rest = [_release(model, SiteSpec(name=f"ref{i}", **ref), 250, releaser, f"ref{i}") for i in range(3)]
    (tmp_path / "s.toml").write_text(f"""
name = "newsite"
seed = 21
image_size = {SIZE}
[[sites]]
name = "new_hospital"
n = 400
lesion_contrast = 0.6
prevalence = 0.3
label_prior = 0.75
""")
    site = generate_consortium(tmp_path / "s.toml", tmp_path / "data")[0]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    cons = consortium_summary(rest, {"model": "cnn", "image-size": SIZE}, 5)
    (tmp_path / "cons.json").write_text(json.dumps(cons))
    args = ["adapt", "--data", str(site), "--model", str(tmp_path / "model.pt"), "--consortium-stats",
            str(tmp_path / "cons.json")]
    assert client_cli([*args, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "prior.json").read_text())
    assert summary["labelled_prior"][1] == pytest.approx(0.75, abs=0.01)
    assert summary["estimated_prior"][1] == pytest.approx(0.75, abs=0.08)
    assert summary["train_prior"][1] == pytest.approx(0.3, abs=0.05)
    assert summary["after"]["log_loss"] < summary["before"]["log_loss"] - 0.1
    assert summary["after"]["brier"] < summary["before"]["brier"] - 0.1
    assert summary["applied"] is True and summary["warnings"] == []
    preds = pd.read_csv(tmp_path / "out" / "adapted_predictions.csv")
    assert len(preds) == 400 and preds["p_adapted_1"].mean() > preds["p_model_1"].mean() + 0.05

    # a degenerate model (every output in the top log-odds bin): the estimate is not to be trusted, the command
    # says why and keeps the model's own probabilities
    weak = {k: v.clone() for k, v in model.state_dict().items()}
    last_w, last_b = [k for k in weak if k.endswith("weight")][-1], [k for k in weak if k.endswith("bias")][-1]
    weak[last_w].zero_()
    weak[last_b].copy_(torch.tensor([0.0, 9.0]))
    torch.save(weak, tmp_path / "weak.pt")
    capsys.readouterr()
    weak_args = [a if a != str(tmp_path / "model.pt") else str(tmp_path / "weak.pt") for a in args]
    assert client_cli([*weak_args, "--out", str(tmp_path / "weak_out")]) == 0
    flagged = json.loads((tmp_path / "weak_out" / "prior.json").read_text())
    assert flagged["applied"] is False and flagged["warnings"]
    assert "NOT applied" in capsys.readouterr().err
    kept = pd.read_csv(tmp_path / "weak_out" / "adapted_predictions.csv")
    assert np.allclose(kept["p_adapted_1"], kept["p_model_1"])

    # the same site without labels: same estimate, no scores
    manifest = pd.read_csv(site / "manifest.csv").drop(columns=["label"])
    manifest.to_csv(site / "manifest.csv", index=False)
    assert client_cli([*args, "--out", str(tmp_path / "out2")]) == 0
    unlabelled = json.loads((tmp_path / "out2" / "prior.json").read_text())
    assert unlabelled["estimated_prior"] == pytest.approx(summary["estimated_prior"])
    assert "before" not in unlabelled


# ------------------------------------------------------------------------------------------------ generator knobs

def test_label_prior_is_pure_label_shift():
    base = SiteSpec(name="mech", n=4000, p_s_a0=0.1, p_s_a1=0.6, beta_a=1.5, prevalence=0.3)
    ref = sample_truth(base, 9)
    shifted = sample_truth(SiteSpec(**{**base.__dict__, "n": 3000, "label_prior": 0.7}), 9)
    assert shifted["D"].mean() == pytest.approx(0.7, abs=1e-9)
    for d in (0, 1):  # P(S | D) and P(A | D) stay those of the mechanism
        assert shifted[shifted.D == d]["S"].mean() == pytest.approx(ref[ref.D == d]["S"].mean(), abs=0.03)
        assert shifted[shifted.D == d]["A"].mean() == pytest.approx(ref[ref.D == d]["A"].mean(), abs=0.03)
    # prevalence_offset moves P(D) through the equations, so P(S | D) moves with it when beta_a != 0
    offset = sample_truth(SiteSpec(**{**base.__dict__, "prevalence_offset": 0.4}), 9)
    assert abs(offset[offset.D == 0]["S"].mean() - ref[ref.D == 0]["S"].mean()) > 0.04
    raw = {"name": "x", "seed": 1, "sites": [{"name": "a", "n": 5}]}
    with_knob = {"name": "x", "seed": 1, "sites": [{"name": "a", "n": 5, "label_prior": 0.4}]}
    assert scenario_hash(scenario_from_dict(raw)) != scenario_hash(scenario_from_dict(with_knob))
    with pytest.raises(ValueError, match="label_prior"):
        scenario_from_dict({"name": "x", "seed": 1, "sites": [{"name": "a", "n": 5, "label_prior": 1.0}]})


# ------------------------------------------------------------------------------------------------ a real Flower run

def test_simulation_writes_shift_csv(tiny_run):
    """The shared real run (tests/conftest.py: 2 hospitals x 2 rounds through our own SuperLink and `flwr run`)
    asked for the shift statistics."""
    run = tiny_run
    table = pd.read_csv(run / "shift.csv")
    rounds = sorted(set(table["round"]))  # 1, 2 (and 3 once test_simulation's resume has run)
    assert rounds[:2] == [1, 2]
    for r in rounds:
        assert sorted(table[table["round"] == r]["site"]) == ["alpha", "beta"]
    assert (table["status"] == "ok").all()
    assert table["p_covariate"].between(0, 1).all() and table["prior_mlls_1"].between(0, 1).all()
    # each site's holdout is its val + test splits (30% of 160), its label counts cover all 160 (159 usable at beta)
    assert table["n_holdout"].between(35, 65).all() and table["n_labelled"].between(140, 180).all()
    assert (run / "shift.png").exists() and (run / "shift_consortium.json").exists()
    for name in ("alpha", "beta"):
        ledger = PrivacyLedger.open(run / "data" / name, delta=1e-5, max_epsilon=None,
                                    fingerprint=dataset_fingerprint(run / "data" / name))
        assert [e["label"] for e in ledger.entries if e["kind"] == "release"][0] == "shift/label_counts"
        assert sum(e["kind"] == "release" and e["label"].startswith("shift/") for e in ledger.entries) == \
            6 * len(rounds)  # six noised vectors per round
