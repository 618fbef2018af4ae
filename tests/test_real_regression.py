"""The regression guard (server.results.regressions) on the rows real DP runs produce: BreastMNIST scans at two
sites, the DP recipe (scatter-linear, full-batch DP-SGD, epsilon 8), the calibration fitted from the sites' noised
validation histograms. A run that learned to rank the holdout ends without a warning even though its raw
probabilities are over-confident (holdout loss up); a run whose DP noise undid a good start still warns."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.calibration_stats import produce_calibration
from client.ledger import PrivacyLedger
from client.site import LocalSite
from client.statistics import Releaser
from core_models.calibration import Calibration, fold_into_head, probability_metrics
from core_models.config import run_config_of
from core_models.data import SiteData
from core_models.networks import build_model
from core_models.training import evaluate, make_loader, predict_proba
from server.calibration import fit_releases
from server.results import calibration_notes, regressions
from server.site_statistics import SiteRelease
from simulations.baselines import SiteRows, Training, fresh, run_federated, snapshot

BREAST = Path(__file__).parents[2] / "shared" / "data" / "breastmnist.npz"
N_TRAIN, N_VAL, ROUNDS = 120, 39, 5  # per site: hospital-sized, and a few seconds
RELEASE_NOISE = 1.0  # the calibration histograms' noise multiplier (run config release-noise)


def _make():
    return build_model("scatter-linear")


@pytest.fixture(scope="module")
def breast():
    """Two sites of real scans (official train and val rows) and the official test split as the holdout."""
    if not BREAST.is_file():
        pytest.skip(f"{BREAST} is absent (real BreastMNIST images; see shared/data/README.md)")
    data = np.load(BREAST)
    x = {s: (data[f"{s}_images"] / 255.0)[:, None].astype(np.float32) for s in ("train", "val", "test")}
    y = {s: data[f"{s}_labels"].ravel().astype(np.int64) for s in ("train", "val", "test")}
    sites = [SiteRows(f"site_{j + 1}", x["train"][j * N_TRAIN:(j + 1) * N_TRAIN],
                      y["train"][j * N_TRAIN:(j + 1) * N_TRAIN], x["val"][j * N_VAL:(j + 1) * N_VAL],
                      y["val"][j * N_VAL:(j + 1) * N_VAL], N_TRAIN + N_VAL, own_split="val") for j in range(2)]
    return sites, (x["test"], y["test"])


def _calibration(sites: list[SiteRows], state: dict, work: Path, seed: int) -> Calibration:
    """Each site's noised, charged validation histograms (client.calibration_stats) and the server's fit."""
    releases = []
    for j, rows in enumerate(sites):
        n = len(rows.y_own)
        frame = pd.DataFrame({"patient_id": [f"{rows.name}-{i}" for i in range(n)], "label": rows.y_own,
                              "split": "val"})
        site = LocalSite(name=rows.name, path=work, split=frame["split"],
                         data=SiteData(images=rows.x_own, labels=rows.y_own, frame=frame, rejected=[]))
        (work / rows.name).mkdir(parents=True)
        ledger = PrivacyLedger.open(work / rows.name, delta=1e-3, fingerprint=rows.name)
        released = produce_calibration(site, fresh(_make, state), {},
                                       Releaser(ledger, RELEASE_NOISE, rng=np.random.default_rng([seed, j])))
        releases.append(SiteRelease(site=rows.name, status="ok", records={"calibration": released}))
    fit = fit_releases(releases, 2)
    assert fit["fitted"], fit
    return Calibration.from_json(fit)


def _row(rnd: int, state: dict, holdout: tuple, calibration: Calibration | None = None) -> dict:
    """A round's row of metrics.csv as the server fills it (HoldoutEvaluation.metrics, the calibration step)."""
    model, loader = fresh(_make, state), make_loader(*holdout, 256)
    metrics = {**evaluate(model, loader), **probability_metrics(predict_proba(model, loader), holdout[1])}
    row = {"round": rnd, **{f"holdout_{k}": v for k, v in metrics.items()}}
    if calibration is not None:
        fold_into_head(model, calibration)
        row.update({f"holdout_calibrated_{k}": v for k, v in evaluate(model, loader).items()})
        row.update(calibration_temperature=calibration.temperature, calibration_bias=calibration.bias)
    return row


def _dp_run(sites, holdout, start: dict, training: Training, work: Path, seed: int) -> tuple[list[dict], dict]:
    """Round 0 and the final round of an in-process federated DP run (client.dp, scratch ledgers, seeded draws),
    and its final state."""
    final = run_federated(_make, start, sites, training, work / "train", seed=seed, noise_seed=seed)
    assert max(final["spent"]) <= training.epsilon + 1e-6
    rows = [_row(0, start, holdout), _row(ROUNDS, final["state"], holdout,
                                          _calibration(sites, final["state"], work / "calibration", seed))]
    return rows, final["state"]


def _recipe() -> Training:
    """What dp = true trains with when nothing else is set (core_models.config: the DP recipe, epsilon 8)."""
    return Training.of(run_config_of({"dp": True, "num-server-rounds": ROUNDS, "image-size": 28}))


@pytest.fixture(scope="module")
def learned(breast, tmp_path_factory):
    sites, holdout = breast
    torch.manual_seed(0)
    return _dp_run(sites, holdout, snapshot(_make()), _recipe(), tmp_path_factory.mktemp("learned"), 0)


def test_a_dp_run_that_learned_ends_without_a_warning(learned):
    rows, _ = learned
    start, final = rows
    assert final["holdout_auroc"] > start["holdout_auroc"] + 0.2  # it learned to rank the scans
    assert final["holdout_calibrated_loss"] < start["holdout_loss"]  # and its calibrated probabilities are better
    assert regressions(rows) == []
    if final["holdout_loss"] > start["holdout_loss"]:  # over-confident raw probabilities: a note, not a warning
        (note,) = calibration_notes(rows)
        assert f"AUROC {start['holdout_auroc']:.3f} -> {final['holdout_auroc']:.3f}" in note


def test_a_dp_run_that_undid_a_good_start_still_warns(breast, learned, tmp_path):
    """From the first run's model, a second run at epsilon 0.5 (noise ~13x larger): the noise outweighs what the
    sites' gradients add, and the model ranks the holdout worse than it started."""
    sites, holdout = breast
    rows, _ = _dp_run(sites, holdout, learned[1], dataclasses.replace(_recipe(), epsilon=0.5), tmp_path, 1)
    start, final = rows
    assert final["holdout_auroc"] < start["holdout_auroc"] - 0.02
    warnings = regressions(rows)
    assert warnings and warnings[0].startswith("the final global model (round 5) is worse than the round-0 model")
    assert f"auroc {start['holdout_auroc']:.3f} -> {final['holdout_auroc']:.3f}" in warnings[0]
