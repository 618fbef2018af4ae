"""Strategies that keep what Flower's default aggregation throws away.

Flower's FedAvg keeps only the weighted mean of the sites' metrics. A consortium needs
each site's numbers (which hospital is lagging, which dropped out), and a restart must
continue the round count and the optimiser state. The mixin adds both on top of
Flower's own FedAvg / FedProx / FedAdam; aggregation itself stays Flower's.

With secure aggregation (run config secagg) the sites keep their trained models and the server learns only
their weighted sum and the sum of weights (server/secagg.py); Flower's aggregation then gets every reply with
the unmasked mean, so FedAvg's mean is that mean and FedProx and FedAdam act on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from core_models import wire
from core_models.config import ServerConfig
from core_models.protocol import ARRAYS, BOX_EXAMPLES, DETECTION_HEAD, NUM_EXAMPLES, SECURE_SITES, StatisticsRequest
from core_models.secagg import SecAggError, SecAggParams, VectorLayout
from server import secagg
from server.privacy_registry import PrivacyRegistry
from server.site_rows import EVALUATE, PLAIN, SECURE, TRAIN, SiteRow, SiteTable


def pool_detection_heads(replies: list[Message]) -> list[Message]:
    """Give every reply's detection head the mean of the heads the sites trained, weighted by the annotated images
    each trained it on (their ``box-examples``), so the strategy averages identical heads.

    A site without boxes trains the classifier only and sends back the head it received; FedAvg would weigh that
    stale copy by the site's num-examples and pull the head's update back toward the old head (by a quarter with
    one of four equal sites unboxed). The classifier's arrays are left to the strategy."""
    with_arrays = [r for r in replies if not r.has_error() and ARRAYS in r.content.array_records]
    trained, weights = [], []
    for r in with_arrays:
        metrics = wire.reply_of(r).metrics
        if not metrics:
            continue
        # a site's weight: its annotated images, never more than the images it says it trained on (both are the
        # site's own word: this catches mistakes, not a site that overstates both)
        try:
            boxed = float(metrics.get(BOX_EXAMPLES, 0.0))
            n = float(metrics.get(NUM_EXAMPLES, 0.0))
        except (TypeError, ValueError):
            continue
        if math.isfinite(boxed) and math.isfinite(n) and min(boxed, n) > 0:
            trained.append(r)
            weights.append(min(boxed, n))
    if not trained:
        return replies
    weights = np.asarray(weights) / sum(weights)
    keys = [k for k in trained[0].content[ARRAYS].keys() if k.startswith(DETECTION_HEAD)]
    pooled = {k: sum(w * r.content[ARRAYS][k].numpy().astype(np.float64) for w, r in zip(weights, trained))
              for k in keys}
    for r in with_arrays:
        arrays = r.content[ARRAYS]
        for k in keys:
            if k in arrays:
                arrays[k] = Array(pooled[k].astype(arrays[k].numpy().dtype))
    return replies


class SiteTrackingMixin:
    """Records each site's answers per round (a SiteTable), shifts round numbers after a resume, and
    refuses sites whose privacy ledger went backwards."""

    def _init_tracking(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                       site_rows: Iterable[SiteRow | dict] | None = None,
                       state: dict[str, dict[str, np.ndarray]] | None = None, secure: bool = False,
                       stage_timeout: float = 600.0) -> None:
        """`registry`: each site's spend so far (None: nothing checked); a resumed run's `round_offset` (rounds
        done), `site_rows` (per_site.csv so far) and optimiser `state` (from its checkpoint); `secure`: train
        rounds securely aggregated, each stage waiting at most `stage_timeout` seconds."""
        self.registry = registry
        self.secure, self.stage_timeout = secure, stage_timeout
        self.sent: tuple[Grid, ArrayRecord] | None = None  # a secure round's grid and model sent
        self.round_offset = round_offset
        self.sites = SiteTable(site_rows or [])  # one row per (round, phase, site)
        self.round_started: dict[int, float] = {}
        self.refused_nodes: dict[int, str] = {}  # node id -> reason, for the rest of this run
        self.train_extras: dict = {}  # extra train-config entries for the next rounds (e.g. the fairness penalty's)
        if state:
            self.load_state(state)

    def broadcast(self, entries: dict) -> None:
        """Send `entries` with every later round's train config (replacing an earlier broadcast)."""
        self.train_extras = dict(entries)

    def query(self, grid: Grid, arrays: ArrayRecord, request: StatisticsRequest, phase: str,
              timeout: float, secure: bool = False) -> list[Message]:
        """Ask every site still in the run (`phase`, e.g. "statistics"); the replies that pass the privacy
        screen, each reply (and each site that did not reply) recorded in the per-site rows. `secure`: the request
        says how many sites are asked (secagg-sites), so that the sites keep what the secure sum adds
        (`sum_statistics`) and noise it with their share."""
        server_round = request.server_round
        nodes = [n for n in grid.get_node_ids() if n not in self.refused_nodes]
        if secure:
            request = replace(request, settings={**request.settings, SECURE_SITES: len(nodes)})
        replies = list(grid.send_and_receive([wire.query(request, arrays, node) for node in nodes], timeout=timeout))
        self.sites.asked[(server_round, phase)] = nodes
        replies = self.screen_privacy(server_round, replies, phase=phase)
        self.sites.record(server_round, phase, replies, skip=self.refused_nodes)
        return replies

    def screen_privacy(self, server_round: int, replies: list[Message], phase: str = TRAIN) -> list[Message]:
        """Drop (and remember) replies from sites whose reported spend is inconsistent."""
        kept = []
        for msg in replies:
            reply = None if msg.has_error() else wire.reply_of(msg)
            if reply is None or reply.dataset_tag is None or self.registry is None:
                kept.append(msg)
                continue
            reason = self.registry.check(reply.dataset_tag, reply.site, reply.epsilon_before)
            if reason is None:
                kept.append(msg)
                self.registry.record(reply.dataset_tag, reply.site, reply.epsilon)
            else:
                self.refused_nodes[msg.metadata.src_node_id] = reason
                self.sites.refused(server_round, phase, reply.site, reason)
        return kept

    def sum_statistics(self, grid: Grid, nodes: list[int], shapes: Mapping[str, tuple[int, ...]],
                       server_round: int, clipping_range: float, left: dict[int, str]) -> secagg.SecureSum:
        """The secure sum of the statistics `nodes` keep for round `server_round` (vectors of `shapes`, each entry
        within +-clipping_range), weight 1 each so the sum is the plain sum; SecAggError when it fails, `left` gets
        why each site left."""
        params = SecAggParams.majority(len(nodes), clipping_range=float(clipping_range), max_weight=1.0)
        layout = VectorLayout(tuple(shapes), tuple(tuple(s) for s in shapes.values()))
        return secagg.sum_over_grid(grid, params, layout, nodes, server_round, self.stage_timeout, left)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.round_offset
        self.round_started[server_round] = time.time()
        if self.train_extras:
            config = ConfigRecord({**dict(config), **self.train_extras})
        messages = [m for m in super().configure_train(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id not in self.refused_nodes]
        self.sites.asked[(server_round, TRAIN)] = [m.metadata.dst_node_id for m in messages]
        if self.secure:
            self.sent = (grid, arrays)
            for m in messages:
                wire.secure_train(m, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = self.screen_privacy(server_round, list(replies))
        self.sites.record(server_round, TRAIN, replies, skip=self.refused_nodes,
                          aggregation=SECURE if self.secure else PLAIN)
        if self.secure:
            replies = self.secure_mean(server_round, replies)
        return super().aggregate_train(server_round, pool_detection_heads(replies))

    def secure_mean(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies Flower aggregates in a secure round: those in the secure sum, each given the mean it
        unmasks (the sum of weight x model over the sum of weights), and the error replies. The sites that trained
        but are not in the sum, or all of them when the sum fails (fewer than the threshold left), are recorded
        "not in secure sum" with the reason: a round in which none is in it is a round without trainers."""
        grid, sent = self.sent
        trained = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        errors = [m for m in replies if m.has_error()]
        weights = {n: _weight(m) for n, m in trained.items()}
        left = {n: f"its {NUM_EXAMPLES} ({w}) is not a positive number" for n, w in weights.items()
                if not (math.isfinite(w) and w > 0)}
        nodes = [n for n in trained if n not in left]
        started = time.time()
        try:
            params = SecAggParams.for_weights([weights[n] for n in nodes])
            total = secagg.sum_over_grid(grid, params, VectorLayout.of(sent), nodes, server_round,
                                         self.stage_timeout, left)
        except SecAggError as err:
            log(WARNING, "equifed round %d: no secure sum (%s); the global model stays as it was", server_round, err)
            self.sites.not_summed(server_round, {n: (f"{left[n]}; " if n in left else "") + f"the sum failed: {err}"
                                                 for n in trained})
            return errors
        self.sites.not_summed(server_round, {n: left.get(n, "not in the sum") for n in trained
                                             if n not in total.sites})
        log(INFO, "equifed round %d: secure sum of %d site(s), %d left, in %.2f s", server_round, len(total.sites),
            len(trained) - len(total.sites), time.time() - started)
        mean = total.result.mean()
        arrays = ArrayRecord({k: Array(mean[k].astype(sent[k].numpy().dtype)) for k in sent.keys()})
        return [wire.with_arrays(trained[n], arrays) for n in total.sites] + errors

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.round_offset
        messages = [m for m in super().configure_evaluate(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id not in self.refused_nodes]
        self.sites.asked[(server_round, EVALUATE)] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self.sites.record(server_round, EVALUATE, replies, skip=self.refused_nodes)
        # a site with nothing to score (no test split) weighs 0: its NaN would poison the weighted mean
        weighed = [r for r in replies if r.has_error() or float(wire.reply_of(r).metrics.get(NUM_EXAMPLES, 1)) > 0]
        return super().aggregate_evaluate(server_round, weighed) if weighed else None

    # --- state for checkpoints -------------------------------------------------------
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """Server-optimiser state that a resume needs (FedAdam's moments); empty for FedAvg."""
        out = {}
        for name in ("m_t", "v_t"):
            value = getattr(self, name, None)
            if value:
                out[name] = {k: np.asarray(v) for k, v in value.items()}
        return out

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        for name, value in state.items():
            setattr(self, name, {k: np.asarray(v) for k, v in value.items()})


def _weight(reply: Message) -> float:
    """A train reply's aggregation weight (NaN when it is not a number)."""
    try:
        return float(wire.reply_of(reply).metrics.get(NUM_EXAMPLES, math.nan))
    except (TypeError, ValueError):
        return math.nan


class TrackedFedAvg(SiteTrackingMixin, FedAvg):
    def __init__(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                 site_rows: Iterable[SiteRow | dict] | None = None, state: dict | None = None, secure: bool = False,
                 stage_timeout: float = 600.0, **kwargs):
        super().__init__(**kwargs)
        self._init_tracking(registry, round_offset, site_rows, state, secure, stage_timeout)


class TrackedFedProx(SiteTrackingMixin, FedProx):
    def __init__(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                 site_rows: Iterable[SiteRow | dict] | None = None, state: dict | None = None, secure: bool = False,
                 stage_timeout: float = 600.0, **kwargs):
        super().__init__(**kwargs)
        self._init_tracking(registry, round_offset, site_rows, state, secure, stage_timeout)


class TrackedFedAdam(SiteTrackingMixin, FedAdam):
    def __init__(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                 site_rows: Iterable[SiteRow | dict] | None = None, state: dict | None = None, secure: bool = False,
                 stage_timeout: float = 600.0, **kwargs):
        super().__init__(**kwargs)
        self._init_tracking(registry, round_offset, site_rows, state, secure, stage_timeout)


def build_strategy(server: ServerConfig, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                   site_rows: Iterable[SiteRow | dict] | None = None, state: dict | None = None) -> SiteTrackingMixin:
    """The strategy run config names, with the consortium's participation settings; a resumed run passes the
    rounds done, the per-site rows so far and the optimiser state from its checkpoint."""
    common = dict(
        fraction_train=server.fraction_train,
        fraction_evaluate=server.fraction_evaluate,
        min_train_nodes=server.min_train_nodes,
        min_evaluate_nodes=server.min_train_nodes,
        min_available_nodes=server.min_train_nodes,
        registry=registry, round_offset=round_offset, site_rows=site_rows, state=state,
        secure=server.secagg, stage_timeout=server.round_timeout,
    )
    if server.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {server.strategy!r}; choose one of {tuple(STRATEGIES)}")
    tracked, own_settings = STRATEGIES[server.strategy]
    return tracked(**own_settings(server), **common)


# run config strategy -> (the tracked Flower strategy, its own settings from the run config): a new strategy is one
# entry here (and its name among core_models.config's choices)
STRATEGIES: dict[str, tuple[type, Callable[[ServerConfig], dict]]] = {
    "fedavg": (TrackedFedAvg, lambda server: {}),
    "fedprox": (TrackedFedProx, lambda server: {"proximal_mu": server.proximal_mu}),
    "fedadam": (TrackedFedAdam, lambda server: {"eta": server.server_lr}),
}
