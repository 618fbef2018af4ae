"""The estimators' nuisance models: logit fits vectorised over the design's columns, and their design matrix.

Every fit is one Newton / Fisher-scoring iteration per step for all columns at once (the data and each replicate),
so refitting on every bootstrap replicate costs a few matrix products.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

from fairness.design import Var, mixed_radix


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float = 1e-3, max_iter: int = 50,
                 tol: float = 1e-9) -> np.ndarray:
    """Logistic regressions of y on x with frequency weights, one per column of ``w`` (K x B), by Newton's method
    vectorised over the columns; small ridge ``lam`` keeps separated cells finite. Returns beta (p x B)."""
    k, p = x.shape
    b = w.shape[1]
    beta = np.zeros((p, b))
    eye = lam * np.eye(p)
    for _ in range(max_iter):
        mu = expit(x @ beta)
        grad = x.T @ (w * (y[:, None] - mu)) - lam * beta
        h = w * mu * (1.0 - mu)
        hess = np.einsum("kp,kb,kq->bpq", x, h, x, optimize=True) + eye
        step = np.linalg.solve(hess, grad.T[..., None])[..., 0].T
        step = np.clip(step, -10.0, 10.0)
        beta += step
        if np.max(np.abs(step)) < tol:
            break
    return beta


def fit_mean_logit(x: np.ndarray, sums: np.ndarray, counts: np.ndarray, lam: float = 0.1, max_iter: int = 50,
                   tol: float = 1e-9) -> np.ndarray:
    """A logit-link model of a cell's mean, ``sums / counts`` (values in [0, 1]), one fit per column of the K x B
    arrays: the root of ``x' (sums - counts * expit(x beta)) = 0``, which is linear in the cells' counts and sums
    (noise in them enters as a sum over cells). Fisher scoring with the counts floored at 0 in the curvature
    (the root is the same). ``lam``: a ridge that keeps beta finite when noised sums and counts admit no root
    (0.1: against the thousands of rows' information at consortium sizes it moves nothing measurable; at 1.0 the
    intervals under noise covered 0.89-0.95 instead of 0.91-0.95). Returns beta (p x B)."""
    p, b = x.shape[1], sums.shape[1]
    beta = np.zeros((p, b))
    w = np.maximum(counts, 0.0)
    eye = lam * np.eye(p)
    for _ in range(max_iter):
        mu = expit(x @ beta)
        grad = x.T @ (sums - counts * mu) - lam * beta
        hess = np.einsum("kp,kb,kq->bpq", x, w * mu * (1.0 - mu), x, optimize=True) + eye
        step = np.clip(np.linalg.solve(hess, grad.T[..., None])[..., 0].T, -10.0, 10.0)
        beta += step
        if np.max(np.abs(step)) < tol:
            break
    return beta


def features(med: np.ndarray, cov: list[np.ndarray], med_idx: list[int], meds: list[Var], covs: list[Var],
             n_rows: np.ndarray, interactions: bool = True) -> np.ndarray:
    """Design matrix over points with mediator codes ``med`` (points x mediators) and covariate codes ``cov``:
    one-hot of the joint levels of the chosen mediators (or an intercept), numeric covariates standardised
    (+ square when > 2 levels, + interaction with the mediator one-hot), categorical covariates one-hot (first
    level dropped)."""
    parts = []
    if med_idx:
        joint = mixed_radix([med[:, i] for i in med_idx], [len(meds[i].levels) for i in med_idx])
        _u, jcode = np.unique(joint, return_inverse=True)
        onehot = np.eye(len(_u))[jcode]
    else:
        onehot = np.ones((len(med), 1))
    parts.append(onehot)
    # feature scaling only: weights floored at 0 (noised federated counts can be negative)
    w = np.maximum(np.asarray(n_rows, dtype=np.float64), 0.0)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / max(len(w), 1))
    for c, codes in zip(covs, cov):
        if c.numeric:
            v = c.values[codes]
            mu = float(w @ v)
            sd = math.sqrt(float(w @ (v - mu) ** 2)) or 1.0
            z = (v - mu) / sd
            cols = [z] + ([z ** 2] if len(c.levels) > 2 else [])
            for zc in cols:
                parts.append(zc[:, None])
                if interactions and onehot.shape[1] > 1:
                    parts.append(onehot[:, 1:] * zc[:, None])
        else:
            parts.append(np.eye(len(c.levels))[codes][:, 1:])
    return np.concatenate(parts, axis=1)
