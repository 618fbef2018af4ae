"""`equifed-simulate --baselines` (simulations/baselines.py) on real BreastMNIST rows: each site's model trained
alone, one on the pooled sites and the federated one, scored on the holdout and on each site's own rows; under DP
with the run's recipe, charging scratch ledgers, never the sites' own."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.ledger import LEDGER_FILE
from core_models.config import run_config_of
from core_models.networks import build_model
from server.app import initial_model
from simulations.baselines import (BASELINES_CSV, Training, baselines_table, benefit_lines, load_rows, run_alone,
                                   run_baselines, run_federated, scores, snapshot)
from simulations.partition import main as partition
from simulations.run import main as simulate

BREAST = Path(__file__).parents[2] / "shared" / "data" / "breastmnist.npz"
SLICE = {"train": 120, "val": 24, "test": 80}  # the first rows of each official split


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    """Two IID sites and the holdout from a slice of BreastMNIST, written by equifed-partition."""
    if not BREAST.is_file():
        pytest.skip(f"{BREAST} is absent (real BreastMNIST images; see shared/data/README.md)")
    root = tmp_path_factory.mktemp("baselines")
    data = np.load(BREAST)
    sliced = {f"{s}_{k}": data[f"{s}_{k}"][:n] for s, n in SLICE.items() for k in ("images", "labels")}
    np.savez(root / "slice.npz", **sliced)
    assert partition([str(root / "slice.npz"), "--out", str(root / "sites"), "-k", "2", "--seed", "0"]) == 0
    return root / "sites"


def _make(cfg):
    return lambda: build_model(cfg.train.model, cfg.train.num_classes, cfg.train.in_channels)


def _initial(cfg):
    torch.manual_seed(cfg.train.seed)  # as the ServerApp draws its round-0 model
    return snapshot(initial_model(cfg))


def _site_dirs(root: Path) -> list[Path]:
    return [root / "site_1", root / "site_2"]


def test_each_site_alone_and_the_pool_beside_the_federated_model(sites, tmp_path):
    cfg = run_config_of({"image-size": 28, "num-server-rounds": 3, "seed": 0, "model": "scatter-linear"})  # adam
    rows, holdout = load_rows(_site_dirs(sites), sites / "holdout", cfg)
    federated = run_federated(_make(cfg), _initial(cfg), rows, Training.of(cfg), tmp_path / "fed", seed=0)["state"]
    table = run_baselines(cfg, _site_dirs(sites), sites / "holdout", ["local", "central"], tmp_path, federated,
                          federated_epsilon=math.inf)

    written = pd.read_csv(tmp_path / BASELINES_CSV)
    assert len(written) == 12 and set(written["model"]) == {"federated", "central", "site_1", "site_2"}
    assert set(written["scored_on"]) == {"holdout", "site_1", "site_2"}
    # equifed-partition's sites fix a split without test rows: their own rows are their val rows
    assert set(written.loc[written["scored_on"] != "holdout", "split"]) == {"val"}
    n_train = written.groupby("model")["n_train"].first()
    assert n_train["central"] == n_train["site_1"] + n_train["site_2"] == n_train["federated"] == SLICE["train"]
    assert (written.loc[written["scored_on"] == "holdout", "n"] == SLICE["test"]).all()
    assert np.allclose(written["auroc"], table["auroc"])

    # site_1's baseline is site_1's rows alone, with the run's rounds, epochs and seeds (nothing pooled into it)
    alone = run_alone(_make(cfg), _initial(cfg), rows[0].x, rows[0].y, len(rows[0].y_own), rows[0].n_manifest,
                      Training.of(cfg), tmp_path / "again", seed=0)
    model = _make(cfg)()
    model.load_state_dict(alone["state"])
    again = scores(model, *holdout)
    mine = written[(written["model"] == "site_1") & (written["scored_on"] == "holdout")].iloc[0]
    assert (mine["auroc"], mine["accuracy"], mine["brier"]) == pytest.approx(
        (again["auroc"], again["accuracy"], again["brier"]), abs=1e-9)
    central = written[(written["model"] == "central") & (written["scored_on"] == "holdout")].iloc[0]
    assert central["auroc"] > 0.7, central  # it learned: 3 rounds x 2 epochs on 120 real scans (seeds 0-2: 0.79-0.84)
    assert written["epsilon"].map(math.isinf).all()  # no DP: no guarantee claimed

    lines = benefit_lines(written)
    for site in ("site_1", "site_2"):
        row = written[(written["model"] == site) & (written["scored_on"] == "holdout")].iloc[0]
        assert any(line.split()[:2] == [site, str(int(row["n_train"]))] and f"{row['auroc']:.3f}" in line
                   for line in lines), lines


def test_dp_baselines_train_the_recipe_and_charge_scratch_ledgers_only(sites, tmp_path):
    cfg = run_config_of({"image-size": 28, "num-server-rounds": 2, "seed": 0, "dp": True, "target-epsilon": 4.0})
    training = Training.of(cfg)
    assert (cfg.train.model, training.optimizer, training.lr, training.batch_size, training.local_epochs) == (
        "scatter-linear", "sgd", 0.5, 256, 1)  # dp = true and nothing else set: the DP recipe
    rows, holdout = load_rows(_site_dirs(sites), sites / "holdout", cfg)
    table = baselines_table(cfg, rows, holdout, _make(cfg), _initial(cfg), None, ["local", "central"],
                            tmp_path / "work", noise_seed=0)
    spent = table.groupby("model")["epsilon"].first()
    assert set(spent.index) == {"central", "site_1", "site_2"}
    assert ((spent > 3.9) & (spent <= 4.0 + 1e-6)).all(), spent  # the plan spends the target, never more
    assert sorted(p.parent.name for p in (tmp_path / "work").rglob(LEDGER_FILE)) == [".equifed"] * 3
    for site in _site_dirs(sites):
        assert not list(site.rglob(LEDGER_FILE)), site  # the sites' own budgets are untouched
    assert table["auroc"].between(0.0, 1.0).all() and table["brier"].between(0.0, 1.0).all()


@pytest.mark.parametrize("extra, message", [
    (["--baselines", "local,pooled"], "--baselines takes a comma-separated list of ['local', 'central']"),
    (["--baselines", "local", "-c", "pretext=rotation"], "--baselines trains plain classifiers"),
])
def test_a_bad_baselines_request_exits_2_before_the_run(sites, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert simulate(["--sites", str(sites), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "run_overrides.json").exists()  # nothing started


def test_baselines_need_a_holdout(sites, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "site_1").symlink_to(sites / "site_1", target_is_directory=True)
    assert simulate(["--sites", str(bare), "--out", str(tmp_path / "run"), "--baselines", "local"]) == 2
    assert "--baselines scores every model on the holdout" in capsys.readouterr().err
