"""Calibration of a classifier's probabilities: scores binned on fixed edges, the scaling fitted from the bins,
folded into the network's last layer, and the figures that judge it (ECE, Brier).

Both sides share this one definition: a site bins its global model's outputs on its validation split (and its
training split where it trained the model with DP-SGD) and releases the counts (client/calibration_stats.py); the
server pools them and fits (server/calibration.py).

The score and the target of one record (`calibration_scores`):

* binary models (two logits): the log-odds d = z1 - z0, target = the true label. The fit is Platt scaling,
  d -> scale * d + bias, exact (up to the bin width) from the two per-label histograms of d.
* K > 2 classes: the top class's log-odds, log p_top - log(1 - p_top), target = whether the top class is the
  true one. The fit is a temperature T (logits / T) from the binary likelihood of "the top class is right" under
  the log-odds the temperature gives, (score + log(K - 1)) / T - log(K - 1) (exact were the other K - 1 logits
  equal): top-label calibration, what the ECE measures. The histograms cannot give the exact softmax likelihood
  (it needs every logit of a record). Without the log(K - 1) the surrogate's limit at large T is 1/2 instead of
  1/K: on RetinaMNIST under DP (5 classes, right 47 % of the time, holdout ECE 0.40) it asked for T = 33 where
  the softmax likelihood of the same records wants 4.3 (with the offset 3.8; holdout ECE 0.24, 0.05, 0.08); without
  DP 1.13 / 0.98 / 1.00. Where the other logits are far from equal the offset form is still only a surrogate: on
  another DP run's model it gave 4.2 (holdout ECE 0.41 -> 0.11), the softmax likelihood 27 (0.22), while the ECE
  is lowest near 5-6 (0.06); a top-label fit that follows the softmax needs more than these two histograms.

The bins are fixed before any data are seen (`EDGES`): width 0.25 within |score| <= 1, widening to 4 at |score|
16..20, the two end bins catching the rest, and one bin for non-finite scores (left out of the fit). One record is
in exactly one cell of the (2, N_BINS) table (2 x 35 cells). Uniform 0.25-wide bins over [-12, 12] (2 x 99 cells)
fit as well without noise but worse under the release noise, which every cell carries, and their end bins at +-12
misplace the over-confident model calibration is for (measured on simulated binary scores, 1,000 pooled records,
noise std 5 per cell, 16 draws: mean holdout ECE after the fit 0.012 with these bins, 0.038 with the uniform ones,
0.111 uncalibrated; a model with log-odds out to +-20: 0.019, 0.039 and 0.169, and without noise the uniform bins'
scale 13 % off the direct fit's, these bins' 0.3 %).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

_HALF = np.array([0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20])
EDGES = np.concatenate([-_HALF[::-1], [0.0], _HALF])  # 33 edges: (-inf, -20], (-20, -16], ..., (20, inf)
NONFINITE_BIN = len(EDGES) + 1  # the last bin: NaN and +-inf scores
N_BINS = len(EDGES) + 2
# where a bin's records sit in the fit: interior bins at their middle, the end bins half their neighbour's width out
CENTRES = np.concatenate([[EDGES[0] - (EDGES[1] - EDGES[0]) / 2], (EDGES[:-1] + EDGES[1:]) / 2,
                          [EDGES[-1] + (EDGES[-1] - EDGES[-2]) / 2]])

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 50.0  # the fitted scale is kept in [1/50, 1/0.05]
MAX_BIAS = 12.0
ECE_BINS = 15


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration: calibrated log-odds = scale * log-odds + bias (binary, Platt), or logits / temperature
    (K > 2, bias 0). `records`: the (pooled, possibly noised) weight the fit used."""

    kind: str  # "platt" | "temperature"
    scale: float
    bias: float
    records: float

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def to_json(self) -> dict:
        return {**asdict(self), "temperature": self.temperature}

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        return cls(kind=str(data["kind"]), scale=float(data["scale"]), bias=float(data["bias"]),
                   records=float(data["records"]))

    def apply(self, logits) -> np.ndarray:
        """The calibrated logits (what the folded head gives)."""
        z = np.asarray(logits, dtype=np.float64)
        if self.kind == "platt":
            out = z * self.scale
            out[:, 1] += self.bias
            return out
        return z * self.scale


def top_log_odds(logits: np.ndarray) -> np.ndarray:
    """log p_top - log(1 - p_top) of the softmax, computed from the logits (no underflow at large margins)."""
    z = np.asarray(logits, dtype=np.float64)
    with np.errstate(all="ignore"):
        top = np.argmax(z, axis=1)
        top_logit = z[np.arange(len(z)), top]
        rest = z.copy()
        rest[np.arange(len(z)), top] = -np.inf
        return top_logit - np.logaddexp.reduce(rest, axis=1)


def calibration_scores(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """(score, target) of each record; see the module docstring. Non-finite logits give a non-finite score."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"calibration needs (N, K >= 2) logits, got shape {z.shape}")
    if z.shape[1] == 2:
        with np.errstate(all="ignore"):
            return z[:, 1] - z[:, 0], (y == 1).astype(np.int64)
    return top_log_odds(z), (np.argmax(z, axis=1) == y).astype(np.int64)


def score_bins(scores) -> np.ndarray:
    """Bin index of each score on the fixed edges; non-finite scores in NONFINITE_BIN."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    finite = np.isfinite(s)
    out = np.full(len(s), NONFINITE_BIN, dtype=np.int64)
    out[finite] = np.searchsorted(EDGES, s[finite], side="left")
    return out


def calibration_histograms(logits, labels) -> np.ndarray:
    """(2, N_BINS) counts: row 1 the records whose target is 1 (label 1; the top class right), row 0 the rest."""
    scores, target = calibration_scores(logits, labels)
    hist = np.zeros((2, N_BINS))
    np.add.at(hist, (target, score_bins(scores)), 1.0)
    return hist


KEEP_Z = 3.0  # a bin enters a noised fit when its count stands this many noise stds above 0
SHRINK = 3.0  # noise stds of pseudo-records pulling each noised bin's share toward the model's own probability


def fit_weights(hist, noise_std: float = 0.0) -> np.ndarray:
    """(2, finite bins) weights of the fit from a (2, N_BINS) table whose cells carry Gaussian noise of std
    `noise_std` (0: exact counts, returned as they are, clipped at 0). Post-processing of released values only.

    Under noise, a bin enters the fit only when its count (both rows) exceeds KEEP_Z noise stds of that sum; its
    count is then clipped at 0 and split between the rows by its share of target-1 records, shrunk toward the
    uncalibrated model's own probability at the bin's centre by SHRINK noise stds of pseudo-records. Without this,
    the noise in the many empty cells (a few in each tail, where a wrong-looking record weighs most) pulls the fit
    toward a less confident model: on simulated scores a calibrated model (holdout ECE 0.017) came out at 0.16
    from 1,000 pooled records at noise std 5 with the counts merely clipped at 0 (0.11 with the cells below one
    noise std zeroed), at 0.04 with this; an over-confident one (0.107) at 0.05, 0.03 and 0.016.

    KEEP_Z = 3, not 2: with 2 x 35 cells about one empty bin in 40 passed 2 stds, and one such bin in a tail took a
    calibrated model's fit from 300 records (three sites at release-noise 5) to a temperature of 2 in the median and
    42 at worst (1.07 and 1.5 now, with the prior of `fit_from_histograms`; tests/test_calibration.py). On the real
    models of benchmarks/bench_calibration.py without DP (seed 0, validation splits, release-noise 2 and 5 at three
    sites) the holdout ECE after a noised fit was 0.066-0.081 (before: 0.12-0.19) where the raw one was 0.076-0.077
    and the noiseless fit's 0.062-0.078.
    """
    h = np.asarray(hist, dtype=np.float64).reshape(2, N_BINS)[:, :NONFINITE_BIN]
    if not noise_std > 0:
        return np.clip(h, 0.0, None)
    total = h.sum(axis=0)
    mass = np.where(total > KEEP_Z * noise_std * math.sqrt(2.0), total, 0.0)
    prior = 1.0 / (1.0 + np.exp(-CENTRES))  # what the uncalibrated scores say
    kappa = SHRINK * noise_std
    share = np.clip((np.where(mass > 0, h[1], 0.0) + kappa * prior) / (mass + kappa), 0.0, 1.0)
    return np.stack([mass * (1.0 - share), mass * share])


def _objective(params: np.ndarray, s: np.ndarray, t: np.ndarray, w: np.ndarray, with_bias: bool, prior: float,
               offset: float):
    """Weighted binary cross-entropy of target t under log-odds exp(l) * (s + offset) - offset + b, plus `prior` x
    the Gaussian prior's negative log-density at (l, b) (identity-centred; see `fit_scaling`), and its gradient in
    (l[, b])."""
    log_a, b = params[0], (params[1] if with_bias else 0.0)
    a = math.exp(log_a)
    s = s + offset
    u = a * s - offset + b
    # -log sigmoid(u) for t=1, -log sigmoid(-u) for t=0
    loss = np.sum(w * np.where(t == 1, np.logaddexp(0.0, -u), np.logaddexp(0.0, u)))
    loss += prior * (log_a**2 / (2 * PRIOR_LOG_SCALE_STD**2) + (b**2 / (2 * PRIOR_BIAS_STD**2) if with_bias else 0.0))
    resid = w * (1.0 / (1.0 + np.exp(-u)) - t)  # d loss / d u
    grad = [a * np.sum(resid * s) + prior * log_a / PRIOR_LOG_SCALE_STD**2]
    if with_bias:
        grad.append(np.sum(resid) + prior * b / PRIOR_BIAS_STD**2)
    return loss, np.asarray(grad)


# the identity-centred prior of a fit from noised records: log scale ~ N(0, 1) (a temperature within about
# 0.14..7.4 at two stds: a DP-trained five-class model needed 4), bias ~ N(0, 1)
PRIOR_LOG_SCALE_STD, PRIOR_BIAS_STD = 1.0, 1.0


def top_label_offset(num_classes: int) -> float:
    """log(K - 1): the offset of the top class's log-odds under a temperature (`fit_scaling`); 0 for K = 2."""
    return math.log(max(int(num_classes) - 1, 1))


def fit_scaling(scores, targets, weights=None, *, platt: bool, prior: float = 0.0, offset: float = 0.0
                ) -> Calibration:
    """Weighted maximum likelihood (with `prior` > 0: maximum a posteriori) of
    P(target = 1 | score) = sigmoid(scale * (score + offset) - offset [+ bias]).

    `offset`: 0 for Platt scaling; log(K - 1) (`top_label_offset`) for the top class of K > 2 under a temperature.
    Were the other K - 1 logits equal, the top class's log-odds at temperature T would be exactly
    (score + log(K - 1)) / T - log(K - 1): at T -> infinity every class gets 1/K, where sigmoid(score / T) would
    give the top class 1/2. Without the offset a poor five-class model (right half the time) looks best served by
    T -> infinity (module docstring).

    Raw scores with unit weights are the direct fit; bin centres with their counts are the federated one. `prior`
    weighs an identity-centred Gaussian prior on (log scale, bias) (PRIOR_LOG_SCALE_STD, PRIOR_BIAS_STD): with
    few records it keeps the model as it is rather than fitting their noise. The scale is kept in
    [1/MAX_TEMPERATURE, 1/MIN_TEMPERATURE] and the bias in [-MAX_BIAS, MAX_BIAS] (separable data would drive them to
    infinity). Raises ValueError when either target has no weight.
    """
    from scipy.optimize import minimize  # here: only the fit needs it

    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(targets).astype(np.int64).ravel()
    w = np.ones_like(s) if weights is None else np.clip(np.asarray(weights, dtype=np.float64).ravel(), 0.0, None)
    keep = np.isfinite(s) & (w > 0)
    s, t, w = s[keep], t[keep], w[keep]
    if not (w[t == 1].sum() > 0 and w[t == 0].sum() > 0):
        raise ValueError("calibration needs records of both targets (label 1 and 0, or the top class right and "
                         "wrong); the pooled counts have none of one")
    norm = w.sum()  # the objective per record: the optimiser's tolerances mean the same at every size
    bounds = [(-math.log(MAX_TEMPERATURE), -math.log(MIN_TEMPERATURE))] + ([(-MAX_BIAS, MAX_BIAS)] if platt else [])
    start = np.zeros(len(bounds))
    result = minimize(lambda p: tuple(v / norm for v in _objective(p, s, t, w, platt, float(prior), float(offset))),
                      start, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"ftol": 1e-13, "gtol": 1e-10, "maxiter": 500})
    a, b = math.exp(float(result.x[0])), float(result.x[1]) if platt else 0.0
    return Calibration(kind="platt" if platt else "temperature", scale=a, bias=b, records=float(w.sum()))


# the prior's weight (`fit_scaling`) in a fit from noised histograms, in pseudo-records per unit of the pooled noise
# variance per cell (the noise's weight in the likelihood grows with it): at three sites' release-noise 5 (std 8.66)
# 75, at release-noise 2 (std 3.46) 12, against 78-120 validation or 600-1,200 training + validation patients.
# Weighted by the std instead, single real-run fits from 78 BreastMNIST validation patients at release-noise 5 came
# out at temperature 6.8 (holdout ECE 0.065 -> 0.160); exact counts: no prior
PRIOR_PER_VARIANCE = 1.0


def fit_from_histograms(hist, num_classes: int, noise_std: float = 0.0) -> Calibration:
    """The calibration from pooled (2, N_BINS) histograms (`calibration_histograms` summed over sites), each cell
    noised with std `noise_std` (0: exact counts): maximum a posteriori on the bin centres, the weights from
    `fit_weights`, the prior's weight PRIOR_PER_VARIANCE x noise_std^2 (exact counts: maximum likelihood); the
    non-finite bin is left out."""
    w = fit_weights(hist, noise_std)
    if noise_std > 0 and not w.sum() > 0:
        raise ValueError(f"no bin of the pooled histograms stands out of their noise (std {noise_std:.3g} per cell): "
                         f"the validation splits are too small for the release noise (a lower release-noise, or "
                         f"more validation patients)")
    return fit_scaling(np.concatenate([CENTRES, CENTRES]), np.repeat([0, 1], len(CENTRES)), w.ravel(),
                       platt=int(num_classes) == 2, prior=PRIOR_PER_VARIANCE * max(noise_std, 0.0) ** 2,
                       offset=top_label_offset(num_classes))


def fold_into_head(model, calibration: Calibration):
    """`model` (in place) with the calibration folded into its last linear layer, so that its logits are the
    calibrated ones: any loader of the state dict gets calibrated probabilities. The network must end in that
    layer (every equifed network does); a detector's classifier is the one changed."""
    import torch

    target = getattr(model, "classifier", model)
    head = head_of(target)
    with torch.no_grad():
        head.weight.mul_(calibration.scale)
        if head.bias is not None:
            head.bias.mul_(calibration.scale)
        if calibration.kind == "platt" and calibration.bias != 0.0:
            if head.bias is None:
                raise ValueError("Platt scaling's bias needs a head with a bias")
            head.bias[1] += calibration.bias
    return model


def head_of(model):
    """The network's last linear layer (its logits)."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer to fold a calibration into")
    return linears[-1]


def expected_calibration_error(probs, labels, n_bins: int = ECE_BINS) -> float:
    """ECE of the top-class probability: |accuracy - mean confidence| per equal-width bin of (0, 1], weighted by
    the bin's share of records. NaN for no records."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if len(y) == 0:
        return math.nan
    conf = p.max(axis=1)
    right = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(idx):
        m = idx == b
        total += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(total)


def brier_score(probs, labels) -> float:
    """Binary: mean (p1 - y)^2; K > 2: mean over records of sum_k (p_k - [y = k])^2. NaN for no records."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if len(y) == 0:
        return math.nan
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - (y == 1)) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def probability_metrics(probs, labels) -> dict[str, float]:
    """{"ece", "brier"} of the probabilities."""
    return {"ece": expected_calibration_error(probs, labels), "brier": brier_score(probs, labels)}
