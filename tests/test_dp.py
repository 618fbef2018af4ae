"""DP-SGD at the sites: noise sized for the whole run, every step in the ledger, budgets
enforced by the site, rolled-back ledgers refused by the server."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant

from client.dp import DPSettings, PatientData, plan_dp, train_dp
from client.ledger import PrivacyLedger
from client.ledger.accounting import epsilon_of
from core_models.networks import build_model
from simulations.generator import generate_consortium
from simulations.run import main as simulate
from tests.conftest import ONE_ACTOR


def test_plan_spends_the_target_over_all_rounds():
    plan = plan_dp(n_patients=400, batch_size=16, local_epochs=2, rounds=5, target_epsilon=3.0, delta=1e-5)
    assert plan.sample_rate == pytest.approx(16 / 400)
    assert plan.steps_per_round == 2 * 25
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, 5 * plan.steps_per_round)]
    assert acc.get_epsilon(1e-5) == pytest.approx(3.0, abs=0.05)
    acc.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    one_round = acc.get_epsilon(1e-5)
    assert 3.0 / 5 < one_round < 3.0 * 0.6  # a fraction; more than 1/5 because RDP composes sublinearly


def _toy(n=128, size=28, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.4, 0.1, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    x[y == 1, :, 8:16, 8:16] += 0.4
    return x, y


def _site_dir(tmp_path: Path, name: str) -> Path:
    site = tmp_path / name
    site.mkdir()
    (site / "manifest.csv").write_text("patient_id,image_path,label\n")
    return site


@pytest.mark.parametrize("physical", [16, 64])
def test_logical_batches_count_once_whatever_the_physical_size(tmp_path, physical):
    x, y = _toy()
    plan = plan_dp(len(y), batch_size=64, local_epochs=2, rounds=3, target_epsilon=8, delta=1e-5)
    ledger = PrivacyLedger.open(_site_dir(tmp_path, "s"), delta=1e-5, max_epsilon=100, fingerprint="toy")
    model = build_model("cnn")
    stats = train_dp(model, PatientData(x, y), plan, ledger,
                     DPSettings(max_grad_norm=1.0, physical_batch_size=physical))
    assert stats["steps"] == plan.steps_per_round == 4
    steps_in_ledger = sum(steps for _, _, steps in ledger_history(ledger))
    assert steps_in_ledger == plan.steps_per_round
    assert not any(k.startswith("_module.") for k in model.state_dict())
    assert set(model.state_dict()) == set(build_model("cnn").state_dict())


def ledger_history(ledger: PrivacyLedger) -> list[tuple[float, float, int]]:
    return [(e["sigma"], e["q"], e["steps"]) for e in ledger.entries if e["kind"] == "train"]


def test_fedprox_term_pulls_dp_training_towards_the_global_weights(tmp_path):
    """FedProx under DP-SGD: the term reaches the noised update (Opacus' step), same draws and noise otherwise."""
    x, y = _toy()
    plan = plan_dp(len(y), batch_size=32, local_epochs=2, rounds=1, target_epsilon=8, delta=1e-5)
    drift = {}
    for mu in (0.0, 50.0):
        ledger = PrivacyLedger.open(_site_dir(tmp_path, f"s{mu:g}"), delta=1e-5, max_epsilon=100, fingerprint="toy")
        torch.manual_seed(0)
        model = build_model("cnn")
        start = [p.detach().clone() for p in model.parameters()]
        stats = train_dp(model, PatientData(x, y), plan, ledger,
                         DPSettings(max_grad_norm=1.0, physical_batch_size=16, optimizer="sgd", lr=0.01,
                                    proximal_mu=mu),
                         sampling_rng=np.random.default_rng(1), noise_generator=torch.Generator().manual_seed(2))
        assert stats["steps"] == plan.steps_per_round
        drift[mu] = sum(((p.detach() - s) ** 2).sum().item() for p, s in zip(model.parameters(), start))
    assert drift[50.0] < 0.5 * drift[0.0]


def test_epsilon_grows_every_round_and_matches_opacus(tmp_path):
    x, y = _toy(96)
    plan = plan_dp(len(y), batch_size=32, local_epochs=1, rounds=3, target_epsilon=4, delta=1e-5)
    site = _site_dir(tmp_path, "s")
    eps = []
    for r in range(1, 4):
        ledger = PrivacyLedger.open(site, delta=1e-5, max_epsilon=100, fingerprint="toy")  # as a new round would
        train_dp(build_model("cnn"), PatientData(x, y), plan, ledger,
                 DPSettings(max_grad_norm=1.0, physical_batch_size=16), server_round=r)
        eps.append(ledger.epsilon())
    assert eps[0] < eps[1] < eps[2]
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)]
    assert eps[2] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert eps[2] == pytest.approx(4.0, abs=0.1)  # the planned total, reached after the planned rounds


SCENARIO = """
name = "dp-test"
seed = 3
image_size = 32
[defaults]
n = 120
lesion_contrast = 0.6
[[sites]]
name = "north"
[[sites]]
name = "south"
[[sites]]
name = "tiny_budget"
[holdout]
n = 100
"""

TARGET = 6.0
SECOND_TARGET = 4.0  # the second study's (test_deleted_ledger_is_refused_by_the_server)
DP = [*ONE_ACTOR, "-c", "dp=true", "-c", f"target-epsilon={TARGET}", "-c", "local-epochs=1", "-c", "batch-size=32",
      "-c", "physical-batch-size=16", "-c", "image-size=32", "-c", "min-train-nodes=2"]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    (out / "s.toml").write_text(SCENARIO)
    sites = generate_consortium(out / "s.toml", out / "data")
    # round 1 spends about 4.5 and round 2 about 6.1 (the noised patient counts move them a little): a cap
    # between the two lets round 1 through and stops round 2
    (sites[2] / "site.toml").write_text("max-epsilon = 5.3\n")
    code = simulate([str(out / "s.toml"), "--out", str(out), "--rounds", "2", "--timeout", "600", *DP])
    assert code == 0
    return out, sites


def test_small_budget_site_stops_others_finish(dp_run):
    out, sites = dp_run
    rows = pd.read_csv(out / "per_site.csv")
    train = rows[rows["phase"] == "train"]
    ok = train[train["status"] == "ok"]
    assert sorted(ok[ok["round"] == 2]["site"]) == ["north", "south"]
    assert set(ok[ok["round"] == 1]["site"]) == {"north", "south", "tiny_budget"}
    refused = train[(train["round"] == 2) & (train["site"] == "tiny_budget")]
    assert list(refused["status"]) == ["budget exhausted"]
    assert "5.3" in refused["error"].iloc[0]
    # epsilon reported per site grows round over round and never passes the run's target: the plan reserves the
    # noised patient counts (released once) inside target-epsilon, so the whole spend is at most the target
    north = ok[ok["site"] == "north"].sort_values("round")
    assert north["epsilon"].is_monotonic_increasing and north["epsilon"].iloc[0] < north["epsilon"].iloc[1]
    assert (ok["epsilon"] <= TARGET + 1e-9).all(), ok[["round", "site", "epsilon"]]
    for site in sites[:2]:  # the ledgers too (they hold the test-patient count charged after a reply)
        assert PrivacyLedger.open(site).epsilon() <= TARGET + 1e-9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flower_status"] == "finished:completed"


def test_ledgers_on_disk_agree_with_reports(dp_run):
    out, sites = dp_run
    rows = pd.read_csv(out / "per_site.csv")
    for site in sites[:2]:  # trained every round: the last reply reports the ledger as it stands
        ledger = PrivacyLedger.open(site)  # at the delta the site's policy chose when it first trained
        reported = rows[(rows["site"] == site.name) & (rows["status"] == "ok") & (rows["phase"] == "train")]
        assert ledger.epsilon() == pytest.approx(reported["epsilon"].max(), rel=1e-6)
    # the capped site's last training reply (round 1) came before its noised test count (the evaluation after
    # round 1) was charged: its ledger holds a little more than it reported, never more than its cap
    tiny = rows[(rows["site"] == "tiny_budget") & (rows["status"] == "ok") & (rows["phase"] == "train")]
    spent = PrivacyLedger.open(sites[2]).epsilon()
    assert tiny["epsilon"].max() <= spent <= 5.3
    registry = json.loads((out / "privacy_registry.json").read_text())
    assert len(registry) == 3


def test_deleted_ledger_is_refused_by_the_server(dp_run, tmp_path):
    out, sites = dp_run
    # on a copy of the run's sites and registry: the other tests read the originals, in any order
    data, registry_path = tmp_path / "data", tmp_path / "privacy_registry.json"
    shutil.copytree(out / "data", data)
    shutil.copy(out / "privacy_registry.json", registry_path)
    north_dir = data / sites[0].name
    first_run = PrivacyLedger.open(north_dir)
    old_history, old_epsilon, delta = first_run.history, first_run.epsilon(), first_run.delta
    old_runs = {e["run_id"] for e in first_run.entries if e["kind"] == "train"}
    # north loses its ledger and the witness beside it (a whole reset, which the site cannot see): the server's
    # registry refuses it; a lost ledger alone is refused by the site itself (tests/test_threats.py)
    (north_dir / ".equifed" / "privacy_ledger.json").unlink()
    (north_dir / ".equifed" / "ledger_witness.json").unlink()
    # a second study on the same sites (a new run folder; the server's registry of the first one)
    code = simulate(["--sites", str(data), "--out", str(tmp_path / "again"), "--rounds", "1", *DP,
                     "-c", f"target-epsilon={SECOND_TARGET}", "-c", f"registry-path={registry_path}"])
    assert code == 0
    rows = pd.read_csv(tmp_path / "again" / "per_site.csv")
    north = rows[(rows["site"] == "north") & (rows["phase"] == "train")]
    assert list(north["status"]) == ["refused"]
    assert "ledger is missing" in north["error"].iloc[0]
    assert f"already spent epsilon={old_epsilon:.3f}" in north["error"].iloc[0]
    assert north[["epsilon", "epsilon-before"]].isna().all().all()  # the refused reply's metrics are not kept
    assert not ((rows["site"] == "north") & (rows["phase"] == "evaluate")).any()  # not asked again this run
    south = rows[(rows["site"] == "south") & (rows["phase"] == "train")]
    assert list(south["status"]) == ["ok"]
    assert south["epsilon-before"].iloc[0] > 0  # south's ledger carried over from the first run
    # ...but the refusal came after the fact: north trained a whole round on a fresh ledger and sent its update
    # (the refused row is the server's answer to that reply). Its new ledger holds only this run's spend: the
    # training-patient count noised afresh and a full round of DP-SGD, close to the second run's target
    ledger = PrivacyLedger.open(north_dir)
    entries = ledger.entries
    assert [(e["kind"], e["label"]) for e in entries] == [("release", "train-patient-count"), ("train", "")]
    assert entries[-1]["round"] == 1 and entries[-1]["run_id"] not in old_runs
    south_ledger = PrivacyLedger.open(data / "south")
    assert entries[-1]["run_id"] == south_ledger.entries[-1]["run_id"]  # the second run's
    assert 0.9 * SECOND_TARGET < ledger.epsilon() <= SECOND_TARGET + 1e-9
    assert ledger.epsilon() == pytest.approx(entries[-1]["epsilon_after"])
    # the site's patients have now spent both histories composed, of which its ledger knows only the second
    both = epsilon_of(old_history + ledger.history, delta)
    assert both > old_epsilon > ledger.epsilon()
    # the server kept what it saw in the first run for north (neither reset nor lowered) and moved south on
    registry = {r["site"]: r["epsilon"] for r in json.loads(registry_path.read_text()).values()}
    assert registry["north"] == pytest.approx(old_epsilon, rel=1e-9)
    assert registry["south"] == pytest.approx(south["epsilon"].iloc[0], rel=1e-9)
    original = {r["site"]: r["epsilon"] for r in json.loads((out / "privacy_registry.json").read_text()).values()}
    assert registry["south"] > original["south"]


def test_the_plan_keeps_training_and_the_one_off_counts_within_the_target():
    releases = [(20.0, 1.0, 1)] * 2  # the training- and test-patient counts, noised once each
    for target in (1.0, 3.0, 8.0):
        plan = plan_dp(300, 16, 2, 5, target, 1e-5, one_off=releases)
        spent = epsilon_of(releases + [(plan.noise_multiplier, plan.sample_rate, 5 * plan.steps_per_round)], 1e-5)
        assert 0.99 * target <= spent <= target  # the whole run's spend, not the training alone
        alone = plan_dp(300, 16, 2, 5, target, 1e-5)
        assert plan.noise_multiplier > alone.noise_multiplier
    with pytest.raises(ValueError, match="used up by the run's one-off releases"):
        plan_dp(300, 16, 2, 5, 1.0, 1e-5, one_off=[(5.0, 1.0, 1)] * 2)  # two counts at sigma 5 cost 1.16
