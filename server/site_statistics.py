"""The sites' released statistics after a round: the request, and the replies as releases for the analysers.

The request (sent with the global model by the strategy's `query`) carries the round, the run seed (shared
randomness, e.g. a random-feature map all sites must use) and every run-config key starting with `stats-`.
Each site answers with one MetricRecord per statistic, already noised and charged to its
ledger (client/statistics.py). The analyser of each statistic is named in server/analysers.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Message

from core_models import wire
from core_models.config import RunConfig, keys_of
from core_models.protocol import StatisticsRequest, error_site, error_status
from server.site_rows import OK


@dataclass
class SiteRelease:
    """One site's answer: its statistics by name, or why there are none."""

    site: str
    status: str  # "ok" | "budget exhausted" | "refused by policy" | "error" | "no reply"
    records: dict[str, dict]
    epsilon: float | None = None
    error: str = ""


def request_config(cfg: RunConfig, server_round: int) -> StatisticsRequest:
    """The statistics request: the kinds asked for, the round, the seed and every stats-* key."""
    return StatisticsRequest(tuple(cfg.release.kinds), server_round, cfg.train.seed,
                             settings={**keys_of(cfg.shift), **keys_of(cfg.audit)})


def to_releases(replies: list[Message], kinds: list[str]) -> list[SiteRelease]:
    """Each reply as the analysers read it: its records of `kinds`, or why there are none."""
    out = []
    for msg in replies:
        if msg.has_error():
            reason = msg.error.reason
            site = error_site(reason) or f"node-{msg.metadata.src_node_id}"
            out.append(SiteRelease(site=site, status=error_status(msg.error.code), records={}, error=reason))
            continue
        reply = wire.reply_of(msg)
        records = {k: dict(reply.statistics[k]) for k in kinds if k in reply.statistics}
        out.append(SiteRelease(site=str(reply.site), status=OK, records=records, epsilon=reply.epsilon))
    return out
