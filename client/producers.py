"""The statistics this site can release, by the name the server asks for (run config `statistics`).

One explicit table: what a site may release is read here, not assembled by import side effects.
"""

from __future__ import annotations

from client.calibration_stats import produce_calibration
from client.fairness_stats import produce_fair_pse, produce_fairness
from client.shift_stats import produce_shift
from client.site import LocalSite
from client.statistics import Producer, Releaser
from core_models.config import FairAuditConfig, FairPenaltyConfig, ShiftConfig, read_section
from core_models.protocol import STAT_CALIBRATION, STAT_FAIR_PSE, STAT_FAIRNESS, STAT_SHIFT

PRODUCERS: dict[str, Producer] = {
    STAT_SHIFT: produce_shift,
    STAT_FAIRNESS: produce_fairness,
    STAT_FAIR_PSE: produce_fair_pse,
    STAT_CALIBRATION: produce_calibration,
}


# the settings each statistic's request carries (its producer reads them again from the request); "calibration"
# has none (its bins are fixed in core_models/calibration.py, its split is the site's val split)
SETTINGS = {STAT_SHIFT: ShiftConfig, STAT_FAIRNESS: FairAuditConfig, STAT_FAIR_PSE: FairPenaltyConfig}


def request_sections(kinds: list[str], request: dict) -> dict:
    """The settings of every statistic asked for, read from the request and range-checked (ConfigError), before
    any data are read."""
    unknown = [k for k in kinds if k not in PRODUCERS]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; this site provides {sorted(PRODUCERS)}")
    return {kind: read_section(SETTINGS[kind], request) for kind in kinds if kind in SETTINGS}


def produce(kinds: list[str], site: LocalSite, model, request: dict, releaser: Releaser) -> dict[str, dict]:
    unknown = [k for k in kinds if k not in PRODUCERS]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; this site provides {sorted(PRODUCERS)}")
    return {kind: PRODUCERS[kind](site, model, request, releaser) for kind in kinds}
