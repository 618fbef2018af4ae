"""Federated calibration: the temperature (binary: Platt scale and bias) fitted from the sites' released histograms
matches a direct fit on the raw scores, folds into the head, is released noised and charged only where the site's
policy allows, and lowers the holdout ECE of a model trained on real scans; ECE and Brier score known values; the
regression guard judges discrimination and notes calibration."""

import json
import math
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import statistics
from client.calibration_stats import produce_calibration, site_histograms
from client.ledger import PrivacyLedger, dataset_fingerprint, ledger_path
from client.site import LocalSite, open_site
from client.statistics import Releaser
from core_models.calibration import (N_BINS, NONFINITE_BIN, Calibration, brier_score, calibration_histograms,
                                     calibration_scores, expected_calibration_error, fit_from_histograms,
                                     fit_scaling, fold_into_head, probability_metrics)
from core_models.data import SiteData
from core_models.networks import build_model
from core_models.protocol import POLICY_REFUSED
from core_models.training import make_loader, predict_proba, train_epochs
from server.calibration import fit_releases
from server.results import calibration_notes, regressions, round_table
from server.site_statistics import SiteRelease

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
BREAST = ROOT.parent / "shared" / "data" / "breastmnist.npz"

# the histograms' fit against the direct fit on the same raw scores: the bins' width, nothing else
SCALE_TOLERANCE = 0.03  # relative
BIAS_TOLERANCE = 0.03  # log-odds


def _binary_logits(rng, n, scale=3.0, shift=0.5):
    y = rng.integers(0, 2, n)
    d = scale * ((2 * y - 1) * 1.2 + rng.normal(0, 1.5, n)) + shift
    return np.stack([np.zeros(n), d], axis=1), y


def _multiclass_logits(rng, n, k=5, scale=4.0):
    y = rng.integers(0, k, n)
    z = rng.normal(0, 1.0, (n, k))
    z[np.arange(n), y] += 1.0
    return scale * z, y


# ------------------------------------------------------------------------------------------ the fit

def test_fit_from_histograms_matches_a_direct_fit_on_the_raw_scores():
    rng = np.random.default_rng(0)
    z, y = _binary_logits(rng, 4000)
    scores, targets = calibration_scores(z, y)
    direct = fit_scaling(scores, targets, platt=True)
    binned = fit_from_histograms(calibration_histograms(z, y), 2)
    assert direct.kind == binned.kind == "platt" and binned.records == 4000
    assert binned.scale == pytest.approx(direct.scale, rel=SCALE_TOLERANCE)
    assert binned.bias == pytest.approx(direct.bias, abs=BIAS_TOLERANCE)
    assert direct.temperature > 2  # over-confident scores: a real correction, not the identity
    # the direct fit is the maximum-likelihood Platt scaling: a logistic regression of the label on the log-odds
    from sklearn.linear_model import LogisticRegression
    ref = LogisticRegression(C=1e9, tol=1e-10, max_iter=10_000).fit(scores[:, None], y)
    assert direct.scale == pytest.approx(float(ref.coef_[0, 0]), rel=1e-3)
    assert direct.bias == pytest.approx(float(ref.intercept_[0]), abs=1e-3)

    z5, y5 = _multiclass_logits(rng, 4000)
    scores, targets = calibration_scores(z5, y5)
    direct = fit_scaling(scores, targets, platt=False, offset=math.log(4))  # top_label_offset(5)
    binned = fit_from_histograms(calibration_histograms(z5, y5), 5)
    assert binned.kind == "temperature" and binned.bias == 0.0
    assert binned.temperature == pytest.approx(direct.temperature, rel=SCALE_TOLERANCE)
    assert direct.temperature > 1.5


def test_noised_pooled_histograms_still_fit_and_a_calibrated_model_stays_near_the_identity():
    rng = np.random.default_rng(1)
    z, y = _binary_logits(rng, 3000)
    exact = fit_from_histograms(calibration_histograms(z, y), 2)
    noise = 5.0  # the default release-noise at one site
    noised = calibration_histograms(z, y) + rng.normal(0, noise, (2, N_BINS))
    fit = fit_from_histograms(noised, 2, noise_std=noise)
    assert fit.scale == pytest.approx(exact.scale, rel=0.2)
    calibrated_logits = exact.apply(z)  # a model that is calibrated already
    noised = calibration_histograms(calibrated_logits, y) + rng.normal(0, noise, (2, N_BINS))
    again = fit_from_histograms(noised, 2, noise_std=noise)
    assert again.scale == pytest.approx(1.0, abs=0.2) and abs(again.bias) < 0.3


def test_the_prior_pulls_a_fit_from_few_records_toward_the_identity():
    """Maximum a posteriori under the identity-centred prior: the same optimum as an independent minimisation of
    the penalised loss, between the plain fit and the identity, the identity itself under an overwhelming prior."""
    from scipy.optimize import minimize

    from core_models.calibration import PRIOR_BIAS_STD, PRIOR_LOG_SCALE_STD

    rng = np.random.default_rng(11)
    z, y = _binary_logits(rng, 60)
    s, t = calibration_scores(z, y)
    plain = fit_scaling(s, t, platt=True)
    fit = fit_scaling(s, t, platt=True, prior=20.0)

    def penalised(p):
        u = np.exp(p[0]) * s + p[1]
        return (np.sum(np.where(t == 1, np.logaddexp(0, -u), np.logaddexp(0, u)))
                + 20.0 * (p[0] ** 2 / (2 * PRIOR_LOG_SCALE_STD ** 2) + p[1] ** 2 / (2 * PRIOR_BIAS_STD ** 2)))

    ref = minimize(penalised, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10}).x
    assert math.log(fit.scale) == pytest.approx(ref[0], abs=1e-4) and fit.bias == pytest.approx(ref[1], abs=1e-4)
    assert plain.scale < fit.scale < 1.0 and abs(fit.bias) < abs(plain.bias)  # over-confident scores: scale < 1
    still = fit_scaling(s, t, platt=True, prior=1e7)
    assert still.scale == pytest.approx(1.0, abs=1e-3) and still.bias == pytest.approx(0.0, abs=1e-3)


def test_noised_histograms_of_few_records_leave_a_calibrated_model_alone():
    """300 records of an already calibrated model, their table noised as three sites at release-noise 5 noise
    theirs: each fit (where a bin stands out of the noise at all) stays near the identity. Without the prior and
    with bins kept at 2 noise stds the noise of the empty cells drove the median temperature to 2.0 and single
    fits to 42."""
    rng = np.random.default_rng(12)
    z, y = _binary_logits(rng, 4000)
    calibrated = fit_scaling(*calibration_scores(z, y), platt=True).apply(z)
    hist = calibration_histograms(calibrated[:300], y[:300])
    noise = 5.0 * math.sqrt(3)
    fits = []
    for _ in range(20):
        try:
            fits.append(fit_from_histograms(hist + rng.normal(0, noise, hist.shape), 2, noise_std=noise))
        except ValueError:  # no bin stands out: no calibration, the model stays as it is
            continue
    temperatures = np.array([f.temperature for f in fits])
    assert len(fits) >= 10 and np.median(temperatures) < 1.2 and np.all(temperatures < 2.0), temperatures
    assert np.median(np.abs([f.bias for f in fits])) < 0.15


def test_a_five_class_temperature_from_the_histograms_is_near_the_softmax_fit():
    """A five-class model right half the time with logits x 4: the temperature from the top-label histograms is
    within 25 % of the one that maximises the softmax likelihood (4.0); the top-label log-odds without the
    log(K - 1) offset would ask for 9.6 (sigmoid(score / T) gives the top class 1/2 at large T, the softmax 1/5)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    rng = np.random.default_rng(3)
    z, y = _multiclass_logits(rng, 3000, scale=4.0)
    best = math.exp(minimize_scalar(lambda lt: -np.mean(log_softmax(z / math.exp(lt), 1)[np.arange(len(y)), y]),
                                    bounds=(-3, 5), method="bounded").x)
    fit = fit_from_histograms(calibration_histograms(z, y), 5)
    assert best == pytest.approx(4.0, rel=0.05) and fit.temperature == pytest.approx(best, rel=0.25)
    assert fit_scaling(*calibration_scores(z, y), platt=False).temperature > 2 * best  # without the offset


def test_server_pools_the_sites_releases():
    rng = np.random.default_rng(2)
    z, y = _binary_logits(rng, 900)
    parts = np.array_split(np.arange(900), 3)
    releases = [SiteRelease(site=f"s{i}", status="ok", epsilon=1.0, records={"calibration": {
        "hist": calibration_histograms(z[p], y[p]).ravel().tolist(), "num_classes": 2, "bins": N_BINS,
        "sigma_hist": 0.0}}) for i, p in enumerate(parts)]
    releases.append(SiteRelease(site="s3", status="refused by policy", records={}))
    out = fit_releases(releases, 2)
    whole = fit_from_histograms(calibration_histograms(z, y), 2)
    assert out["fitted"] and out["sites"] == ["s0", "s1", "s2"] and out["missing"] == ["s3 (refused by policy)"]
    assert out["scale"] == pytest.approx(whole.scale) and out["bias"] == pytest.approx(whole.bias)
    assert not fit_releases(releases[3:], 2)["fitted"]


def test_non_finite_scores_go_to_their_own_bin_and_out_of_the_fit():
    z = np.array([[0.0, np.nan], [np.inf, 0.0], [0.0, 2.0], [0.0, -30.0], [0.0, 30.0]])
    hist = calibration_histograms(z, [1, 0, 1, 1, 0])
    assert hist.sum() == 5 and hist[:, NONFINITE_BIN].sum() == 2
    assert hist[1, 0] == 1 and hist[0, NONFINITE_BIN - 1] == 1  # the end bins catch the rest


# ------------------------------------------------------------------------------------------ the head

@pytest.mark.parametrize("k,calibration", [(2, Calibration("platt", 0.4, -0.7, 1.0)),
                                           (5, Calibration("temperature", 1 / 2.5, 0.0, 1.0))])
def test_folded_head_gives_the_probabilities_of_the_scaled_logits(k, calibration):
    torch.manual_seed(0)
    model = build_model("cnn", k).eval()
    x = torch.rand(6, 1, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(torch.as_tensor(calibration.apply(model(x).double().numpy())), 1)
        fold_into_head(model, calibration)
        folded = torch.softmax(model(x).double(), 1)
        fresh = build_model("cnn", k).eval()  # any loader of the plain state dict
        fresh.load_state_dict(model.state_dict())
        loaded = torch.softmax(fresh(x).double(), 1)
    assert torch.allclose(folded, expected, atol=1e-5) and torch.allclose(loaded, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ ECE and Brier

def test_ece_and_brier_known_values():
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3]])
    labels = np.array([1, 1, 0, 0])
    # one record per bin: |right - confidence| = 0.2, 0.6, 0.9, 0.3
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5)
    assert brier_score(probs, labels) == pytest.approx((0.04 + 0.36 + 0.81 + 0.09) / 4)  # (p1 - y)^2
    same_bin = np.array([[0.9, 0.1], [0.08, 0.92]])  # confidences 0.90 and 0.92: one bin, accuracy 1/2
    assert expected_calibration_error(same_bin, [0, 0]) == pytest.approx(abs(0.5 - 0.91))
    three = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert brier_score(three, [0, 1]) == pytest.approx(((0.25 + 0.09 + 0.04) + (0.01 + 0.81 + 0.64)) / 2)
    assert expected_calibration_error(three, [0, 1]) == pytest.approx((0.5 + 0.8) / 2)
    perfect = np.eye(3)[[0, 2, 1]]
    assert probability_metrics(perfect, [0, 2, 1]) == {"ece": 0.0, "brier": 0.0}
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), []))


# ------------------------------------------------------------------------------------------ real scans

def test_calibration_from_the_val_split_lowers_breastmnist_holdout_ece(tmp_path):
    """A model trained where the prevalence differs from the clinic's (a balanced training sample: 147 malignant,
    147 benign; the val and test splits keep BreastMNIST's 27 % malignant) gives probabilities that do not match
    the holdout's frequencies; the Platt scaling fitted from the val split's histograms, as a site releases them
    and the server fits them, brings the holdout's ECE, Brier score and loss down."""
    if not BREAST.is_file():
        pytest.skip(f"{BREAST} is absent (real BreastMNIST images; see shared/data/README.md)")
    data = np.load(BREAST)
    x = {s: (data[f"{s}_images"] / 255.0)[:, None].astype(np.float32) for s in ("train", "val", "test")}
    y = {s: data[f"{s}_labels"].ravel().astype(np.int64) for s in ("train", "val", "test")}
    rng = np.random.default_rng(0)
    benign, malignant = np.flatnonzero(y["train"] == 1), np.flatnonzero(y["train"] == 0)
    balanced = np.concatenate([malignant, rng.choice(benign, len(malignant), replace=False)])
    torch.manual_seed(0)
    model = build_model("cnn")  # 28 px
    train_epochs(model, make_loader(x["train"][balanced], y["train"][balanced], 32, shuffle=True, seed=0), epochs=3,
                 lr=3e-3, optimizer="adam", device=torch.device("cpu"))
    n = len(y["val"])  # the val split as a site releases it (one image per patient; unnoised here), the server's fit
    frame = pd.DataFrame({"patient_id": [f"v{i}" for i in range(n)], "label": y["val"], "split": "val"})
    out = produce_calibration(_site(frame, x["val"], tmp_path), model, {}, Releaser(None, 0.0))
    fit = fit_releases([SiteRelease(site="breast", status="ok", records={"calibration": out})], 2)
    assert fit["fitted"] and fit["records"] == n
    test = make_loader(x["test"], y["test"], 256)
    raw = predict_proba(model, test, torch.device("cpu"))
    fold_into_head(model, Calibration.from_json(fit))
    calibrated = predict_proba(model, test, torch.device("cpu"))
    before, after = probability_metrics(raw, y["test"]), probability_metrics(calibrated, y["test"])
    assert after["ece"] < before["ece"] - 0.02 and after["brier"] < before["brier"], (before, after, fit)
    loss = [float(-np.mean(np.log(p[np.arange(len(p)), y["test"]]))) for p in (raw, calibrated)]
    assert loss[1] < loss[0]


# ------------------------------------------------------------------------------------------ the site's release

def _site(frame: pd.DataFrame, images: np.ndarray, path: Path) -> LocalSite:
    data = SiteData(images=images, labels=frame["label"].to_numpy(np.int64), frame=frame.reset_index(drop=True),
                    rejected=[])
    return LocalSite(name="alpha", path=path, data=data, split=frame["split"].reset_index(drop=True))


def test_a_five_image_patient_moves_the_histograms_by_at_most_one(tmp_path):
    rng = np.random.default_rng(7)
    n = 90
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "label": rng.integers(0, 2, n),
                          "split": rng.choice(["train", "val", "test"], n)})
    images = rng.uniform(0, 1, (n, 1, 32, 32)).astype(np.float32)
    for k in (2, 5):
        model = build_model("cnn", k)
        for split in ("val", "train"):
            target = frame.index[frame["split"] == split][0]
            with_patient = pd.concat([frame, frame.loc[[target] * 4]], ignore_index=True)  # five images in all
            images_with = np.concatenate([images, rng.uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)])
            without = frame.drop(index=target).reset_index(drop=True)
            a, b = Releaser(None, 0.0), Releaser(None, 0.0)
            out_a = produce_calibration(_site(with_patient, images_with, tmp_path), model, {}, a)
            out_b = produce_calibration(_site(without, np.delete(images, target, axis=0), tmp_path), model, {}, b)
            assert a.released == {"calibration/hist": 0.0}  # one vector, declared sensitivity 1 (x noise 0)
            moved = float(np.linalg.norm(np.asarray(out_a["hist"]) - np.asarray(out_b["hist"])))
            assert moved == (1.0 if split == "val" else 0.0), (k, split, moved)
            assert len(out_a["hist"]) == 2 * N_BINS and out_a["num_classes"] == k


def test_a_site_that_trained_with_dp_this_run_scores_its_training_patients_too(tmp_path):
    """The table counts the validation patients, and the training patients as well where the site's ledger holds
    DP-SGD steps of this very run (another run's steps, or none, leave them out); one record per patient either
    way, and the release is charged."""
    rng = np.random.default_rng(8)
    n = 60
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "label": rng.integers(0, 2, n),
                          "split": ["train"] * 40 + ["val"] * 15 + ["test"] * 5})
    frame = pd.concat([frame, frame.iloc[[0, 45]]], ignore_index=True)  # a second image of a train and a val patient
    images = rng.uniform(0, 1, (len(frame), 1, 32, 32)).astype(np.float32)
    site = _site(frame, images, tmp_path)
    ledger = PrivacyLedger.open(tmp_path, delta=1e-5, max_epsilon=None, fingerprint="fp")
    ledger.charge(3.0, 1.0, 1, kind="train", round=1, run_id="run-a")
    torch.manual_seed(0)
    model = build_model("cnn")
    counts = {}
    for run_id in ("run-a", "run-b"):
        releaser = Releaser(ledger, 0.5, run_id=run_id, rng=np.random.default_rng(0))
        out = produce_calibration(site, model, {}, releaser)
        counts[run_id] = float(np.sum(out["hist"]))  # noise std 0.5 x sqrt(70 cells) = 4.2 on the sum
    assert counts["run-a"] == pytest.approx(55, abs=12) and counts["run-b"] == pytest.approx(15, abs=12)
    assert [e["label"] for e in ledger.entries if e["kind"] == "release"] == ["calibration/hist"] * 2


SCENARIO = """
name = "calibration"
seed = 5
image_size = 32
[defaults]
n = 120
[[sites]]
name = "gamma"
[holdout]
n = 60
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from simulations.generator import generate_consortium

    out = tmp_path_factory.mktemp("calibration")
    (out / "s.toml").write_text(SCENARIO)
    sites = generate_consortium(out / "s.toml", out / "data")
    return sites[0], out / "data" / "holdout"


@pytest.fixture
def site_dir(generated, tmp_path):
    dest = tmp_path / "gamma"
    shutil.copytree(generated[0], dest, ignore=shutil.ignore_patterns(".equifed"))
    return dest


def _context(site_dir, **overrides):
    run_config = {**RUN_CONFIG, "image-size": 32, **overrides}
    return Context(run_id=1, node_id=7, node_config={"data-path": str(site_dir), "site": "gamma"}, state=RecordDict(),
                   run_config=run_config)


def _query(model, server_round=1):
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"statistics": "calibration", "server-round": server_round,
                                                  "seed": 0})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.QUERY)


@pytest.mark.usefixtures("task_identity")
def test_the_site_releases_the_histograms_noised_and_charged_or_refuses(site_dir):
    torch.manual_seed(0)
    model = build_model("cnn")
    reply = statistics(_query(model), _context(site_dir, **{"release-noise": 2.0}))
    assert not reply.has_error()
    record = reply.content["calibration"]
    released = np.asarray(record["hist"])
    assert released.shape == (2 * N_BINS,) and record["sigma_hist"] == 2.0 and record["num_classes"] == 2
    exact, _ = site_histograms(open_site(site_dir, image_size=32, seed=RUN_CONFIG["seed"]), model)  # as the handler
    assert exact.sum() > 0 and not np.allclose(released, exact.ravel())  # noised
    assert np.std(released - exact.ravel()) == pytest.approx(2.0, rel=0.5)
    metrics = reply.content["metrics"]
    assert metrics["epsilon"] > metrics["epsilon-before"]
    ledger = PrivacyLedger.open(site_dir, delta=1e-5, max_epsilon=None, fingerprint=dataset_fingerprint(site_dir))
    assert ledger.entries[-1]["kind"] == "release" and ledger.entries[-1]["label"] == "calibration/hist"
    assert ledger.entries[-1]["sigma"] == 2.0

    (site_dir / "site.toml").write_text('release = ["shift"]\n')  # the site does not release calibration
    ledger_path(site_dir).unlink()  # (and its witness: a fresh copy of the site, so nothing is hidden)
    (site_dir / ".equifed" / "ledger_witness.json").unlink(missing_ok=True)
    refused = statistics(_query(model), _context(site_dir, **{"release-noise": 2.0}))
    assert refused.has_error() and refused.error.code == POLICY_REFUSED and "release" in refused.error.reason
    assert not ledger_path(site_dir).exists()  # nothing computed, nothing charged


class _InProcessStrategy:
    """The strategy's query, answered by the real ClientApp handler in this process (no Flower simulation)."""

    def __init__(self, contexts):
        self.contexts = contexts

    def query(self, grid, arrays, request, phase, timeout):
        config = ConfigRecord(request.to_config())
        return [statistics(Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=7,
                                   message_type=MessageType.QUERY), ctx) for ctx in self.contexts]


@pytest.mark.usefixtures("task_identity")
def test_the_last_round_hook_writes_the_fit_and_the_calibrated_model(generated, site_dir, tmp_path):
    from core_models.config import run_config_of
    from server.hooks import CalibrationStep, HoldoutEvaluation, Round

    cfg = run_config_of({**RUN_CONFIG, "image-size": 32, "release-noise": 1.0, "calibrate": True})
    holdout = HoldoutEvaluation(cfg.train, generated[1])
    out = tmp_path / "run"
    out.mkdir()
    torch.manual_seed(3)
    model = build_model("cnn")
    with torch.no_grad():  # an over-confident model: every logit x 8
        model.head.weight.mul_(8.0)
        model.head.bias.mul_(8.0)
    hook = CalibrationStep(None, _InProcessStrategy([_context(site_dir, **{"release-noise": 1.0})]), cfg, out, holdout)
    rnd = Round(5, 5, ArrayRecord(model.state_dict()), {"round": 5})
    holdout(rnd)
    hook(rnd)
    fit = json.loads((out / "calibration.json").read_text())
    assert fit["round"] == 5 and fit["fitted"] and fit["sites"] == ["gamma"] and fit["noise_std_per_cell"] == 1.0
    row = rnd.row
    assert row["calibration_temperature"] == pytest.approx(fit["temperature"])
    for key in ("loss", "ece", "brier", "auroc"):
        assert math.isfinite(row[f"holdout_calibrated_{key}"]) and math.isfinite(row[f"holdout_{key}"])
    saved = torch.load(out / "calibrated_model.pt", weights_only=True)
    card = json.loads((out / "calibrated_model.json").read_text())
    assert card["model"] == "cnn" and card["num_classes"] == 2 and card["calibration"]["round"] == 5
    fresh = build_model("cnn")
    fresh.load_state_dict(saved)
    x = torch.as_tensor(holdout.images[:8])
    with torch.no_grad():
        expected = torch.softmax(torch.as_tensor(Calibration.from_json(fit).apply(model(x).double().numpy())), 1)
        assert torch.allclose(torch.softmax(fresh(x).double(), 1), expected, atol=1e-5)
    assert "HOLDOUT calibrated" in round_table(5, [], row)


# ------------------------------------------------------------------------------------------ the regression guard

def test_better_ranking_with_a_higher_raw_loss_is_a_note_and_worse_ranking_a_warning():
    start = {"round": 0, "holdout_auroc": 0.48, "holdout_loss": 0.69}
    better = [start, {"round": 5, "holdout_auroc": 0.96, "holdout_loss": 0.85, "holdout_ece": 0.12}]
    assert regressions(better) == []
    (note,) = calibration_notes(better)
    assert "AUROC 0.480 -> 0.960" in note and "loss 0.690 -> 0.850" in note and "calibrate = true" in note
    calibrated = [start, {**better[1], "holdout_calibrated_loss": 0.30, "holdout_calibrated_ece": 0.04,
                          "calibration_temperature": 2.5, "calibration_bias": -0.1}]
    assert regressions(calibrated) == []
    (note,) = calibration_notes(calibrated)
    assert "holdout loss 0.300, ECE 0.040" in note and "temperature 2.500" in note and "still above" not in note
    worse = [start, {"round": 5, "holdout_auroc": 0.40, "holdout_loss": 0.60}]
    assert regressions(worse) == ["the final global model (round 5) is worse than the round-0 model it started "
                                  "from on the holdout: auroc 0.480 -> 0.400"]
    assert calibration_notes(worse) == []
    flat = [start, {"round": 5, "holdout_auroc": 0.48, "holdout_loss": 0.80}]  # no better, and worse probabilities
    assert regressions(flat) == ["the final global model (round 5) is worse than the round-0 model it started "
                                 "from on the holdout: loss 0.690 -> 0.800"]
    flat_calibrated = [start, {**flat[1], "holdout_calibrated_loss": 0.68, "calibration_temperature": 1.5}]
    assert regressions(flat_calibrated) == [] and len(calibration_notes(flat_calibrated)) == 1
