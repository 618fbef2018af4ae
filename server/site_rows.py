"""The server's memory of each site's answers: one typed row per (round, phase, site), per_site.csv's rows.

A row is a site's reply (its metrics, what it noised or withheld), an error reply's status and reason, a refusal
by the privacy screen, or a site that was asked and did not answer. A train reply's row also says how its model
reached the global one: `aggregation` "plain" (the model itself was sent) or "secure" (only inside the secure
sum); a site that trained but is not in the round's secure sum is "not in secure sum", with the reason.
`SiteTable` builds them from Flower's replies and survives a resume (its rows travel in the round checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import WARNING

from flwr.app import Message
from flwr.common import log
from flwr.common.constant import ErrorCode

from core_models import wire
from core_models.protocol import NOISED, WITHHELD, Disclosure, error_site, error_status

# the phases of a round: a train or evaluate request, or a query (its phase names what it asked for)
TRAIN, EVALUATE, STATISTICS = "train", "evaluate", "statistics"
OK, REFUSED, NO_REPLY, BUDGET_EXHAUSTED = "ok", "refused", "no reply", "budget exhausted"
NOT_SUMMED = "not in secure sum"  # trained, but its model is not in the round's secure sum (or the sum failed)
PLAIN, SECURE = "plain", "secure"  # a train row's `aggregation`

# Error replies the SuperLink makes up for a site that stopped heartbeating (or a reply lost
# with it); they come from the SuperLink's node id, not the site's.
UNREACHABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)

_COLUMNS = ("round", "phase", "site", "status", "node", "error", "aggregation", NOISED, WITHHELD)  # per_site.csv's own


@dataclass(frozen=True)
class SiteRow:
    """One site's answer to one request of a round: `status` "ok" with its metrics, or why there are none ("refused",
    "budget exhausted", "refused by policy", "error" with the reason, "no reply")."""

    round: int
    phase: str
    site: str
    status: str
    node: str | None = None
    error: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    disclosure: Disclosure | None = None  # which of its metrics the site noised, which it withheld (NaN)
    aggregation: str | None = None  # a train reply: PLAIN or SECURE

    @property
    def ok(self) -> bool:
        return self.status == OK

    def metric(self, key: str) -> float:
        """A metric of the reply; NaN when it has none (or the row is not a reply)."""
        return float(self.metrics.get(key, math.nan))

    def to_row(self) -> dict:
        """per_site.csv's row: round, phase, site, status, the error or the node, the metrics, the disclosure."""
        row = {"round": self.round, "phase": self.phase, "site": self.site, "status": self.status}
        row.update({k: v for k, v in (("error", self.error), ("node", self.node), ("aggregation", self.aggregation))
                    if v is not None})
        return {**row, **self.metrics, **({} if self.disclosure is None else self.disclosure.to_config())}

    @classmethod
    def from_row(cls, row: Mapping) -> SiteRow:
        """A row written by `to_row`: a resumed run's checkpoint, or per_site.csv read back (a cell a row has no value
        for is empty there: NaN)."""
        row = {k: v for k, v in row.items() if not (k in _COLUMNS and isinstance(v, float) and math.isnan(v))}
        return cls(round=row["round"], phase=row["phase"], site=row["site"], status=row["status"],
                   node=row.get("node"), error=row.get("error"), aggregation=row.get("aggregation"),
                   metrics={k: v for k, v in row.items() if k not in _COLUMNS},
                   disclosure=Disclosure.from_config(row) if NOISED in row else None)


class SiteTable:
    """The rows so far, and which nodes each (round, phase) asked, to name those that did not answer."""

    def __init__(self, rows: Iterable[SiteRow | Mapping] = ()):
        self.rows: list[SiteRow] = [r if isinstance(r, SiteRow) else SiteRow.from_row(r) for r in rows]
        self.asked: dict[tuple[int, str], list[int]] = {}

    def of(self, server_round: int, phase: str | None = None, status: str | None = None) -> list[SiteRow]:
        """The round's rows, of one phase and one status where given."""
        return [r for r in self.rows if r.round == server_round and phase in (None, r.phase)
                and status in (None, r.status)]

    def refused(self, server_round: int, phase: str, site: str, reason: str) -> None:
        self.rows.append(SiteRow(server_round, phase, site, REFUSED, error=reason))

    def site_of(self, node: int) -> str:
        """The site name a node last answered with (kept in the rows, so it survives a resume)."""
        for row in reversed(self.rows):
            if row.node == str(node) and row.ok:
                return row.site
        return f"node-{node}"

    def record(self, server_round: int, phase: str, replies: list[Message], skip: Iterable[int] = (),
               aggregation: str | None = None) -> None:
        """One row per reply (its metrics, or why there are none; a reply's row its `aggregation`), and a
        "no reply" row per node asked that did not answer (`skip`: nodes refused for the rest of the run)."""
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and msg.error.code in UNREACHABLE:
                continue  # the SuperLink's stand-in for a site that went away: a "no reply" row below
            answered.add(node)
            if msg.has_error():
                reason = msg.error.reason
                self.rows.append(SiteRow(server_round, phase, error_site(reason) or f"node-{node}",
                                         error_status(msg.error.code), error=reason))
                continue
            reply = wire.reply_of(msg)
            self.rows.append(SiteRow(server_round, phase, reply.site or f"node-{node}", OK, node=str(node),
                                     metrics={k: float(v) for k, v in reply.metrics.items()},
                                     disclosure=reply.disclosure, aggregation=aggregation))
        skip = set(skip)
        for node in self.asked.get((server_round, phase), []):
            if node not in answered and node not in skip:
                site = self.site_of(node)
                log(WARNING, "equifed round %d (%s): site %s did not reply; the round goes on without it",
                    server_round, phase, site)
                self.rows.append(SiteRow(server_round, phase, site, NO_REPLY, node=str(node)))

    def not_summed(self, server_round: int, reasons: Mapping[int, str]) -> None:
        """The round's train replies from these nodes are not in its secure sum: their rows say why (the figures
        the site released stay)."""
        self.rows = [replace(r, status=NOT_SUMMED, error=reasons[int(r.node)])
                     if r.round == server_round and r.phase == TRAIN and r.ok and r.node is not None
                     and int(r.node) in reasons else r for r in self.rows]

    def to_rows(self) -> list[dict]:
        """per_site.csv's rows (and the checkpoint's)."""
        return [r.to_row() for r in self.rows]
