"""Secure train rounds through the real handlers: the ClientApp (a train request, then the four stages of the secure
sum, each site's Context kept between its messages as a SuperNode keeps it) and the server's strategy (whose
aggregate_train drives the sum over the grid), every message through its protobuf form. What the server gets and
recovers, who is left out, what a site refuses, and what its ledger says."""

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from client import secagg as site_secagg
from client.app import app, train
from client.ledger import PrivacyLedger
from client.policy import SitePolicy
from core_models.config import ConfigError, RunConfig
from core_models.model_factory import ModelSpec
from core_models.protocol import POLICY_REFUSED, SECURE_SITES
from core_models.secagg import SECAGG, STAGE, STAGE_COLLECT_MASKED_INPUT
from server.site_rows import NOT_SUMMED, OK, SECURE, TRAIN, SiteRow
from server.strategy import build_strategy
from simulations.generator import generate_consortium
from tests.test_secagg import seeded_rounding  # noqa: F401 (autouse: Flower's quantize rounds with numpy's global generator)

RUN_CONFIG = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
NODES = [11, 2**63 + 5, 40]  # Flower node ids are uint64
SCENARIO = """
name = "secagg-rounds"
seed = 8
image_size = 32
[defaults]
n = 60
[[sites]]
name = "north"
[[sites]]
name = "south"
[[sites]]
name = "west"
"""

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("secagg")
    (out / "s.toml").write_text(SCENARIO)
    return generate_consortium(out / "s.toml", out / "data")


def _wire(msg: Message) -> Message:
    """A message as the other side reads it (protobuf and back)."""
    return message_from_proto(message_to_proto(msg))


class LocalGrid:
    """The ServerApp's grid in-process: each message goes, through its protobuf form, to the real ClientApp (its mods
    and router) with its node's own Context. A node in `gone` stops answering from the stage named."""

    def __init__(self, contexts: dict[int, Context], gone: dict[int, str] | None = None):
        self.contexts, self.gone, self.dead = contexts, dict(gone or {}), set()
        self.received: list[Message] = []  # every reply the server got

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node, content = msg.metadata.dst_node_id, msg.content
            stage = content.config_records[SECAGG][STAGE] if SECAGG in content.config_records else None
            if node in self.gone and self.gone[node] == stage:
                self.dead.add(node)
            if node not in self.dead:
                replies.append(_wire(app(_wire(msg), self.contexts[node])))
                self.received.append(_wire(replies[-1]))  # as it came (the strategy may add to a reply)
        return replies


def _contexts(paths, run_config, **node_config) -> dict[int, Context]:
    return {nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=run_config,
                         node_config={"data-path": str(p), "site": p.name, "require-dp": False, **node_config})
            for nid, p in zip(NODES, paths)}


def _run_config(**overrides) -> dict:
    return {**RUN_CONFIG, "image-size": 32, "local-epochs": 1, "secagg": True, **overrides}


def _train(grid: LocalGrid, run_config: dict, server_round: int = 1, strategy=None):
    """A secure train round up to the replies: the strategy, the model sent, the replies, what each site kept."""
    cfg = RunConfig.from_flower(run_config)
    strategy = strategy or build_strategy(cfg.server)
    sent = ArrayRecord(ModelSpec.of_run(cfg.train).build().state_dict())
    replies = grid.send_and_receive(strategy.configure_train(server_round, sent, ConfigRecord(), grid))
    kept = {n: ({k: v.numpy().copy() for k, v in ctx.state.array_records[site_secagg.UPDATE].items()},
                ctx.state.config_records[site_secagg.INPUT]["weight"])
            for n, ctx in grid.contexts.items() if site_secagg.UPDATE in ctx.state.array_records}
    return strategy, sent, replies, kept


def _fedavg(models: list[tuple[dict, float]]) -> dict[str, np.ndarray]:
    """Flower's own FedAvg of the sites' models, as a plain round would aggregate them."""
    records = [RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in a.items()}),
                           "metrics": MetricRecord({"num-examples": w})}) for a, w in models]
    return {k: v.numpy() for k, v in aggregate_arrayrecords(records, "num-examples").items()}


def _relative(got: dict, want: dict) -> float:
    diff = np.concatenate([(np.asarray(got[k], np.float64) - want[k]).ravel() for k in want])
    return float(np.linalg.norm(diff) / np.linalg.norm(np.concatenate([v.ravel() for v in want.values()])))


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in arrays.items()}


def test_a_secure_round_gives_fedavg_of_the_models_the_server_never_saw(sites):
    grid = LocalGrid(_contexts(sites, _run_config()))
    strategy, sent, replies, kept = _train(grid, _run_config())
    assert [r.has_error() for r in replies] == [False] * 3
    assert all(not r.content.array_records and "num-examples" in r.content["metrics"] for r in replies)
    assert set(kept) == set(NODES)
    arrays, _ = strategy.aggregate_train(1, replies)

    want = _fedavg(list(kept.values()))
    assert _relative(_numpy(arrays), want) <= 1e-4  # (measured: 6e-6)
    assert _relative(_numpy(sent), want) > 1e-3  # the sites' training moved the model: the comparison has teeth
    # every array the server received is a masked vector (uint32, one entry per weight and the weight itself)
    size = sum(v.size for v in want.values()) + 1
    received = [(k, a.numpy()) for r in grid.received for rec in r.content.array_records.values()
                for k, a in rec.items()]
    assert len(received) == 3 and all(k == "masked-input" and a.dtype == np.uint32 and a.shape == (size,)
                                      for k, a in received)
    # the sites forgot their models once masked; their rows say the models were securely aggregated
    assert not any(site_secagg.UPDATE in ctx.state.array_records for ctx in grid.contexts.values())
    rows = strategy.sites.of(1, TRAIN)
    assert [(r.status, r.aggregation) for r in rows] == [(OK, SECURE)] * 3
    assert rows[0].to_row()["aggregation"] == SECURE and SiteRow.from_row(rows[0].to_row()) == rows[0]  # a resume


def test_a_site_gone_after_sharing_keys_leaves_fedadam_acting_on_the_others_mean(sites):
    gone = NODES[1]
    run_config = _run_config(strategy="fedadam")
    grid = LocalGrid(_contexts(sites, run_config), gone={gone: STAGE_COLLECT_MASKED_INPUT})
    strategy, sent, replies, kept = _train(grid, run_config)
    arrays, _ = strategy.aggregate_train(1, replies)

    # the same models sent in the clear to Flower's FedAdam: the same step, to the sum's quantisation
    plain = build_strategy(RunConfig.from_flower({**run_config, "secagg": False}).server)
    plain.configure_train(1, sent, ConfigRecord(), grid)
    survivors = [r for r in replies if r.metadata.src_node_id != gone]
    for r in survivors:
        r.content["arrays"] = ArrayRecord({k: Array(v) for k, v in kept[r.metadata.src_node_id][0].items()})
    want, _ = plain.aggregate_train(1, survivors)
    assert _relative(_numpy(arrays), _numpy(want)) <= 1e-4  # (measured: 4e-6)
    # ... and that step is FedAdam's: ~3% away from both the model sent and the survivors' plain mean
    assert _relative(_numpy(sent), _numpy(want)) > 1e-2
    assert _relative(_numpy(arrays), _fedavg([kept[n] for n in NODES if n != gone])) > 1e-2

    rows = {int(r.node): r for r in strategy.sites.of(1, TRAIN)}
    assert rows[gone].status == NOT_SUMMED and rows[gone].error == f"{STAGE_COLLECT_MASKED_INPUT}: no reply"
    assert [rows[n].status for n in NODES if n != gone] == [OK, OK]


def test_fewer_than_the_threshold_left_fails_the_round_and_keeps_the_model(sites):
    grid = LocalGrid(_contexts(sites, _run_config()), gone={n: STAGE_COLLECT_MASKED_INPUT for n in NODES[1:]})
    strategy, _, replies, _ = _train(grid, _run_config())
    assert strategy.aggregate_train(1, replies) == (None, None)  # Flower keeps the global model as it was
    rows = strategy.sites.of(1, TRAIN)
    assert [r.status for r in rows] == [NOT_SUMMED] * 3
    assert all("the sum failed: secagg refused: only 1 site(s) sent a masked input, fewer than the threshold 2"
               in r.error for r in rows)


def test_a_site_requiring_secure_aggregation_refuses_a_plain_round_and_a_small_sum(sites, tmp_path):
    cfg = RunConfig.from_flower(_run_config())
    sent = ArrayRecord(ModelSpec.of_run(cfg.train).build().state_dict())

    def request(**config) -> Message:
        return Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1, **config})}),
                       dst_node_id=NODES[0], message_type="train")

    (context,) = list(_contexts(sites[:1], _run_config(secagg=False), **{"require-secagg": True}).values())
    reply = train(request(), context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED
    assert "require-secagg = true" in reply.error.reason and "plain train round" in reply.error.reason
    (context,) = list(_contexts(sites[:1], _run_config(), **{"secagg-min-sites": 3}).values())
    reply = train(request(**{SECURE_SITES: 2}), context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED
    assert "secagg-min-sites = 3" in reply.error.reason and "over 2 site(s)" in reply.error.reason
    assert not context.state.array_records  # refused before training: nothing kept
    assert not train(request(**{SECURE_SITES: 3}), context).has_error()
    # a secagg run whose train request leaves the sum out is the server asking for the plain model: refused
    (context,) = list(_contexts(sites[:1], _run_config()).values())
    reply = train(request(), context)
    assert reply.has_error() and reply.error.code == POLICY_REFUSED
    assert "secagg = true" in reply.error.reason and "asks for the plain model" in reply.error.reason
    assert not context.state.array_records
    # site.toml and node config: the stricter of each wins
    (tmp_path / "site.toml").write_text("require-secagg = false\nsecagg-min-sites = 4\n")
    policy = SitePolicy.load(tmp_path, {"require-secagg": "true", "secagg-min-sites": 3})
    assert policy.require_secagg is True and policy.secagg_min_sites == 4


def test_a_secure_dp_round_charges_the_ledger_as_a_plain_one(sites, tmp_path):
    run_config = _run_config(dp=True)
    first, second = (shutil.copytree(p, tmp_path / p.name) for p in sites[:2])
    (plain_ctx,) = _contexts([first], {**run_config, "secagg": False}).values()
    cfg = RunConfig.from_flower(run_config)
    sent = ArrayRecord(ModelSpec.of_run(cfg.train).build().state_dict())

    def plain_round(server_round: int, context: Context) -> None:
        msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": server_round})}),
                      dst_node_id=NODES[0], message_type="train")
        assert not train(msg, context).has_error()

    plain_round(1, plain_ctx)  # the site's count noised (once, then reused) and its first round charged
    twin = shutil.copytree(first, tmp_path / "twin")  # the same site and ledger from here on
    plain_round(2, _contexts([twin], {**run_config, "secagg": False})[NODES[0]])
    grid = LocalGrid(_contexts([first, second], run_config))
    strategy, _, replies, _ = _train(grid, run_config, server_round=2)
    assert strategy.aggregate_train(2, replies)[0] is not None
    assert [r.status for r in strategy.sites.of(2, TRAIN)] == [OK, OK]

    secure, plain = (PrivacyLedger.open(p) for p in (first, twin))
    assert len(secure.history) >= 2 and secure.history == plain.history
    assert secure.epsilon() == pytest.approx(plain.epsilon(), rel=1e-12)
    assert [e["label"] for e in secure.entries] == [e["label"] for e in plain.entries]


@pytest.mark.parametrize("clash", [{"central-dp": True}, {"detection": True}])
def test_secure_aggregation_is_refused_with_settings_that_need_each_sites_model(clash):
    with pytest.raises(ConfigError, match=f"'secagg' = true is not available with {next(iter(clash))}"):
        RunConfig.from_flower(_run_config(**clash))
