"""The server-side analysis of each released statistic, by the name the sites release it under, and the
isolated run of those a round asked for: one explicit table, so what runs is read here, not assembled by
imports elsewhere."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

from core_models.config import RunConfig
from core_models.protocol import STAT_CALIBRATION, STAT_FAIRNESS, STAT_SHIFT
from core_models.run_files import ANALYSIS_ERRORS_LOG
from server import calibration, fairness_audit, shift
from server.site_statistics import SiteRelease

# fn(out_dir, server_round, releases, run config): writes its report into the run folder
Analyser = Callable[[Path, int, list[SiteRelease], "RunConfig | Mapping[str, Any]"], None]

ANALYSERS: dict[str, Analyser] = {
    STAT_SHIFT: shift.analyse_shift,
    STAT_FAIRNESS: fairness_audit.analyse_fairness,
    STAT_CALIBRATION: calibration.analyse_calibration,
}


def analyse(out_dir: Path, server_round: int, releases: list[SiteRelease], cfg: RunConfig | Mapping[str, Any],
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
                            cfg)
        except Exception as err:  # a report or a figure never ends a training run
            failures[kind] = f"{type(err).__name__}: {err}"
            log(WARNING, "equifed round %d: %s analysis failed (%s); training goes on; traceback in %s",
                server_round, kind, failures[kind], out_dir / ANALYSIS_ERRORS_LOG)
            with open(out_dir / ANALYSIS_ERRORS_LOG, "a", encoding="utf-8") as fh:
                fh.write(f"--- round {server_round}: {kind}\n{traceback.format_exc()}\n")
    return failures
