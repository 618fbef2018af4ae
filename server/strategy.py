"""Strategies that keep what Flower's default aggregation throws away.

Flower's FedAvg keeps only the weighted mean of the sites' metrics. A consortium needs
each site's numbers (which hospital is lagging, which dropped out), and a restart must
continue the round count and the optimiser state. The mixin adds both on top of
Flower's own FedAvg / FedProx / FedAdam; aggregation itself stays Flower's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from core_models.config import ServerConfig
from core_models.protocol import (ARRAYS, BOX_EXAMPLES, CONFIG, DATASET_TAG, DETECTION_HEAD, DISCLOSURE, EPSILON,
                                  EPSILON_BEFORE, METRICS, NOISED, NUM_EXAMPLES, PRIVACY, SITE, SITE_NAME, WITHHELD,
                                  error_site, error_status)
from server.privacy_registry import PrivacyRegistry

# Error replies the SuperLink makes up for a site that stopped heartbeating (or a reply lost
# with it); they come from the SuperLink's node id, not the site's.
UNREACHABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def pool_detection_heads(replies: list[Message]) -> list[Message]:
    """Give every reply's detection head the mean of the heads the sites trained, weighted by the annotated images
    each trained it on (their ``box-examples``), so the strategy averages identical heads.

    A site without boxes trains the classifier only and sends back the head it received; FedAvg would weigh that
    stale copy by the site's num-examples and pull the head's update back toward the old head (by a quarter with
    one of four equal sites unboxed). The classifier's arrays are left to the strategy."""
    with_arrays = [r for r in replies if not r.has_error() and ARRAYS in r.content.array_records]
    trained, weights = [], []
    for r in with_arrays:
        metrics = r.content.metric_records.get(METRICS)
        if metrics is None:
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
    """Records per-site metrics per round, shifts round numbers after a resume, and
    refuses sites whose privacy ledger went backwards."""

    def _init_tracking(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                       site_rows: list[dict] | None = None, state: dict[str, dict[str, np.ndarray]] | None = None,
                       ) -> None:
        """`registry`: each site's spend so far (None: nothing checked); a resumed run's `round_offset` (rounds
        done), `site_rows` (per_site.csv so far) and optimiser `state` (from its checkpoint)."""
        self.registry = registry
        self.round_offset = round_offset
        self.site_rows: list[dict] = list(site_rows or [])  # one row per (round, phase, site)
        self.round_started: dict[int, float] = {}
        self.expected_nodes: dict[tuple[int, str], list[int]] = {}
        self.refused_nodes: dict[int, str] = {}  # node id -> reason, for the rest of this run
        self.train_extras: dict = {}  # extra train-config entries for the next rounds (e.g. the fairness penalty's)
        if state:
            self.load_state(state)

    def broadcast(self, entries: dict) -> None:
        """Send `entries` with every later round's train config (replacing an earlier broadcast)."""
        self.train_extras = dict(entries)

    def query(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, server_round: int, phase: str,
              timeout: float) -> list[Message]:
        """Ask every site still in the run (`phase`, e.g. "statistics"); the replies that pass the privacy
        screen, each reply (and each site that did not reply) recorded in the per-site rows."""
        nodes = [n for n in grid.get_node_ids() if n not in self.refused_nodes]
        messages = [Message(content=RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=node,
                            message_type=MessageType.QUERY) for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        self.expected_nodes[(server_round, phase)] = nodes
        replies = self.screen_privacy(server_round, replies, phase=phase)
        self.record_replies(server_round, phase, replies)
        return replies

    def screen_privacy(self, server_round: int, replies: list[Message], phase: str = "train") -> list[Message]:
        """Drop (and remember) replies from sites whose reported spend is inconsistent."""
        kept = []
        for msg in replies:
            privacy = msg.content.config_records.get(PRIVACY) if not msg.has_error() else None
            if privacy is None or self.registry is None:
                kept.append(msg)
                continue
            site = msg.content[SITE][SITE_NAME]
            reason = self.registry.check(str(privacy[DATASET_TAG]), site,
                                         float(msg.content[METRICS][EPSILON_BEFORE]))
            if reason is None:
                kept.append(msg)
                self.registry.record(str(privacy[DATASET_TAG]), site, float(msg.content[METRICS][EPSILON]))
            else:
                self.refused_nodes[msg.metadata.src_node_id] = reason
                self.site_rows.append({"round": server_round, "phase": phase, "site": site,
                                       "status": "refused", "error": reason})
        return kept

    def _site_of(self, node: int) -> str:
        """The site name a node last answered with (kept in the rows, so it survives a resume)."""
        for row in reversed(self.site_rows):
            if row.get("node") == str(node) and row.get("status") == "ok":
                return row["site"]
        return f"node-{node}"

    def record_replies(self, server_round: int, phase: str, replies: list[Message]) -> None:
        """One per-site row per reply (its metrics, or why there are none), and a "no reply" row per site that
        was asked and did not answer."""
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and msg.error.code in UNREACHABLE:
                continue  # the SuperLink's stand-in for a site that went away: a "no reply" row below
            answered.add(node)
            if msg.has_error():
                reason = msg.error.reason
                site = error_site(reason) or f"node-{node}"
                self.site_rows.append({"round": server_round, "phase": phase, "site": site,
                                       "status": error_status(msg.error.code), "error": reason})
                continue
            site = msg.content[SITE][SITE_NAME] if SITE in msg.content.config_records else f"node-{node}"
            metrics = {k: float(v) for k, v in msg.content[METRICS].items()}
            disclosure = msg.content.config_records.get(DISCLOSURE)
            said = ({NOISED: str(disclosure[NOISED]), WITHHELD: str(disclosure[WITHHELD])}
                    if disclosure is not None else {})  # which values the site noised, which it kept (NaN)
            self.site_rows.append({"round": server_round, "phase": phase, "site": site, "status": "ok",
                                   "node": str(node), **metrics, **said})
        for node in self.expected_nodes.get((server_round, phase), []):
            if node not in answered and node not in self.refused_nodes:
                site = self._site_of(node)
                log(WARNING, "equifed round %d (%s): site %s did not reply; the round goes on without it",
                    server_round, phase, site)
                self.site_rows.append(
                    {"round": server_round, "phase": phase, "site": site, "status": "no reply", "node": str(node)}
                )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.round_offset
        self.round_started[server_round] = time.time()
        if self.train_extras:
            config = ConfigRecord({**dict(config), **self.train_extras})
        messages = [m for m in super().configure_train(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id not in self.refused_nodes]
        self.expected_nodes[(server_round, "train")] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = self.screen_privacy(server_round, list(replies))
        self.record_replies(server_round, "train", replies)
        return super().aggregate_train(server_round, pool_detection_heads(replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.round_offset
        messages = [m for m in super().configure_evaluate(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id not in self.refused_nodes]
        self.expected_nodes[(server_round, "evaluate")] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self.record_replies(server_round, "evaluate", replies)
        # a site with nothing to score (no test split) weighs 0: its NaN would poison the weighted mean
        weighed = [r for r in replies if r.has_error() or float(r.content[METRICS].get(NUM_EXAMPLES, 1)) > 0]
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


class TrackedFedAvg(SiteTrackingMixin, FedAvg):
    def __init__(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                 site_rows: list[dict] | None = None, state: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_tracking(registry, round_offset, site_rows, state)


class TrackedFedProx(SiteTrackingMixin, FedProx):
    def __init__(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                 site_rows: list[dict] | None = None, state: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_tracking(registry, round_offset, site_rows, state)


class TrackedFedAdam(SiteTrackingMixin, FedAdam):
    def __init__(self, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                 site_rows: list[dict] | None = None, state: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_tracking(registry, round_offset, site_rows, state)


def build_strategy(server: ServerConfig, registry: PrivacyRegistry | None = None, round_offset: int = 0,
                   site_rows: list[dict] | None = None, state: dict | None = None) -> SiteTrackingMixin:
    """The strategy run config names, with the consortium's participation settings; a resumed run passes the
    rounds done, the per-site rows so far and the optimiser state from its checkpoint."""
    common = dict(
        fraction_train=server.fraction_train,
        fraction_evaluate=server.fraction_evaluate,
        min_train_nodes=server.min_train_nodes,
        min_evaluate_nodes=server.min_train_nodes,
        min_available_nodes=server.min_train_nodes,
        registry=registry, round_offset=round_offset, site_rows=site_rows, state=state,
    )
    if server.strategy == "fedavg":
        return TrackedFedAvg(**common)
    if server.strategy == "fedprox":
        return TrackedFedProx(proximal_mu=server.proximal_mu, **common)
    if server.strategy == "fedadam":
        return TrackedFedAdam(eta=server.server_lr, **common)
    raise ValueError(f"unknown strategy {server.strategy!r}; choose one of {STRATEGIES}")
