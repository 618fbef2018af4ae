"""Dataset-shift statistics a site releases (producer "shift").

Every vector leaves through `Releaser` with the L2 sensitivity stated below. Each patient
contributes at most one image (the first of theirs in the manifest), so "one record" in a
sensitivity is "one patient". Add/remove adjacency: a patient's record lands in one cell.

| released (key)     | what                                                             | data      | L2 sens.  |
|--------------------|------------------------------------------------------------------|-----------|-----------|
| `label_counts`     | K label counts                                                   | all       | 1         |
| `confusion`        | K x K counts, row = true label, column = predicted label         | holdout   | 1         |
| `output_hist`      | K x K' x B counts: per true label, per output, fixed log-odds bin | holdout   | sqrt(K')  |
| `rff_sum`          | K x D per-label sums of random-Fourier features of clipped        | holdout   | 1         |
|                    | penultimate features, each feature vector of norm exactly 1       |           |           |
| `intensity_hist`   | sum over images of each image's pixel-intensity histogram (sums  | all       | 1         |
|                    | to 1 per image, so its L2 norm is <= 1)                           |           |           |
| `manufacturers`    | image counts per manufacturer of a fixed vocabulary, plus "other" | all       | 1         |

K' = 1 output (the log-odds of class 1) for binary models, else K one-vs-rest log-odds: each
record sits in one bin of each of the K' histograms. "holdout" = the site's val and test
splits (never trained on), "all" = every image. The bins and the random-feature map are
fixed before any data is seen (the map from the run seed the server sends), so every site's
statistics are comparable and the server's analysis (server/shift.py) can pool them.

Nothing here raises on the data (an exception's type would reach the server): a record whose label is
not one of 0..K-1 (K from the model the server sent) is left out of the four per-label statistics (it is in
`intensity_hist` and `manufacturers`, which do not read the label) and noted in the local log; non-finite
pixels count as 0; a non-finite feature vector is taken as 0 (its random features still have norm 1) and a
non-finite output falls in a fixed bin. The vectors' lengths depend on K and the request only.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple

import numpy as np
import pandas as pd
import torch

from client.site import LocalSite
from client.statistics import Releaser
from core_models.config import ShiftConfig, read_section
from core_models.label_shift import N_BINS, output_bins
from core_models.protocol import (BINS, CONFUSION, INTENSITY_HIST, LABEL_COUNTS, MANUFACTURERS, MIN_COUNT, NUM_CLASSES,
                                  NUM_OUTPUTS, OUTPUT_HIST, RFF_DIM, RFF_SUM, SEED, SIGMA)

INTENSITY_BINS = 16
log = logging.getLogger(__name__)


class ShiftSettings(NamedTuple):
    config: ShiftConfig
    seed: int  # of the random-feature map: the same at every site


def confusion_counts(labels: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
    """K x K counts, row = true label, column = predicted (argmax) label."""
    return np.bincount(labels * k + np.asarray(logits).argmax(1), minlength=k * k).reshape(k, k).astype(float)


def class_output_hist(labels: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
    """K x K' x B counts of the output log-odds bins, per true label."""
    bins = output_bins(logits)
    out = np.zeros((k, bins.shape[1], N_BINS))
    for j in range(bins.shape[1]):
        np.add.at(out[:, j], (labels, bins[:, j]), 1.0)
    return out


def rff_map(seed: int, in_dim: int, dim: int, bandwidth: float) -> np.ndarray:
    """(dim/2, in_dim) frequencies of a Gaussian-kernel random-Fourier map shared by all sites (same seed)."""
    rng = np.random.default_rng([int(seed), 4, in_dim, dim])
    return rng.standard_normal((dim // 2, in_dim)) / bandwidth


def rff_features(features: np.ndarray, freqs: np.ndarray, clip: float) -> np.ndarray:
    """[cos, sin] random features of the clipped, rescaled features; every row has L2 norm exactly 1.

    Clipping each feature vector to norm `clip` and dividing by `clip` puts it in the unit ball,
    where the kernel bandwidth means the same thing at every site. A row whose random features come out
    non-finite (an overflowing projection: non-finite frequencies from a crafted bandwidth) gets the random
    features of the zero vector instead, computed without the map (0 x inf would be NaN), so it still has norm 1
    and what replaces it does not depend on the data.
    """
    f = np.asarray(features, dtype=np.float64)
    f = np.where(np.isfinite(f).all(axis=1, keepdims=True), f, 0.0)  # a non-finite vector: 0 (still norm 1 after)
    with np.errstate(all="ignore"):  # overflow / non-finite frequencies (a server's tiny bandwidth): handled below
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        f = f * np.minimum(1.0, clip / np.maximum(norms, 1e-12)) / clip
        proj = f @ freqs.T
        out = np.hstack([np.cos(proj), np.sin(proj)]) / np.sqrt(freqs.shape[0])
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():  # the random features of the zero vector (projection 0: cos 1, sin 0), norm 1 and data-free
        zero = np.concatenate([np.ones(freqs.shape[0]), np.zeros(freqs.shape[0])]) / np.sqrt(freqs.shape[0])
        out[bad] = zero
        log.warning("shift statistics: %d of %d feature vectors had non-finite random features; each was taken "
                    "as the zero vector's", int(bad.sum()), len(out))
    return out


def rff_class_sums(labels: np.ndarray, rff: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((k, rff.shape[1]))
    np.add.at(out, labels, rff)
    return out


def intensity_hist(images: np.ndarray) -> np.ndarray:
    """Sum over images of each image's normalised histogram of pixel values in [0, 1]."""
    flat = np.nan_to_num(np.asarray(images, dtype=np.float64).reshape(len(images), -1), nan=0.0)
    idx = np.minimum((np.clip(flat, 0.0, 1.0) * INTENSITY_BINS).astype(int), INTENSITY_BINS - 1)
    counts = np.bincount(idx.ravel() + INTENSITY_BINS * np.arange(len(flat)).repeat(flat.shape[1]),
                         minlength=INTENSITY_BINS * len(flat)).reshape(len(flat), INTENSITY_BINS)
    return (counts / flat.shape[1]).sum(0)


def manufacturer_counts(names, vocabulary) -> np.ndarray:
    """Counts per vocabulary entry (a name matches when it starts with the entry, case-insensitive), plus "other"."""
    vocab = [v.strip().lower() for v in vocabulary]
    out = np.zeros(len(vocab) + 1)
    for name in names:
        text = str(name).strip().lower() if name is not None and name == name else ""
        hit = next((i for i, v in enumerate(vocab) if v and text.startswith(v)), len(vocab))
        out[hit] += 1
    return out


@torch.no_grad()
def model_outputs(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits, penultimate features) as numpy, computed where the model is; networks without `embed` give their
    logits as features."""
    model.eval()
    device = next(model.parameters(), torch.zeros(0)).device  # (a module without weights: the CPU)
    if len(images) == 0:
        logits, feats = model_outputs(model, np.zeros((1, *np.shape(images)[1:]), np.float32))
        return logits[:0], feats[:0]
    logits, feats = [], []
    for i in range(0, len(images), batch):
        x = torch.as_tensor(images[i:i + batch], dtype=torch.float32, device=device)
        if hasattr(model, "embed"):
            f = model.embed(x)
            out = model.head(f) if hasattr(model, "head") else model(x)
        else:
            out = f = model(x)
        logits.append(out.cpu().numpy())
        feats.append(f.cpu().numpy())
    return np.concatenate(logits), np.concatenate(feats)


def request_settings(request: Mapping[str, Any]) -> ShiftSettings:
    """The public settings the server's request carries (every stats-* key and the seed of the feature map)."""
    return ShiftSettings(read_section(ShiftConfig, request), int(request[SEED]))


def release_shift(releaser: Releaser, k: int, labels_all: np.ndarray, images_all: np.ndarray, manufacturers,
                  holdout_labels: np.ndarray, logits: np.ndarray, features: np.ndarray,
                  settings: ShiftSettings) -> dict:
    """Release every shift statistic (see the module table) from one patient's worth of records each.

    `labels_all`/`images_all`/`manufacturers`: one record per patient, every split.
    `holdout_labels`/`logits`/`features`: one record per patient of the val and test splits.
    """
    k_out = 1 if k == 2 else k
    labels_all, _ = known_labels(labels_all, k, "all records")
    holdout_labels, ok = known_labels(holdout_labels, k, "holdout records")
    logits, features = np.asarray(logits)[ok], np.asarray(features)[ok]
    shift = settings.config
    freqs = rff_map(settings.seed, features.shape[1], shift.rff_dim, shift.rff_bandwidth)
    rff = rff_features(features, freqs, shift.feature_clip)
    values = {
        LABEL_COUNTS: releaser.release_counts(f"shift/{LABEL_COUNTS}", np.bincount(labels_all, minlength=k), 1.0),
        CONFUSION: releaser.release_counts(f"shift/{CONFUSION}", confusion_counts(holdout_labels, logits, k), 1.0),
        OUTPUT_HIST: releaser.release_counts(f"shift/{OUTPUT_HIST}", class_output_hist(holdout_labels, logits, k),
                                             float(np.sqrt(k_out))),
        RFF_SUM: releaser.release(f"shift/{RFF_SUM}", rff_class_sums(holdout_labels, rff, k), 1.0),
        INTENSITY_HIST: releaser.release_counts(f"shift/{INTENSITY_HIST}", intensity_hist(images_all), 1.0),
        MANUFACTURERS: releaser.release_counts(f"shift/{MANUFACTURERS}",
                                               manufacturer_counts(manufacturers, shift.vocabulary), 1.0),
    }
    shape = {NUM_CLASSES: k, NUM_OUTPUTS: k_out, BINS: N_BINS, RFF_DIM: rff.shape[1], MIN_COUNT: releaser.min_count}
    sigmas = {SIGMA + name: releaser.released[f"shift/{name}"] for name in values}
    return {**values, **shape, **sigmas}


def known_labels(labels, k: int, what: str = "records") -> tuple[np.ndarray, np.ndarray]:
    """(the labels that are one of 0..k-1, as int64; the mask of them): the rest are left out of the per-label
    statistics (never an error), and counted in the local log."""
    v = np.asarray(labels).ravel()
    try:
        f = v.astype(np.float64)
    except (TypeError, ValueError):
        f = pd.to_numeric(pd.Series(v), errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(f) & (f == np.round(f)) & (f >= 0) & (f < k)
    if not ok.all():
        log.warning("shift statistics: %d of %d %s have a label outside 0..%d: left out of the per-label statistics",
                    int((~ok).sum()), len(ok), what, k - 1)
    return f[ok].astype(np.int64), ok


def one_per_patient(frame) -> np.ndarray:
    """Mask keeping each patient's first image: the sensitivities above count one record per patient."""
    return ~frame["patient_id"].astype(str).duplicated().to_numpy()


def produce_shift(site: LocalSite, model, request: dict, releaser: Releaser) -> dict:
    if model is None:
        raise ValueError("the shift statistics need the global model")
    k = model_outputs(model, site.data.images[:1])[0].shape[1]
    keep = one_per_patient(site.data.frame)
    holdout = keep & site.split.isin(["val", "test"]).to_numpy()
    logits, feats = model_outputs(model, site.data.images[holdout])
    manufacturers = site.data.frame["manufacturer"].to_numpy()[keep] if "manufacturer" in site.data.frame \
        else [""] * int(keep.sum())
    return release_shift(releaser, k, site.data.labels[keep], site.data.images[keep], manufacturers,
                         site.data.labels[holdout], logits, feats, request_settings(request))
