"""Ask the sites for their released statistics after a round, and hand them to analysers.

The request carries the global model, the round, the run seed (shared randomness, e.g. a
random-feature map all sites must use) and every run-config key starting with `stats-`.
Each site answers with one MetricRecord per statistic, already noised and charged to its
ledger (client/statistics.py). Analysers register by statistic name in `ANALYSERS`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from logging import WARNING
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid


@dataclass
class SiteRelease:
    """One site's answer: its statistics by name, or why there are none."""

    site: str
    status: str  # "ok" | "budget exhausted" | "error" | "no reply"
    records: dict[str, dict]
    epsilon: float | None = None
    error: str = ""


Analyser = Callable[[Path, int, list[SiteRelease], dict], None]
ANALYSERS: dict[str, Analyser] = {}


def analyser(name: str):
    """Register `fn(out_dir, server_round, releases, run_config)` for statistic `name`."""

    def register(fn: Analyser) -> Analyser:
        ANALYSERS[name] = fn
        return fn

    return register


def requested_kinds(run_config: dict) -> list[str]:
    return [k.strip() for k in str(run_config.get("statistics", "")).split(",") if k.strip()]


def request_config(run_config: dict, server_round: int, kinds: list[str]) -> ConfigRecord:
    extra = {k: v for k, v in run_config.items() if k.startswith("stats-")}
    return ConfigRecord({"statistics": ",".join(kinds), "server-round": server_round,
                         "seed": int(run_config["seed"]), **extra})


def request_statistics(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int],
                       timeout: float) -> list[Message]:
    """One query message per node; the replies that came back within `timeout`."""
    messages = [
        Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                message_type=MessageType.QUERY)
        for node in node_ids
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


def to_releases(replies: list[Message], kinds: list[str]) -> list[SiteRelease]:
    out = []
    for msg in replies:
        if msg.has_error():
            reason = msg.error.reason
            site = reason.split(":")[0].removeprefix("site ") if reason.startswith("site ") else \
                f"node-{msg.metadata.src_node_id}"
            status = "budget exhausted" if "budget exhausted" in reason else "error"
            out.append(SiteRelease(site=site, status=status, records={}, error=reason))
            continue
        records = {k: dict(msg.content.metric_records[k]) for k in kinds if k in msg.content.metric_records}
        out.append(SiteRelease(site=str(msg.content["site"]["name"]), status="ok", records=records,
                               epsilon=float(msg.content["metrics"]["epsilon"])))
    return out


def analyse(out_dir: Path, server_round: int, releases: list[SiteRelease], run_config: dict,
            kinds: list[str]) -> dict[str, str]:
    """Run each requested analyser, isolated: returns {statistic: "ExceptionType: message"} for those that failed
    (their tracebacks appended to `<out_dir>/analysis_errors.log`)."""
    unknown = [k for k in kinds if k not in ANALYSERS]
    if unknown:
        raise ValueError(f"no server-side analysis for statistics {unknown}; known: {sorted(ANALYSERS)}")
    failures = {}
    for kind in kinds:
        try:
            ANALYSERS[kind](out_dir, server_round, [r for r in releases if kind in r.records or r.status != "ok"],
                            run_config)
        except Exception as err:  # a report or a figure never ends a training run
            failures[kind] = f"{type(err).__name__}: {err}"
            log(WARNING, "equifed round %d: %s analysis failed (%s); training goes on; traceback in %s",
                server_round, kind, failures[kind], out_dir / "analysis_errors.log")
            with open(out_dir / "analysis_errors.log", "a", encoding="utf-8") as fh:
                fh.write(f"--- round {server_round}: {kind}\n{traceback.format_exc()}\n")
    return failures
