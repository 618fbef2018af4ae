"""Server-side federated fairness audit (analyser "fairness").

Sums the sites' released cell statistics (client/fairness_stats.py, fairness/federated.py), runs the causal
fairness audit on them (consortium and per site), and writes `fairness_audit.html` + `fairness_audit.json` into
the run folder, with epsilon per site and the shift summary when the run has them. Rewritten every round the
statistics are collected, so the final round's report is what stays (a copy per round goes to
`fairness/round_NNN.json`).

Each axis of the released grid ends in an "other" cell (values outside the declared levels, missing values, a
column a site lacks): the estimates leave those cells out (`fairness.federated.known_cells`), and their noised
total is reported as `federated.rows_in_other_cells` and logged.

With run config secagg-statistics the sites' cells arrive as one secure sum (server/hooks.py): the audit runs
on it, `federated.secure_sum` names the sites in it, and there are no per-site effects (`per_site` is None).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

from core_models.config import RunConfig, run_config_of
from core_models.protocol import STAT_FAIRNESS
from core_models.run_files import FAIRNESS_AUDIT_JSON, FAIRNESS_DIR, round_file
from fairness.federated import (SECURE_SUM, SECURE_SUM_SITE, SECURE_SUM_SITES, audit_from_statistics, layout_for,
                                stats_from_record, sum_statistics)
from fairness.graph import GraphError
from fairness.report import run_context, write_report
from fairness.results import AuditResult
from server.site_statistics import SiteRelease


def analyse_fairness(out_dir: Path, server_round: int, releases: list[SiteRelease],
                     run_config: RunConfig | Mapping[str, Any]) -> None:
    cfg = run_config_of(run_config)
    layout = layout_for(cfg.audit)
    ok = [r for r in releases if r.status == "ok" and STAT_FAIRNESS in r.records]
    missing = [f"{r.site} ({r.status})" for r in releases if r not in ok]
    if not ok:
        log(WARNING, "equifed fairness: round %d: no site released fairness statistics (%s)", server_round,
            ", ".join(missing) or "no replies")
        return
    shares = [r for r in ok if SECURE_SUM in r.records[STAT_FAIRNESS]]  # a share, or the server's sum of them
    sums = [r for r in shares if r.site == SECURE_SUM_SITE and "cells_n" in r.records[STAT_FAIRNESS]]
    in_sum = set(sums[0].records[STAT_FAIRNESS][SECURE_SUM_SITES]) if sums else set()
    missing += [f"{r.site} ({'secure sum failed' if not sums else 'not in the secure sum'})"
                for r in shares if r not in sums and r.site not in in_sum]
    plain = [r for r in ok if r not in shares]
    parts, per_site = [], {}
    if sums:
        summed = stats_from_record(sums[0].records[STAT_FAIRNESS], layout)
        summed.sites = sorted(in_sum)
        parts.append(summed)
    for r in plain:
        try:
            per_site[r.site] = stats_from_record(r.records[STAT_FAIRNESS], layout, r.site)
        except GraphError as err:  # a site on other settings: leave it out, say so
            missing.append(f"{r.site} (unusable release: {err})")
    parts += list(per_site.values())
    if not parts:
        log(WARNING, "equifed fairness: round %d: no fairness statistics to audit (%s)", server_round,
            ", ".join(missing))
        return
    try:  # under the secure sum the server has no one site's cells: no per-site effects
        audit = audit_from_statistics(sum_statistics(parts), per_site or None,
                                      n_boot=cfg.audit.boot, seed=cfg.train.seed)
    except GraphError as err:  # e.g. a group empty after the noise: no audit this round, training goes on
        log(WARNING, "equifed fairness: round %d: no audit: %s", server_round, err)
        return
    audit = audit.replace(round=server_round, federated={**audit.federated, "not_released": missing,
                                                         "secure_sum": sorted(in_sum) or None})
    context = run_context(out_dir, {r.site: r.epsilon for r in ok if r.epsilon is not None
                                    and (r.site in in_sum or r in plain)})
    write_report(audit, out_dir, context=context, title=f"Federated causal fairness audit, round {server_round}")
    audit.write(round_file(Path(out_dir) / FAIRNESS_DIR, server_round, ".json"))
    log(INFO, "equifed fairness: round %d: %s (rows outside the declared levels, noised: %.1f)", server_round,
        audit.verdict["text"], audit.federated["rows_in_other_cells"])


def load_audit(out_dir: Path) -> AuditResult:
    """The latest federated audit of a run folder."""
    return AuditResult.read(Path(out_dir) / FAIRNESS_AUDIT_JSON)
