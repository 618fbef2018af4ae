"""Calibration statistics a site releases (producer "calibration"): what the server fits the global model's
temperature (or, binary, Platt scale and bias) from.

| released (key) | what                                                                        | data | L2 sens. |
|----------------|-----------------------------------------------------------------------------|------|----------|
| `hist`         | 2 x B counts of the global model's score on fixed bins: binary, the log-odds | val  | 1        |
|                | z1 - z0 per true label (row 1: label 1); K > 2, the top class's log-odds,    |      |          |
|                | row 1: the top class is the true label (core_models/calibration.py)         |      |          |

B = 35 bins fixed before any data are seen (core_models.calibration.EDGES: 0.25 wide near 0, widening to 4 out
to +-20, the two end bins catching the rest, one bin for non-finite scores). One record per patient (the patient's
first image in the manifest); each record is in exactly one cell of the table, so adding or removing one patient
moves it by 1 in one cell (L2 sensitivity 1; a patient is in one split only).

Which patients: the validation split, never trained on; and, when this site trained the global model with DP-SGD
in this run (its ledger holds this run's training steps), its training split too. DP-SGD bounds what any one
training patient does to the model, and on real scans the training patients' scores then calibrate as the unseen
ones do: BreastMNIST, 3 sites, epsilon 8, the temperature (Platt) fitted on the training split 2.30, on the
validation split 2.23, on the holdout 2.69 (RetinaMNIST, softmax temperature: training + validation 4.3, holdout
4.8); seven times the records (546 + 78 instead of 78) make the fit stand out of the release noise
(benchmarks/bench_calibration.py). Without DP a network fits its training patients (there 0.83 against the
holdout's 1.41): only the validation split is scored. Either way the table has the same shape, one record per
patient, and is noised and charged alike; which splits it counts follows from the run config (dp), nothing else.

The counts are noised without small-cell suppression (`Releaser.release`): the server sums the sites' tables before
it judges which cells stand out of the noise, and zeroing small noised cells at each site would bias the pooled
counts (as for the fairness audit's cell counts).

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
DP_SPLITS = ("train", "val")  # when this site trained the model with DP-SGD in this run


def site_histograms(site: LocalSite, model, splits: tuple[str, ...] = (SPLIT,)) -> tuple[np.ndarray, int]:
    """The (2, N_BINS) table of the site's records of `splits` (one per patient), and K."""
    keep = one_per_patient(site.data.frame) & site.split.isin(splits).to_numpy()
    logits, _ = model_outputs(model, site.data.images[keep])
    k = int(logits.shape[1])
    labels, ok = known_labels(site.data.labels[keep], k, f"{'+'.join(splits)} records")
    return calibration_histograms(logits[ok], labels), k


def trained_with_dp(releaser: Releaser) -> bool:
    """Whether the site's ledger holds DP-SGD steps of this run (the releaser's run id)."""
    ledger = releaser.ledger
    if ledger is None or releaser.run_id is None:
        return False
    return any(e.get("kind") == "train" and e.get("run_id") == releaser.run_id for e in ledger.entries)


def produce_calibration(site: LocalSite, model, request: dict, releaser: Releaser) -> dict:
    if model is None:
        raise ValueError("the calibration statistics need the global model")
    hist, k = site_histograms(site, model, DP_SPLITS if trained_with_dp(releaser) else (SPLIT,))
    values = releaser.release(f"calibration/{HIST}", hist, 1.0)
    return {HIST: values, NUM_CLASSES: k, BINS: N_BINS, SIGMA + HIST: releaser.released[f"calibration/{HIST}"]}
