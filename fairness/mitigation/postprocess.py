"""**Post-processing** (:class:`ScoreShiftCorrection`): without retraining, shift the logit of each mediator level
so that the mean score within label strata of a labelled calibration set no longer depends on S (S ⟂ D | A under
the graph, so the within-stratum difference is what the scanner does to the score), using S from the DICOM
metadata at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq


# --------------------------------------------------------------------------------------------- post-processing

def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


@dataclass
class ScoreShiftCorrection:
    """Post-processing: subtract an S-specific logit shift ``delta[s]`` (``delta[0] = 0``) chosen on labelled
    calibration data so that the audit's quantity is zero: for each level s, the mean corrected score of the
    (S = s, D = d) strata, mixed by the reference group's label rates p(d | a0), equals that of S = 0. Stratum means
    pool both groups (S ⟂ D | A under the graph, and A reaches the image only through S and D), so the rare level
    of the reference group borrows the other group's rows. S is read from metadata at inference; A is not needed.

    Why scores and not mean logits: when S changes how visible the lesion is (blur, noise), the logits of S = 1
    images are compressed, not only shifted, and equal mean logits still leave unequal mean scores (the PSE); the
    root of the score contrast is the shift that makes the PSE zero (and equals the logit shift when S only adds
    a constant)."""

    delta: np.ndarray = field(default_factory=lambda: np.zeros(2))

    def fit(self, scores, a, s, d) -> "ScoreShiftCorrection":
        z, a, s, d = _logit(scores), np.asarray(a), np.asarray(s).astype(int), np.asarray(d).astype(int)
        labels = np.unique(d)
        p_d = np.array([(d[a == a.min()] == y).mean() for y in labels])  # p(d | a0), a0 = the lowest code
        delta = np.zeros(int(s.max()) + 1)
        base = [(s == 0) & (d == y) for y in labels]
        for lev in range(1, len(delta)):
            rows = [(s == lev) & (d == y) for y in labels]
            keep = [k for k in range(len(labels)) if rows[k].any() and base[k].any()]
            if not keep:
                continue
            w = p_d[keep] / p_d[keep].sum()
            target = sum(wk * _sigmoid(z[base[k]]).mean() for wk, k in zip(w, keep))

            def gap(dl, lev_rows=rows, w=w, keep=keep, target=target):
                return sum(wk * _sigmoid(z[lev_rows[k]] - dl).mean() for wk, k in zip(w, keep)) - target

            lo, hi = -30.0, 30.0
            delta[lev] = brentq(gap, lo, hi) if gap(lo) * gap(hi) < 0 else 0.0
        self.delta = delta
        return self

    def transform(self, scores, s) -> np.ndarray:
        return _sigmoid(_logit(scores) - self.delta[np.asarray(s).astype(int)])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, float)))
