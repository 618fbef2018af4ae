"""Model outputs binned on fixed log-odds edges, and label-prior estimators on those bins.

A site bins its outputs and releases the counts; the server's shift analysis and a new site's
adaptation run the same estimates on them, so both sides share this one definition."""

from __future__ import annotations

import numpy as np

# Interior edges of the fixed log-odds bins: (-inf, -8], (-8, -7], ..., (7, 8], (8, inf).
# Equal-width bins on probabilities would lump every confident output into the end bins.
LOGODDS_EDGES = np.arange(-8.0, 8.5, 1.0)
N_BINS = len(LOGODDS_EDGES) + 1


def log_odds(logits: np.ndarray) -> np.ndarray:
    """(N, K') log-odds: class 1 vs 0 for K=2, else each class vs the rest."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 2:
        return logits[:, 1:2] - logits[:, 0:1]
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return logp - np.log(-np.expm1(np.minimum(logp, -1e-12)))


def output_bins(logits: np.ndarray) -> np.ndarray:
    """(N, K') bin index of each output on the fixed log-odds bins."""
    return np.searchsorted(LOGODDS_EDGES, log_odds(logits), side="left")


def normalise(h: np.ndarray) -> np.ndarray:
    """Rows summing to 1 (negative cells, e.g. from noise, count as 0; empty rows uniform)."""
    h = np.clip(h, 0.0, None)
    total = h.sum(-1, keepdims=True)
    return np.divide(h, total, out=np.full_like(h, 1.0 / h.shape[-1]), where=total > 0)


def mlls_prior(target: np.ndarray, cond: np.ndarray, iters: int = 2000, tol: float = 1e-9) -> np.ndarray:
    """Maximum-likelihood label prior of a target from its output-bin counts (EM, Saerens et al. 2002 on bins).

    target: (..., K', B) bin counts of the target; cond: (..., K, K', B) per-label bin counts of the
    source. With K' > 1 outputs the likelihoods of the outputs are added (composite likelihood).
    Leading batch dimensions are bootstrap draws.
    """
    target = np.clip(np.asarray(target, float), 0.0, None)
    pyx = normalise(np.clip(np.asarray(cond, float), 0.0, None) + 0.1)  # p(bin | y), no empty bins
    k = pyx.shape[-3]
    pi = np.full(target.shape[:-2] + (k,), 1.0 / k)
    n = np.maximum(target.sum(-1), 1e-12)  # (..., K')
    for _ in range(iters):
        joint = pyx * pi[..., :, None, None]  # (..., K, K', B)
        post = joint / np.maximum(joint.sum(-3, keepdims=True), 1e-300)
        new = ((post * target[..., None, :, :]).sum(-1) / n[..., None, :]).mean(-1)
        if np.max(np.abs(new - pi)) < tol:
            return new
        pi = new
    return pi


def bbse_prior(predicted: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """Black-box shift estimate: solve p_t(yhat) = sum_y p_s(yhat | y) pi_y (Lipton et al. 2018)."""
    a = normalise(np.asarray(confusion, float)).T  # a[yhat, y] = p_s(yhat | y)
    pi = np.linalg.lstsq(a, normalise(np.asarray(predicted, float)), rcond=None)[0]
    return normalise(np.clip(pi, 0.0, None))


def mlls_interval(target: np.ndarray, target_sigma: float, cond: np.ndarray, cond_sigma: float,
                  rng: np.random.Generator, n_boot: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLLS prior and its 95% parametric-bootstrap interval (resampling the target's and the source's counts,
    each with its own Gaussian noise std; 0 for unnoised local counts)."""
    pi = mlls_prior(target, cond)
    pyx = normalise(np.clip(cond, 0.0, None) + 0.1)
    fitted = normalise(np.einsum("y,yob->ob", pi, pyx))
    n_t = np.clip(target, 0, None).sum(-1)
    n_y = np.clip(cond, 0, None).sum(-1)  # (K, K')
    t_sim = np.stack([rng.multinomial(int(round(n)), p, size=n_boot) for n, p in zip(n_t, fitted)], axis=1)
    t_sim = t_sim + rng.normal(0.0, target_sigma, t_sim.shape)
    c_sim = np.empty((n_boot,) + cond.shape)
    for y in range(cond.shape[0]):
        for o in range(cond.shape[1]):
            c_sim[:, y, o] = rng.multinomial(int(round(n_y[y, o])), normalise(np.clip(cond[y, o], 0, None)),
                                             size=n_boot)
    c_sim = c_sim + rng.normal(0.0, cond_sigma, c_sim.shape)
    sims = mlls_prior(t_sim, c_sim)
    return pi, np.quantile(sims, 0.025, axis=0), np.quantile(sims, 0.975, axis=0)
