"""The best global model (best_model.pt) and patience: the tracking rules on their own, then one real federated
run whose holdout labels are flipped, so that every round of learning makes the holdout AUROC worse (its loss
can dip while the probabilities sit near 0.5, so the test follows the AUROC): the best round is the first, and patience 1 stops the run after the second of three planned rounds."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from core_models.networks import build_model
from server.checkpoint import (BEST_MODEL, BestTracker, CheckpointError, choose_best_metric, pooled, read_checkpoint,
                               restore_best_model, save_checkpoint, save_model)
from server.results import round_table
from tests.conftest import ONE_ACTOR


# --- the rules -----------------------------------------------------------------------------------------------

def test_loss_is_kept_lowest_and_a_tie_keeps_the_earlier_round():
    best = BestTracker("val-loss")
    assert [best.update(r, v) for r, v in enumerate([0.7, 0.5, 0.5, 0.6, 0.4], start=1)] == [
        True, True, False, False, True]
    assert (best.best_round, best.best_value, best.stale) == (5, 0.4, 0)
    assert not best.should_stop  # patience 0: never


def test_auroc_is_kept_highest():
    best = BestTracker("holdout-auroc")
    for r, v in enumerate([0.6, 0.8, 0.7], start=1):
        best.update(r, v)
    assert (best.best_round, best.best_value, best.stale) == (2, 0.8, 1)


def test_patience_counts_rounds_with_a_value_since_the_best():
    best = BestTracker("val-loss", patience=2)
    best.update(1, 0.5)
    best.update(2, 0.6)
    assert not best.should_stop
    best.update(3, math.nan)  # withheld this round: neither better nor a strike
    best.update(4, None)
    assert best.stale == 1 and not best.should_stop
    best.update(5, 0.55)
    assert best.stale == 2 and best.should_stop
    best.update(6, 0.45)  # an improvement resets the count
    assert best.stale == 0 and not best.should_stop and best.best_round == 6


def test_none_keeps_nothing():
    best = BestTracker("none", patience=1)
    assert not best.update(1, 0.3)
    assert best.best_round is None and not best.should_stop


@pytest.mark.parametrize("patience", [-1, 1.5, "two"])
def test_bad_patience_is_refused(patience):
    with pytest.raises(ValueError, match="patience"):
        BestTracker("val-loss", patience=patience)


def test_metric_choice_under_dp_and_without_holdout():
    assert choose_best_metric("val-auroc", dp=False, has_holdout=False) == ("val-auroc", "")
    metric, note = choose_best_metric("val-loss", dp=True, has_holdout=True)
    assert metric == "holdout-loss" and "withhold" in note
    metric, note = choose_best_metric("val-auroc", dp=True, has_holdout=False)
    assert metric == "none" and "no best model" in note
    assert choose_best_metric("holdout-auroc", dp=True, has_holdout=True) == ("holdout-auroc", "")
    with pytest.raises(ValueError, match="holdout-path"):
        choose_best_metric("holdout-loss", dp=False, has_holdout=False)
    with pytest.raises(ValueError, match="choose one of"):
        choose_best_metric("val-acc", dp=False, has_holdout=True)


def test_pooled_weights_by_num_examples_and_skips_withheld_sites():
    rows = [{"val-loss": 0.2, "num-examples": 300}, {"val-loss": 0.6, "num-examples": 100},
            {"val-loss": math.nan, "num-examples": 500}]
    assert pooled(rows, "val-loss") == pytest.approx((0.2 * 300 + 0.6 * 100) / 400)
    assert math.isnan(pooled(rows[2:], "val-loss"))
    assert math.isnan(pooled(rows, "val-auroc"))


def test_resume_gets_the_best_so_far_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    models = [build_model("cnn", 2).state_dict() for _ in range(3)]
    best = BestTracker("val-auroc", patience=3)
    for r, auroc in enumerate([0.61, 0.74, 0.70], start=1):
        if best.update(r, auroc):
            save_model(tmp_path / BEST_MODEL, models[r - 1])
        save_checkpoint(tmp_path, r, models[r - 1], {}, {"global": [], "sites": [], "best": best.to_json()})
    saved = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")["history"]["best"]
    resumed = BestTracker.from_json(saved, patience=1)  # the resumed run's own patience
    assert (resumed.metric, resumed.best_round, resumed.best_value, resumed.stale) == ("val-auroc", 2, 0.74, 1)
    assert resumed.should_stop

    save_model(tmp_path / BEST_MODEL, models[2])  # the server died after writing a best that the resume redoes
    restore_best_model(tmp_path, resumed.best_round)
    restored = torch.load(tmp_path / BEST_MODEL, weights_only=True)
    assert all(torch.equal(restored[k], models[1][k]) for k in models[1])

    (tmp_path / "checkpoints" / "round_002.pt").unlink()
    restore_best_model(tmp_path, 2)  # best_model.pt alone is kept as it is
    (tmp_path / BEST_MODEL).unlink()
    with pytest.raises(CheckpointError, match="round 2 the best"):
        restore_best_model(tmp_path, 2)


def test_a_fresh_run_forgets_an_earlier_best_model_and_its_card(tmp_path):
    from core_models.config import run_config_of
    from core_models.model_card import card_path, write_card
    from server.hooks import BestModel

    save_model(tmp_path / BEST_MODEL, build_model("cnn", 2).state_dict())
    write_card(tmp_path / BEST_MODEL, "cnn", 2, 32)
    cfg = run_config_of({"best-by": "val-loss"})
    BestModel(tmp_path, cfg.server, dp=False).resume(None)
    assert not (tmp_path / BEST_MODEL).exists() and not card_path(tmp_path / BEST_MODEL).exists()


def test_round_table_says_best_and_stop():
    row = {"round": 3, "holdout_loss": 0.5, "val_loss": 0.41, "val_auroc": 0.8, "best_metric": "val-loss",
           "best_round": 2, "best_value": 0.4, "stopped": "no improvement in val-loss for 1 round(s)"}
    text = round_table(3, [], row)
    assert "VALIDATION (sites) | loss 0.410 | AUROC 0.800 | best: round 2 (val-loss 0.400)" in text
    assert "STOPPED EARLY: no improvement in val-loss for 1 round(s)" in text
    plain = round_table(0, [], {"round": 0, "holdout_loss": 0.7, "best_round": math.nan, "stopped": math.nan})
    assert "VALIDATION" not in plain and "STOPPED" not in plain  # NaN cells read back from metrics.csv


# --- one real run --------------------------------------------------------------------------------------------

SCENARIO = """
name = "tiny-stop"
seed = 5
image_size = 32

[defaults]
n = 120
prevalence = 0.4
lesion_contrast = 0.6

[[sites]]
name = "alpha"

[[sites]]
name = "beta"

[holdout]
n = 100
"""


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    from simulations.generator import generate_consortium
    from simulations.run import main as simulate

    out = tmp_path_factory.mktemp("stop")
    (out / "tiny.toml").write_text(SCENARIO)
    generate_consortium(out / "tiny.toml", out / "data")
    manifest = out / "data" / "holdout" / "manifest.csv"
    frame = pd.read_csv(manifest)
    frame["label"] = 1 - frame["label"]  # the better the model, the worse its holdout loss
    frame.to_csv(manifest, index=False)
    code = simulate([str(out / "tiny.toml"), "--out", str(out), "--rounds", "3", "--timeout", "300", *ONE_ACTOR,
                     "-c", "local-epochs=2", "-c", "learning-rate=0.003", "-c", "best-by=holdout-auroc",
                     "-c", "patience=1"])
    assert code == 0
    return out


def test_patience_stops_the_run_and_keeps_the_best_round(stopped_run):
    metrics = pd.read_csv(stopped_run / "metrics.csv")
    summary = json.loads((stopped_run / "summary.json").read_text())
    assert summary["flower_status"] == "finished:completed"
    assert list(metrics["round"]) == [0, 1, 2]  # of 3 planned
    assert (summary["stopped_early"], summary["stopped_at_round"], summary["rounds"], summary["planned_rounds"]) == (
        True, 2, 2, 3)
    trained = metrics[metrics["round"] >= 1]
    best = trained.loc[trained["holdout_auroc"].idxmax()]
    assert (summary["best_metric"], summary["best_round"]) == ("holdout-auroc", int(best["round"]))
    assert summary["best_value"] == pytest.approx(best["holdout_auroc"])
    assert summary["best_round"] == 1 and summary["best_model"] == BEST_MODEL
    assert "STOPPED EARLY" in (stopped_run / "flower.log").read_text()


def test_best_model_is_the_best_rounds_global_model(stopped_run):
    model = build_model("cnn", 2)
    best = torch.load(stopped_run / BEST_MODEL, weights_only=True)
    model.load_state_dict(best)  # loads like final_model.pt
    round_1 = read_checkpoint(stopped_run / "checkpoints" / "round_001.pt")["model"]
    round_2 = read_checkpoint(stopped_run / "checkpoints" / "round_002.pt")["model"]
    final = torch.load(stopped_run / "final_model.pt", weights_only=True)
    assert all(torch.equal(best[k], round_1[k]) for k in round_1)
    assert all(torch.equal(final[k], round_2[k]) for k in round_2)  # final_model.pt: the last round run
    assert not all(torch.equal(best[k], final[k]) for k in final)


def test_pooled_validation_per_round(stopped_run):
    metrics = pd.read_csv(stopped_run / "metrics.csv").set_index("round")
    sites = pd.read_csv(stopped_run / "per_site.csv")
    for r in (1, 2):
        train = sites[(sites["round"] == r) & (sites["phase"] == "train")]
        assert len(train) == 2
        expected = (train["val-loss"] * train["num-examples"]).sum() / train["num-examples"].sum()
        assert metrics.loc[r, "val_loss"] == pytest.approx(expected)
