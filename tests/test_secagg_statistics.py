"""The federated fairness audit's cells through the secure sum (run config secagg-statistics), through the real
handlers: the ClientApp's statistics handler and the four stages of the sum (each site's Context kept between its
messages), the server's StatisticsCollection and strategy driving them over an in-process grid, every message
through its protobuf form. What the server recovers, what it never sees, and what each site's ledger is charged."""

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord

from client import secagg as site_secagg
from client.ledger import PrivacyLedger
from client.statistics import fairness_noise, secure_share
from core_models.config import ConfigError, RunConfig
from core_models.model_factory import ModelSpec
from fairness.federated import SECURE_SUM, SUMMED
from server.hooks import Round, StatisticsCollection
from server.site_statistics import request_config
from server.strategy import build_strategy
from simulations.generator import generate_consortium
from tests.test_secagg_rounds import NODES, LocalGrid, _contexts, _run_config, seeded_rounding  # noqa: F401

SCENARIO = """
name = "secagg-statistics"
seed = 9
image_size = 32
[defaults]
n = 600  # ~90 test patients a site: a group's noised total (std ~16 at NOISE) cannot reach 0
[[sites]]
name = "north"
[[sites]]
name = "south"
[[sites]]
name = "west"
"""
NOISE = 2.0  # within the default budget (max-epsilon 10); with n below, no group of the audit empties (8 sd)

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture()
def sites(tmp_path) -> list:
    (tmp_path / "s.toml").write_text(SCENARIO)
    return generate_consortium(tmp_path / "s.toml", tmp_path / "data")


def _config(**overrides) -> dict:
    return _run_config(**{"statistics": "fairness", "secagg-statistics": True, "release-noise": NOISE,
                          "stats-fairness-boot": 20, **overrides})


class KeepingGrid(LocalGrid):
    """The in-process grid, noting what each site keeps for the sum right after its statistics reply."""

    kept: dict[int, dict[str, np.ndarray]]
    sites: dict[int, int]  # the sum's size each site noised its share for

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for node, ctx in self.contexts.items():
            if site_secagg.UPDATE in ctx.state.array_records and node not in self.kept:
                self.kept[node] = {k: v.numpy().copy() for k, v in ctx.state.array_records[site_secagg.UPDATE].items()}
                self.sites[node] = ctx.state.config_records[site_secagg.INPUT]["sites"]
        return replies


def test_the_server_audits_the_secure_sum_of_the_sites_noised_cells_and_never_one_site(sites, tmp_path):
    run_config = _config()
    grid = KeepingGrid(_contexts(sites, run_config))
    grid.kept, grid.sites = {}, {}
    cfg = RunConfig.from_flower(run_config)
    strategy = build_strategy(cfg.server)
    arrays = ArrayRecord(ModelSpec.of_run(cfg.train).build().state_dict())
    out = tmp_path / "run"
    out.mkdir()
    collect = StatisticsCollection(grid, strategy, cfg, out)
    releases = []
    real = collect.secure_fairness
    collect.secure_fairness = lambda *a: releases.extend(real(*a)) or releases
    collect(Round(flower_round=1, number=1, arrays=arrays, row={}))
    assert collect.failures == []  # the audit of the sum did not fail

    # every site kept its share (the fairness vectors, noised) and forgot it once masked
    assert set(grid.kept) == set(NODES) and all(list(k) == list(SUMMED) for k in grid.kept.values())
    assert grid.sites == {n: 3 for n in NODES}
    assert not any(site_secagg.UPDATE in ctx.state.array_records for ctx in grid.contexts.values())
    (summed,) = releases
    record = summed.records["fairness"]
    assert record[SECURE_SUM] == 3 and sorted(record["secure-sum-sites"]) == ["north", "south", "west"]
    # the server's sum is the sum of the sites' noised shares, to the quantisation (3 sites x 2**-7 at most)
    for name in SUMMED:
        want = sum(k[name] for k in grid.kept.values())
        assert np.max(np.abs(np.asarray(record[name]) - want)) <= 3 * 2.0**-7
    # the sum carries the stated noise: three shares of std 5 / sqrt(3)
    assert record["sigma_cells_n"] == pytest.approx(NOISE)

    # the server never held one site's vector: statistics replies carry noise stds only, the rest is masked
    fairness = []
    for reply in grid.received:
        for rec in reply.content.array_records.values():
            assert all(k == "masked-input" and a.numpy().dtype == np.uint32 for k, a in rec.items())
        fairness += [dict(r) for name, r in reply.content.metric_records.items() if name == "fairness"]
    assert len(fairness) == 3
    assert all(set(r) == {SECURE_SUM} | {f"sigma_{k}" for k in SUMMED} for r in fairness)
    assert all(r["sigma_cells_n"] == pytest.approx(NOISE / math.sqrt(3)) for r in fairness)

    # each ledger is charged for the noise it trusts (the threshold's shares), not for its own share
    share, charged = secure_share(NOISE, 3)
    assert share == pytest.approx(NOISE / math.sqrt(3)) and charged == pytest.approx(NOISE * math.sqrt(2 / 3))
    for path in sites:
        entries = [e for e in PrivacyLedger.open(path).entries if e["kind"] == "release"]
        assert sorted(e["label"] for e in entries) == sorted(f"fairness/{k}" for k in SUMMED)
        assert all(e["sigma"] == pytest.approx(charged) for e in entries)

    # the audit ran on the sum: no per-site effects, the sites in the sum named
    audit = json.loads((out / "fairness_audit.json").read_text())
    assert audit["per_site"] is None and audit["federated"]["secure_sum"] == ["north", "south", "west"]
    assert audit["federated"]["noise_sigma"]["cells_n"] == pytest.approx(NOISE)


def test_secure_statistics_need_secure_rounds_and_the_fairness_audit():
    with pytest.raises(ConfigError, match="'secagg-statistics' = true needs 'secagg' = true"):
        RunConfig.from_flower(_config(secagg=False))
    with pytest.raises(ConfigError, match="'secagg-statistics' = true needs"):
        RunConfig.from_flower(_config(statistics="shift"))
    assert not RunConfig.from_flower(_run_config()).server.secagg_statistics  # off by default


def test_fairness_once_asks_for_the_cells_after_the_planned_last_round_only(sites, tmp_path):
    run_config = _config(**{"statistics": "shift,fairness", "stats-fairness-once": True, "num-server-rounds": 3,
                            "stats-fairness-noise": 1.5})
    cfg = RunConfig.from_flower(run_config)
    collect = StatisticsCollection(LocalGrid(_contexts(sites, run_config)), build_strategy(cfg.server), cfg, tmp_path)
    assert [collect.kinds(r) for r in (1, 2, 3)] == [["shift"], ["shift"], ["shift", "fairness"]]
    assert fairness_noise(cfg) == 1.5 and request_config(cfg, 3).settings["stats-fairness-noise"] == 1.5
    every = RunConfig.from_flower(_config(**{"statistics": "shift,fairness", "num-server-rounds": 3}))
    assert StatisticsCollection(None, None, every, tmp_path).kinds(1) == ["shift", "fairness"]
    assert fairness_noise(every) == NOISE  # 0: the release noise


def test_fairness_once_with_fairness_alone_sends_nothing_before_the_last_round(sites, tmp_path):
    run_config = _config(**{"stats-fairness-once": True, "num-server-rounds": 2})
    grid = LocalGrid(_contexts(sites, run_config))
    cfg = RunConfig.from_flower(run_config)
    arrays = ArrayRecord(ModelSpec.of_run(cfg.train).build().state_dict())
    StatisticsCollection(grid, build_strategy(cfg.server), cfg, tmp_path)(Round(flower_round=1, number=1,
                                                                                 arrays=arrays, row={}))
    assert grid.received == [] and not any(PrivacyLedger.open(p).entries for p in sites)


def test_the_fairness_cells_carry_stats_fairness_noise_and_are_charged_for_it(sites, tmp_path):
    run_config = _config(**{"stats-fairness-noise": 3.0})  # release-noise stays NOISE (2)
    cfg = RunConfig.from_flower(run_config)
    arrays = ArrayRecord(ModelSpec.of_run(cfg.train).build().state_dict())
    collect = StatisticsCollection(LocalGrid(_contexts(sites, run_config)), build_strategy(cfg.server), cfg, tmp_path)
    collect(Round(flower_round=1, number=1, arrays=arrays, row={}))
    audit = json.loads((tmp_path / "fairness_audit.json").read_text())
    assert audit["federated"]["noise_sigma"]["cells_n"] == pytest.approx(3.0)
    _, charged = secure_share(3.0, 3)
    for path in sites:
        entries = [e for e in PrivacyLedger.open(path).entries if e["kind"] == "release"]
        assert entries and all(e["sigma"] == pytest.approx(charged) for e in entries)
