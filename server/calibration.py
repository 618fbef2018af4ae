"""Server-side calibration (analyser "calibration"): the temperature, or the binary model's Platt scale and bias,
fitted from the sites' released histograms (client/calibration_stats.py), and the calibrated model.

The sites' (2, B) tables are summed; their noise adds up to std sqrt(sum of the sites' variances) per cell. The fit
(core_models.calibration.fit_from_histograms) keeps the bins whose pooled count stands 3 noise stds out of that
noise, clips them at 0, shrinks each one's share of target-1 records toward the uncalibrated model's own probability
and maximises the binomial likelihood of the targets on the bin centres under a prior centred on the model as it is,
weighted by the noise (so that noise alone cannot make a calibrated model look miscalibrated). Where the sites
score their validation splits only (no DP: 78 BreastMNIST, 120 RetinaMNIST patients in all) the fit stays near the
model as it is; where they trained the model with DP-SGD they score their training patients too
(client/calibration_stats.py) and the fit carries the DP model's over-confidence away (benchmarks/RESULTS.md).
`records` in calibration.json is the pooled count the fit used.
`calibration.json` records the fit, the sites it came from and the noise; the run's last round folds it into the
global model's head (`calibrated_model.pt`, server/hooks.py `Calibration`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from core_models.calibration import N_BINS, Calibration, fit_from_histograms
from core_models.config import RunConfig, run_config_of
from core_models.jsonable import jsonable
from core_models.protocol import BINS, HIST, NUM_CLASSES, SIGMA, STAT_CALIBRATION
from core_models.run_files import CALIBRATION_DIR, CALIBRATION_JSON, round_file
from server.site_statistics import SiteRelease

KIND = STAT_CALIBRATION
SPLITS = "val (and train at a site that trained the model with DP-SGD in this run)"


def pooled(releases: list[SiteRelease], num_classes: int) -> tuple[np.ndarray, float, list[str]]:
    """The sites' tables summed, the pooled noise std per cell, the sites that contributed. A table of another
    shape (another number of classes, another bin layout) is left out."""
    total, variance, sites = np.zeros((2, N_BINS)), 0.0, []
    for rel in releases:
        rec = rel.records.get(KIND) if rel.status == "ok" else None
        if rec is None:
            continue
        hist = np.asarray(rec[HIST], dtype=np.float64)
        if int(rec[NUM_CLASSES]) != num_classes or int(rec[BINS]) != N_BINS or hist.size != 2 * N_BINS:
            continue
        total += hist.reshape(2, N_BINS)
        variance += float(rec[SIGMA + HIST]) ** 2
        sites.append(rel.site)
    return total, math.sqrt(variance), sites


def fit_releases(releases: list[SiteRelease], num_classes: int) -> dict:
    """calibration.json's content (without the round): the fit, or why there is none."""
    hist, noise, sites = pooled(releases, num_classes)
    out = {"sites": sites, "missing": [f"{r.site} ({r.status})" for r in releases if r.site not in sites],
           "noise_std_per_cell": noise, "num_classes": num_classes, "split": SPLITS}
    if not sites:
        return {**out, "fitted": False, "reason": "no site released the calibration histograms"}
    try:
        fit = fit_from_histograms(hist, num_classes, noise_std=noise)
    except ValueError as err:
        return {**out, "fitted": False, "reason": str(err)}
    return {**out, "fitted": True, **fit.to_json()}


def analyse_calibration(out_dir: Path, server_round: int, releases: list[SiteRelease],
                        run_config: RunConfig | Mapping[str, Any]) -> None:
    """Write calibration.json for this round (and calibration/round_NNN.json)."""
    cfg = run_config_of(run_config)
    result = {"round": server_round, **fit_releases(releases, cfg.train.num_classes)}
    text = json.dumps(jsonable(result), indent=1) + "\n"
    (Path(out_dir) / CALIBRATION_JSON).write_text(text)
    (Path(out_dir) / CALIBRATION_DIR).mkdir(exist_ok=True)
    round_file(Path(out_dir) / CALIBRATION_DIR, server_round, ".json").write_text(text)


def read_fit(out_dir: Path, server_round: int) -> Calibration | None:
    """This round's fit from calibration.json; None when the round has none (not asked, or nothing to fit)."""
    path = Path(out_dir) / CALIBRATION_JSON
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("round") != server_round or not data.get("fitted"):
        return None
    return Calibration.from_json(data)
