"""Calibration statistics a site releases (producer "calibration"): what the server fits the global model's
temperature (or, binary, Platt scale and bias) from.

| released (key) | what                                                                        | data | L2 sens. |
|----------------|-----------------------------------------------------------------------------|------|----------|
| `hist`         | 2 x B counts of the global model's score on fixed bins: binary, the log-odds | val  | 1        |
|                | z1 - z0 per true label (row 1: label 1); K > 2, the top class's log-odds,    |      |          |
|                | row 1: the top class is the true label (core_models/calibration.py)         |      |          |

B = 35 bins fixed before any data are seen (core_models.calibration.EDGES: 0.25 wide near 0, widening to 4 out
to +-20, the two end bins catching the rest, one bin for non-finite scores). One record per patient (the patient's
first image in the manifest) of the site's validation split, never trained on; each record is in exactly one cell
of the table, so adding or removing one patient moves it by 1 in one cell (L2 sensitivity 1). The counts are noised
without small-cell suppression (`Releaser.release`): the server sums the sites' tables before it judges which cells
stand out of the noise, and zeroing small noised cells at each site would bias the pooled counts (as for the
fairness audit's cell counts).

Nothing here raises on the data: a label outside 0..K-1 leaves its record out (a warning in the local log), a
non-finite output falls in the non-finite bin; the table's shape depends on the request only.
"""

from __future__ import annotations

import numpy as np

from client.shift_stats import known_labels, model_outputs, one_per_patient
from client.site import LocalSite
from client.statistics import Releaser
from core_models.calibration import N_BINS, calibration_histograms
from core_models.protocol import BINS, HIST, NUM_CLASSES, SIGMA

SPLIT = "val"


def site_histograms(site: LocalSite, model) -> tuple[np.ndarray, int]:
    """The (2, N_BINS) table of the site's validation records (one per patient), and K."""
    keep = one_per_patient(site.data.frame) & (site.split == SPLIT).to_numpy()
    logits, _ = model_outputs(model, site.data.images[keep])
    k = int(logits.shape[1])
    labels, ok = known_labels(site.data.labels[keep], k, "validation records")
    return calibration_histograms(logits[ok], labels), k


def produce_calibration(site: LocalSite, model, request: dict, releaser: Releaser) -> dict:
    if model is None:
        raise ValueError("the calibration statistics need the global model")
    hist, k = site_histograms(site, model)
    values = releaser.release(f"calibration/{HIST}", hist, 1.0)
    return {HIST: values, NUM_CLASSES: k, BINS: N_BINS, SIGMA + HIST: releaser.released[f"calibration/{HIST}"]}
