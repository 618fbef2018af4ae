"""Removing the impermissible (social-pathway) effect of A on the score in training, and a post-processing fallback.

The quantity is the audit's (fairness/pse.py, weighting estimator): in the reference group a0,

    PSE = E[ŷ · (r(S, C) - 1) | A = a0],        r(s, c) = p(s | a1, c) / p(s | a0, c),

the change in the mean score when A is switched from a0 to a1 on the A -> S edge only. Written over ALL rows it is a
per-sample mean, ``PSE = E[h(A, S, C) · ŷ]`` with ``h = 1[A = a0] / P(a0) · (r(S, C) - 1)``, which is why this module
works under DP-SGD (each sample's term depends on that sample only) and in federation (a site's mean of ``h · ŷ``,
weighted by its size as FedAvg does, sums to the pooled value exactly).

**The penalty.** ``λ · PSE²`` has gradient ``2λ · PSE · ∇PSE``. Squaring a minibatch estimate instead also
penalises its sampling variance, which shrinks every source of score variation, the biological one included (measured:
70 % of the permissible effect kept). Here the factor ``PSE`` is a detached value that does not depend on the
batch (the consortium's PSE of the previous global model, broadcast by the server; or, centrally, a running mean of
earlier batches), and only ``∇PSE`` comes from the batch, as the unbiased per-sample mean above with consortium-level
normalisers (``P(a0)`` and the ratio table are global, not batch-level: a Hajek ratio inside the batch is biased and
not per-sample). The returned term is ``2λ · PSE_running · PSE_batch``: its value is not meaningful, its gradient is.

**Two estimates of ∇PSE.** :class:`PathSpecificPenalty` uses the training minibatch (a per-sample loss: the form
used under DP-SGD, where the factor is the server's broadcast). :class:`StratifiedPathPenalty` draws rows from every
(S, C-bin, D) stratum in an extra forward pass: the same expectation with far less noise, which is what let the
penalty remove the marker effect without flattening the lesion's (benchmarks/RESULTS.md, "Removing the
social-pathway effect"). Its stratum means can pool both groups (``reference``: valid when A reaches the image only
through the mediators and D), and :meth:`StratifiedPathPenalty.for_site` gives one site's share in federated
training (FedAvg's weighting sums the shares to the pooled penalty).

**The weights** come from a table of counts of (A, S, C-bin) cells: summable across sites (released noised by each
site), and exactly the Bayes-free form of the audit's ratio when C is binned (``c_edges``; none when the graph has no
C -> S edge). Ratios are clipped at ``max_weight`` and renormalised so that ``E[r | a0] = 1`` under the table.

**The mediator offset** (:class:`MediatorOffset`): train with ``logit P(D | S)`` as a fixed logit offset and drop it
at inference, so the network has nothing to gain from reading S off the pixels; combined with either penalty.

**Post-processing** (:class:`ScoreShiftCorrection`): without retraining, shift the logit of each mediator level
so that the mean score within label strata of a labelled calibration set no longer depends on S (S ⟂ D | A under
the graph, so the within-stratum difference is what the scanner does to the score), using S from the DICOM
metadata at inference.

**Values outside the configured levels never raise** (the server names the columns and levels in its request;
an exception's type would reach it, one exact bit per query). :func:`meta_array` codes what it cannot read as
NaN, and a row is *excluded* when its A is neither the reference nor the compared level (or missing), its S is
not one of 0..n_s-1 (non-integer, missing, out of range), its C is missing or non-numeric while C is binned, or its
label is not 0/1 (:func:`valid_rows`). An excluded row is left out of the released counts and score sums
(:func:`site_release_vectors`), of the penalty's strata and pool (:meth:`StratifiedPathPenalty.for_site`), has
``h = 0`` in the per-sample penalty and no offset in :class:`MediatorOffset`. The rule depends on the row only,
never on the rest of the data, and the vectors' lengths on the request only (so two sites reply alike); a
column the site lacks excludes every row, with a warning in the site's local log.

No Flower import: the server and client glue lives in client/app.py and server/app.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import brentq

from fairness.federated import _is_missing, _norm  # the audit's reading of a level, so the penalty and the audit agree

# meta columns carried by the batches of core_models.training.make_loader(..., meta=...)
META_COLUMNS = ("A", "S", "C")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- weights

def cell_index(s: np.ndarray, c: np.ndarray | None, c_edges: tuple[float, ...], n_s: int) -> np.ndarray:
    """Flat index of the (S level, C bin) cell of each row; S must be coded 0..n_s-1."""
    s = np.asarray(s, dtype=np.int64)
    if s.size and (s.min() < 0 or s.max() >= n_s):
        raise ValueError(f"mediator values must be coded 0..{n_s - 1}, got {sorted(set(s.tolist()))}")
    cb = np.zeros_like(s) if not c_edges or c is None else np.searchsorted(np.asarray(c_edges), np.asarray(c, float),
                                                                            side="right")
    return s * (len(c_edges) + 1) + cb


def cell_counts(a: np.ndarray, s: np.ndarray, c: np.ndarray | None, c_edges: tuple[float, ...] = (),
                n_s: int = 2) -> np.ndarray:
    """Counts of (A, S, C-bin), shape (2, n_s * n_c): what a site releases (noised) for the weight model.
    ``a`` is 1 for a1 and 0 for the reference group a0; rows that :func:`valid_rows` excludes are not counted."""
    n_cells = n_s * (len(c_edges) + 1)
    a, s = np.asarray(a, dtype=np.float64), np.asarray(s, dtype=np.float64)
    ok = _valid(a, s, None if c is None else np.asarray(c, np.float64), c_edges, n_s)
    idx = cell_index(s[ok], None if c is None else np.asarray(c, np.float64)[ok], c_edges, n_s)
    return np.stack([np.bincount(idx[a[ok] == g], minlength=n_cells) for g in (0, 1)]).astype(np.float64)


@dataclass
class DensityRatio:
    """``r(s, c) = p(s | a1, c) / p(s | a0, c)`` per (S level, C bin) cell, clipped and normalised so that
    ``E[r | a0] = 1``, plus ``p0 = P(A = a0)``: everything the per-sample penalty needs, and small enough to broadcast."""

    ratio: np.ndarray  # (n_s * n_c,)
    p0: float
    n_s: int = 2
    c_edges: tuple[float, ...] = ()

    @classmethod
    def from_counts(cls, counts: np.ndarray, n_s: int = 2, c_edges: tuple[float, ...] = (),
                    max_weight: float = 20.0, prior: float = 0.5) -> "DensityRatio":
        """From (noised, summed) cell counts (2, n_cells). ``prior`` pseudo-counts keep empty cells finite."""
        n = np.clip(np.asarray(counts, np.float64), 0.0, None).reshape(2, n_s, len(c_edges) + 1)
        p_s = (n + prior) / (n.sum(1, keepdims=True) + prior * n_s)  # p(s | a, c-bin)
        r = np.minimum(p_s[1] / p_s[0], max_weight)
        p0_cells = n[0] / max(n[0].sum(), 1e-12)  # p(s, c | a0)
        norm = float((p0_cells * r).sum())
        r = r / norm if norm > 0 else np.ones_like(r)
        p0 = float(n[0].sum() / max(n.sum(), 1e-12))
        if not 0.0 < p0 < 1.0:
            raise ValueError(f"both groups are needed for the density ratio; P(a0) = {p0}")
        return cls(ratio=r.ravel(), p0=p0, n_s=n_s, c_edges=tuple(float(e) for e in c_edges))

    @classmethod
    def fit(cls, a, s, c=None, **kwargs) -> "DensityRatio":
        n_s = kwargs.pop("n_s", 2)
        c_edges = tuple(kwargs.pop("c_edges", ()))
        return cls.from_counts(cell_counts(a, s, c, c_edges, n_s), n_s, c_edges, **kwargs)

    def h(self, a, s, c=None) -> np.ndarray:
        """Per-row factor ``1[a0] / p0 · (r - 1)``: the PSE is the mean of ``h · score`` over all rows.
        An excluded row (:func:`valid_rows`: unknown A, S or binned C) has ``h = 0``."""
        a, s = np.asarray(a, np.float64), np.asarray(s, np.float64)
        c = None if c is None else np.asarray(c, np.float64)
        ok = _valid(a, s, c, self.c_edges, self.n_s)
        cell = np.zeros(len(s), np.int64)
        cell[ok] = cell_index(s[ok], None if c is None else c[ok], self.c_edges, self.n_s)
        return np.where(ok & (a == 0), (self.ratio[cell] - 1.0) / self.p0, 0.0)

    def pse(self, a, s, c, scores) -> float:
        """Plug-in PSE of ``scores`` on a pooled table (what the per-sample penalty estimates)."""
        return float(np.mean(self.h(a, s, c) * np.asarray(scores, float)))

    # --- broadcast (plain floats for a Flower ConfigRecord) ---
    def to_config(self) -> dict[str, Any]:
        return {"fair-ratio": [float(x) for x in self.ratio], "fair-p0": float(self.p0)}

    @classmethod
    def from_config(cls, config, n_s: int = 2, c_edges: tuple[float, ...] = ()) -> "DensityRatio":
        return cls(np.asarray(list(config["fair-ratio"]), float), float(config["fair-p0"]), n_s, tuple(c_edges))


def parse_edges(text: str) -> tuple[float, ...]:
    """Covariate bin edges from run config ("" = no covariate bins; "45,65" = three age bins)."""
    return tuple(float(x) for x in str(text).split(",") if x.strip())


# --------------------------------------------------------------------------------------------- penalty

def positive_score(logits: torch.Tensor) -> torch.Tensor:
    """The score the audit uses: p(class 1)."""
    return torch.softmax(logits, dim=1)[:, 1]


def batch_pse(scores: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Unbiased minibatch estimate of the PSE, a per-sample mean (differentiable in ``scores``)."""
    return (h * scores).mean()


def penalty_term(scores: torch.Tensor, h: torch.Tensor, pse_running: float, lam: float) -> torch.Tensor:
    """``2·λ·PSE_running·PSE_batch``: its gradient is ``λ·∇(PSE²)`` at the running value, without the
    variance term a squared minibatch estimate would add."""
    return (2.0 * lam * float(pse_running)) * batch_pse(scores, h)


@dataclass
class PathSpecificPenalty:
    """A ``core_models.training.Penalty`` for ``train_epochs`` and ``client.dp.train_dp``.

    ``meta`` columns are A (0 = reference a0, 1 = a1), S (0..n_s-1), C (numeric). With ``pse`` given (federated: the
    consortium's PSE broadcast by the server; under DP it must be such a public value) the factor is fixed; with
    ``pse=None`` it is a bias-corrected running mean (``momentum``) of the earlier batches' estimates, updated after
    the term is built so that it never depends on the current batch.
    """

    weights: DensityRatio
    lam: float
    pse: float | None = None
    momentum: float = 0.9
    center: bool = True
    _ema: float = 0.0
    _base: float = 0.5
    _steps: int = 0
    history: list[float] = field(default_factory=list)  # running value used at each call

    @property
    def running(self) -> float:
        if self.pse is not None:
            return float(self.pse)
        return self._ema / (1.0 - self.momentum ** self._steps) if self._steps else 0.0

    def state_dict(self) -> dict[str, float]:
        return {}  # nothing carries over: each round starts from the broadcast PSE

    def h(self, meta: torch.Tensor) -> torch.Tensor:
        m = meta.detach().cpu().numpy()
        c = m[:, 2] if m.shape[1] > 2 else None
        return torch.as_tensor(self.weights.h(m[:, 0], m[:, 1], c), dtype=torch.float32,
                               device=meta.device)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        h = self.h(meta)
        scores = positive_score(logits)
        value = self.running
        self.history.append(value)
        term = penalty_term(scores, h, value, self.lam)
        if self.pse is None:
            s = scores.detach()
            # E[h] = 0, so h * (score - b) has the same mean for any constant b and a far smaller variance when
            # b is near the reference group's mean score (the few rows with large h dominate otherwise)
            a0 = meta[:, 0] == 0
            if self.center and bool(a0.any()):
                self._base = 0.9 * self._base + 0.1 * float(s[a0].mean())
            est = float(batch_pse(s - (self._base if self.center else 0.0), h))
            self._ema = self.momentum * self._ema + (1.0 - self.momentum) * est
            self._steps += 1
        return term


@dataclass
class StratifiedPathPenalty:
    """The same penalty, ``2·λ·PSE_running·PSE_strat``, with a low-variance estimate for centralised (or one site's)
    training, also a ``penalty_fn(logits, y, meta)`` hook (the training batch is not used).

    Why: in the per-sample form a batch of 32 holds ~1-2 reference-group rows of the rare mediator level, each with
    ``h ≈ +16``, so ``∇PSE_batch`` is mostly sampling noise (which patients, diseased or not, were drawn), and
    following it shrinks every score difference, the lesion's included. Since
    ``PSE = Σ_k w_k · E[ŷ | a0, stratum k]`` with ``w_k = p(k | a0) · (r_k - 1)`` for any strata that refine the
    (S, C-bin) cells (``r_k`` is the cell's ratio), each step draws ``per_cell`` reference-group rows from EVERY
    stratum of a pool (with replacement), scores them in an extra forward pass of ``model`` and uses the stratum
    means: same expectation, every stratum always represented. Strata by (S, C-bin, label D) also take the lesion's
    share of the score variance out of the gradient (post-stratification on D: exact whatever the S -> D edge, since
    ``p(k | a0)`` is the observed frequency). ``PSE_running`` is a bias-corrected moving average of earlier steps'
    (detached) estimates, never the current draw; ``ramp_steps`` grows λ linearly at the start (without it, large λ
    can collapse the network: the lagging running value and the step feed back). Not a per-sample loss of the
    training batch: not for DP-SGD.

    ``reference`` (a mask over the pool) pools the groups: p(k | a0) still comes from the reference-group rows, but
    each stratum's mean score from ALL its rows. Valid when A reaches the image only through the graph's mediators and
    D (no direct A -> X edge: then E[ŷ | k, a0] = E[ŷ | k]); it gives the rare stratum (the mediator level that is
    uncommon in a0, e.g. ~80 legacy scans) the many rows the other group has, so the network must become invariant
    to S rather than equalise a few memorised reference images.

    ``dual_lr`` > 0 turns the penalty into an augmented Lagrangian for the constraint PSE = 0: the factor becomes
    ``2·λ·PSE_running + mu`` with the multiplier ``mu += dual_lr · PSE`` after every step. The penalty alone
    settles where ``2·λ·PSE·∇PSE`` balances the cross-entropy's pull towards the shortcut, so a model that leans
    on it strongly keeps a residual; the multiplier integrates that residual away (measured: one consortium
    draw with a social PSE of 0.177 kept 0.027 at λ = 30, 0.016 with ``dual_lr`` 1, 0.000 with 5).
    """

    model: torch.nn.Module
    x_pool: np.ndarray  # images of the pool's rows (reference group only, unless ``reference`` is given)
    strata: np.ndarray  # their stratum id (refining the (S, C-bin) cell, e.g. cell * 2 + D)
    ratio_rows: np.ndarray  # their cell's density ratio r (DensityRatio.ratio[cell_index(...)])
    lam: float
    per_cell: int = 32
    momentum: float = 0.9
    seed: int = 0
    ramp_steps: int = 0  # λ grows linearly over the first ramp_steps steps (0: full λ from the start)
    reference: np.ndarray | None = None  # pool rows in a0 (None: all): they give p(k | a0); all rows give the means
    weights_by_stratum: np.ndarray | None = None  # given (federation): w_k indexed by stratum id, ratio_rows unused
    factor_weights: np.ndarray | None = None  # federation: the factor's weights by stratum id (default: the same)
    factor_fill: float = 0.0  # federation: the factor's share from strata this site lacks (consortium means)
    pse: float | None = None  # federation: the consortium's broadcast PSE, the factor before the first step
    dual_lr: float = 0.0  # > 0: augmented Lagrangian, a multiplier mu += dual_lr * PSE each step (see __call__)
    mu: float = 0.0  # the multiplier (in federation carried across rounds in the node's state, never sent)
    _ema: float = 0.0
    _steps: int = 0
    history: list[float] = field(default_factory=list)

    def __post_init__(self):
        self._x = torch.as_tensor(np.asarray(self.x_pool), dtype=torch.float32)
        strata = np.asarray(self.strata)
        if self.weights_by_stratum is not None:
            present = np.unique(strata)
            self.stratum_weights = np.asarray(self.weights_by_stratum, float)[present]
        else:
            r = np.asarray(self.ratio_rows, float)
            ref = np.ones(len(strata), bool) if self.reference is None else np.asarray(self.reference, bool)
            present = np.unique(strata[ref])
            rk = np.array([r[strata == k][0] for k in present])
            if any(np.ptp(r[strata == k]) > 0 for k in present):
                raise ValueError("strata must refine the density-ratio cells (one ratio per stratum)")
            freq = np.array([(strata[ref] == k).mean() for k in present])
            self.stratum_weights = freq * (rk - 1.0)
        fw = self.stratum_weights if self.factor_weights is None else np.asarray(self.factor_weights, float)[present]
        self._members = [torch.as_tensor(np.flatnonzero(strata == k)) for k in present]
        self._w = torch.as_tensor(self.stratum_weights, dtype=torch.float32)
        self._fw = torch.as_tensor(fw, dtype=torch.float32)
        self._gen = torch.Generator().manual_seed(int(self.seed))

    @classmethod
    def for_site(cls, model: torch.nn.Module, x: np.ndarray, meta: np.ndarray, y: np.ndarray,
                 consortium: "ConsortiumStrata", lam: float, **kwargs) -> "StratifiedPathPenalty":
        """One site's share in federated training.

        Gradient: with ``w'_k = w_k · (n_site,k / n_k) · (n / n_site)`` (``n_k`` the consortium's pool rows in
        stratum k, ``n`` its training rows), FedAvg's ``n_site / n`` weighting sums the sites' terms to
        ``Σ_k w_k · (consortium mean score in k)``: the pooled penalty's gradient.
        Factor: the consortium PSE evaluated with this site's own stratum means (exact, no release noise; the
        consortium's released means fill the strata the site lacks, e.g. a scanner it does not have), tracked
        step by step like the centralised running value. Measured: the broadcast PSE itself carries the release
        noise (sd ~0.03 at release-noise 5, as large as the effect) and, held fixed over a round of local steps,
        overshoots; both made the model stop learning."""
        strata = stratum_index(meta, y, consortium.c_edges, consortium.n_s)
        ok = valid_rows(meta, y, consortium.c_edges, consortium.n_s)  # excluded rows are in no stratum
        pool = ok if consortium.pool_groups else ok & (np.asarray(meta, np.float64)[:, 0] == 0)
        n_local = np.bincount(strata[pool], minlength=len(consortium.w)).astype(float)
        w = consortium.w * n_local / np.maximum(consortium.n_pool, 1.0) * (consortium.n_total / max(len(y), 1))
        fill = float((consortium.w * consortium.means)[n_local == 0].sum())
        return cls(model, np.asarray(x)[pool], strata[pool], np.zeros(int(pool.sum())), lam=lam,
                   weights_by_stratum=w, factor_weights=consortium.w, factor_fill=fill, pse=consortium.pse, **kwargs)

    @property
    def running(self) -> float:
        """The factor: a bias-corrected moving average of earlier steps' (detached) estimates, never the current
        draw; before the first step, the broadcast PSE (federation) or 0."""
        if self._steps:
            return self._ema / (1.0 - self.momentum ** self._steps)
        return float(self.pse) if self.pse is not None else 0.0

    def _means(self) -> torch.Tensor:
        idx = [m[torch.randint(len(m), (self.per_cell,), generator=self._gen)] for m in self._members]
        device = next(self.model.parameters()).device
        scores = positive_score(self.model(self._x[torch.cat(idx)].to(device)))
        return scores.view(len(idx), self.per_cell).mean(1)

    def estimate(self) -> torch.Tensor:
        """``Σ_k w_k · (mean score of per_cell rows drawn from stratum k)``, differentiable."""
        means = self._means()
        return (self._w.to(means.device) * means).sum()

    def exact(self) -> torch.Tensor:
        """``Σ_k w_k · (mean score over ALL pool rows of stratum k)``: the quantity ``estimate`` draws from."""
        device = next(self.model.parameters()).device
        scores = positive_score(self.model(self._x.to(device)))
        means = torch.stack([scores[m.to(device)].mean() for m in self._members])
        return (self._w.to(device) * means).sum()

    def state_dict(self) -> dict[str, float]:
        return {"mu": float(self.mu)}  # the augmented-Lagrangian multiplier, kept at the site across rounds

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        if self.lam == 0 or not self._members:
            return logits.sum() * 0.0
        value = self.running
        self.history.append(value)
        means = self._means()
        est = (self._w.to(means.device) * means).sum()
        factor_now = float((self._fw.to(means.device) * means.detach()).sum()) + self.factor_fill
        lam = self.lam * min(1.0, (self._steps + 1) / self.ramp_steps) if self.ramp_steps else self.lam
        self._ema = self.momentum * self._ema + (1.0 - self.momentum) * factor_now
        self._steps += 1
        coef = 2.0 * lam * value + self.mu
        self.mu += self.dual_lr * factor_now
        return coef * est


@dataclass
class MediatorOffset:
    """Training with the social mediator as a separate, fixed logit offset that is dropped at inference: a
    ``penalty_fn`` hook that turns the loss into ``CE(logits + delta[S] - delta[0], y)``.

    Why: when the image depends on S only through an acquisition trait that is independent of the lesion given D
    (a marker, a header burnt into the pixels), the Bayes posterior is additive in log-odds,
    ``logit P(D | x) = LLR(lesion evidence) + logit P(D | S)``. With ``delta[s] = logit P(D | S = s)`` supplied from the
    label counts (known before training; in federation each site's own, as the posterior within a site is
    ``LLR + logit P(D | S, site)``, so nothing is released), S's predictive value is
    already explained, so the network gains nothing by learning the mediator from the pixels and learns the lesion
    evidence; at inference the network alone (offset dropped, i.e. every patient scored as S = 0) carries no social
    path. It needs no extra forward pass and each sample's term depends on that sample only (fits DP-SGD and
    FedAvg). It does not remove what S does to the lesion's own visibility (blur, noise): that needs the penalty,
    given as ``inner`` (its term is added).
    """

    delta: np.ndarray  # (n_s,) log-odds of D per mediator level; only differences to level 0 matter
    inner: Any = None  # another Penalty (e.g. StratifiedPathPenalty), added

    @classmethod
    def from_counts(cls, n: np.ndarray, n_s: int = 2, n_c: int = 1, prior: float = 0.5,
                    inner: Any = None) -> "MediatorOffset":
        """``logit P(D = 1 | S = s)`` from stratum counts (S, C-bin, D), optionally by group first (A, S, C-bin, D),
        flat or not (``n_c`` C bins)."""
        n = np.clip(np.asarray(n, float), 0.0, None).reshape(-1, n_s, n_c, 2).sum((0, 2)) + prior  # (S, D)
        return cls(np.log(n[:, 1] / n[:, 0]), inner)

    def state_dict(self) -> dict[str, float]:
        return self.inner.state_dict() if self.inner is not None else {}

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        d = torch.as_tensor(self.delta - self.delta[0], dtype=logits.dtype, device=logits.device)
        s = meta[:, 1]
        ok = torch.isfinite(s) & (s.round() == s) & (s >= 0) & (s < len(d))
        shift = d[torch.where(ok, s, torch.zeros_like(s)).long()] * ok  # an unknown S: no offset
        shifted = logits + torch.stack([torch.zeros_like(shift), shift], 1)
        term = torch.nn.functional.cross_entropy(shifted, y) - torch.nn.functional.cross_entropy(logits, y)
        return term + self.inner(logits, y, meta) if self.inner is not None else term


def _same(values: np.ndarray, level: Any) -> np.ndarray:
    """``values == level`` with 1, 1.0, "1" and True reading alike (manifest columns arrive as text or numbers)."""
    target = _norm(level)
    return np.fromiter((not _is_missing(v) and _norm(v) == target for v in values), dtype=bool, count=len(values))


def meta_array(frame, sensitive: str, mediator: str, covariate: str = "", reference: Any = 0,
               compared: Any = None) -> np.ndarray:
    """(N, 3) float array of A (0 = reference level, 1 = the compared group), S, C from a site's manifest rows.

    Never raises on the data. A is 1 for the ``compared`` level (when given; else for any present value other
    than the reference), and NaN (excluded, see :func:`valid_rows`) for a missing value or, with ``compared``
    given, any other value. S and C are read as numbers, NaN where they are not. A column the frame lacks gives
    NaN in every row (all rows excluded) and a warning in the local log."""
    n = len(frame)

    def col(name: str) -> np.ndarray:
        if name in frame.columns:
            return frame[name].to_numpy(dtype=object)
        log.warning("fairness penalty: column '%s' is not in this site's table; every row is excluded", name)
        return np.full(n, None, dtype=object)

    raw = col(sensitive)
    ref = _same(raw, reference)
    one = _same(raw, compared) if compared is not None else \
        np.fromiter((not _is_missing(v) for v in raw), dtype=bool, count=n) & ~ref
    a = np.where(ref, 0.0, np.where(one, 1.0, np.nan))

    def numeric(name: str) -> np.ndarray:
        return pd.to_numeric(pd.Series(col(name)), errors="coerce").to_numpy(dtype=np.float64)

    s = numeric(mediator)
    c = numeric(covariate) if covariate else np.zeros(n)
    bad = int((~np.isfinite(a)).sum()), int((~np.isfinite(s)).sum())
    if n and any(bad) and sensitive in frame.columns and mediator in frame.columns:
        log.warning("fairness penalty: %d rows with an unknown '%s' and %d with a non-numeric '%s' are excluded",
                    bad[0], sensitive, bad[1], mediator)
    return np.stack([a, s, c], axis=1)


def _valid(a: np.ndarray, s: np.ndarray, c: np.ndarray | None, c_edges: tuple[float, ...], n_s: int) -> np.ndarray:
    s = np.asarray(s, np.float64)
    with np.errstate(invalid="ignore"):
        ok = ((a == 0) | (a == 1)) & np.isfinite(s) & (s == np.round(s)) & (s >= 0) & (s < n_s)
        if c_edges and c is not None:
            ok &= np.isfinite(np.asarray(c, np.float64))
    return ok


def valid_rows(meta: np.ndarray, y: np.ndarray | None = None, c_edges: tuple[float, ...] = (),
               n_s: int = 2) -> np.ndarray:
    """Rows the penalty and its releases use: A is 0 or 1, S one of 0..n_s-1, C finite when it is binned
    (``c_edges``), and the label 0 or 1. The rest are excluded (a rule on each row alone, never an error)."""
    meta = np.asarray(meta, np.float64)
    ok = _valid(meta[:, 0], meta[:, 1], meta[:, 2] if meta.shape[1] > 2 else None, tuple(c_edges), n_s)
    if y is not None:
        yv = np.asarray(y, np.float64)
        ok &= (yv == 0) | (yv == 1)
    return ok


# --------------------------------------------------------------------------------------------- federation

def stratum_index(meta: np.ndarray, y: np.ndarray, c_edges: tuple[float, ...] = (), n_s: int = 2) -> np.ndarray:
    """Stratum ``cell * 2 + D`` of each row: the (S, C-bin) cell refined by the binary label; -1 for a row
    :func:`valid_rows` excludes (its S or label unknown: it belongs to no stratum)."""
    meta = np.asarray(meta, np.float64)
    ok = valid_rows(np.column_stack([np.zeros(len(meta)), meta[:, 1:]]), y, c_edges, n_s)  # A is not needed here
    out = np.full(len(meta), -1, np.int64)
    out[ok] = cell_index(meta[ok, 1], meta[ok, 2], c_edges, n_s) * 2 + np.asarray(y, np.float64)[ok].astype(np.int64)
    return out


def site_release_vectors(meta: np.ndarray, scores: np.ndarray, y: np.ndarray, c_edges: tuple[float, ...] = (),
                         n_s: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """What one site releases (each noised through its Releaser): counts of (A, stratum) and score sums of
    (A, stratum), flat (2 * n_strata,) each, L2 sensitivity 1 (one patient is in one cell; scores clipped to
    [0, 1], a non-finite score counts 0). The lengths depend on ``c_edges`` and ``n_s`` only; rows that
    :func:`valid_rows` excludes (A neither level, S outside 0..n_s-1, label not 0/1, C unknown) are in neither."""
    meta = np.asarray(meta, np.float64)
    n_strata = 2 * n_s * (len(c_edges) + 1)
    ok = valid_rows(meta, y, c_edges, n_s)
    k = stratum_index(meta, y, c_edges, n_s)[ok]
    a = meta[ok, 0].astype(int)
    sc = np.asarray(scores, np.float64)[ok]
    sc = np.clip(np.where(np.isfinite(sc), sc, 0.0), 0.0, 1.0)
    counts = np.stack([np.bincount(k[a == g], minlength=n_strata) for g in (0, 1)]).astype(float)
    sums = np.stack([np.bincount(k[a == g], weights=sc[a == g], minlength=n_strata) for g in (0, 1)])
    return counts.ravel(), sums.ravel()


@dataclass
class ConsortiumStrata:
    """What the server broadcasts for the stratified penalty: stratum weights ``w_k = p(k | a0) · (r_k - 1)``, the
    pool's row count per stratum (both groups when ``pool_groups``, else the reference group), the total training
    rows, the consortium's PSE, and the ratio table (the per-sample form under DP-SGD uses it)."""

    weights: DensityRatio
    w: np.ndarray
    n_pool: np.ndarray
    n_total: float
    pse: float
    means: np.ndarray  # the consortium's mean score per stratum (from the released sums)
    pool_groups: bool = True
    n_s: int = 2
    c_edges: tuple[float, ...] = ()

    def to_config(self) -> dict[str, Any]:
        return {**self.weights.to_config(), "fair-pse": float(self.pse), "fair-stratum-w": [float(v) for v in self.w],
                "fair-stratum-n": [float(v) for v in self.n_pool], "fair-n-total": float(self.n_total),
                "fair-stratum-mean": [float(v) for v in self.means],
                "fair-pool-groups": bool(self.pool_groups)}

    @classmethod
    def from_config(cls, config, n_s: int = 2, c_edges: tuple[float, ...] = ()) -> "ConsortiumStrata":
        return cls(DensityRatio.from_config(config, n_s, c_edges), np.asarray(list(config["fair-stratum-w"]), float),
                   np.asarray(list(config["fair-stratum-n"]), float), float(config["fair-n-total"]),
                   float(config["fair-pse"]), np.asarray(list(config["fair-stratum-mean"]), float),
                   bool(config["fair-pool-groups"]), n_s, tuple(c_edges))


def stratum_weights(n: np.ndarray, ratio: np.ndarray, n_s: int = 2, factorise_label: bool = True) -> np.ndarray:
    """``w_k`` for strata k = (S, C-bin, D) from counts ``n`` of shape (A, cell, D) and the cells' ratios:
    ``p(s, c | a0) · (r(s, c) - 1) · p(d | a0, s, c)``. With ``factorise_label`` the last factor is
    ``p(d | a0, c)``, pooled over S: the same value in the population when D ⟂ S | A, C (no S -> D edge), and far
    less noisy, since p(d | a0, s, c) of the rare mediator level (~10 % of a0) comes from few patients and
    multiplies the large score gap between D = 1 and D = 0. Measured on the marker scenario (one trained model,
    12 consortium draws of 2000 patients): error sd of the PSE 0.021 -> 0.013."""
    n = np.clip(np.asarray(n, float), 0.0, None)
    n0 = n[0].reshape(n_s, -1, 2)  # (S, C-bin, D) of the reference group
    p_sc = n0.sum(2) / max(n0.sum(), 1e-12)
    if factorise_label:
        by_c = n0.sum(0)  # (C-bin, D)
        p_d = np.broadcast_to(by_c / np.maximum(by_c.sum(1, keepdims=True), 1e-12), n0.shape)
    else:
        p_d = n0 / np.maximum(n0.sum(2, keepdims=True), 1e-12)
    w = (p_sc * (np.asarray(ratio, float).reshape(n_s, -1) - 1.0))[..., None] * p_d
    return w.ravel()


def consortium_strata(counts: list[np.ndarray], sums: list[np.ndarray], c_edges: tuple[float, ...] = (),
                      n_s: int = 2, max_weight: float = 20.0, pool_groups: bool = True,
                      factorise_label: bool = True) -> ConsortiumStrata:
    """Server side: from the sites' released (A, stratum) counts and score sums, the density-ratio table, the
    stratum weights (:func:`stratum_weights`) and the consortium PSE ``Σ_k w_k · mean score in k`` (the mean over
    both groups when ``pool_groups``: valid when A reaches the image only through the mediators and D; else over the
    reference group, which with ``factorise_label=False`` is exactly the per-sample plug-in PSE)."""
    n = np.clip(np.sum([np.asarray(x, float) for x in counts], axis=0).reshape(2, -1, 2), 0.0, None)  # (A, cell, D)
    total = np.sum([np.asarray(x, float) for x in sums], axis=0).reshape(2, -1, 2)
    weights = DensityRatio.from_counts(n.sum(2), n_s, c_edges, max_weight=max_weight)
    w = stratum_weights(n, weights.ratio, n_s, factorise_label)
    n_pool = (n.sum(0) if pool_groups else n[0]).ravel()
    s_pool = (total.sum(0) if pool_groups else total[0]).ravel()
    means = np.clip(s_pool / np.maximum(n_pool, 1.0), 0.0, 1.0)
    return ConsortiumStrata(weights, w, n_pool, float(n.sum()), float((w * means).sum()), means, pool_groups, n_s,
                            tuple(c_edges))


def consortium_pse(counts: list[np.ndarray], sums: list[np.ndarray], c_edges: tuple[float, ...] = (),
                   n_s: int = 2, max_weight: float = 20.0) -> tuple[DensityRatio, float]:
    """Server side, per-sample form: the density-ratio table and the reference group's plug-in PSE."""
    got = consortium_strata(counts, sums, c_edges, n_s, max_weight, pool_groups=False, factorise_label=False)
    return got.weights, got.pse


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


def pct(part: float, whole: float) -> float:
    """``part`` as a percentage of ``whole`` (NaN when ``whole`` is 0)."""
    return 100.0 * part / whole if whole else math.nan
