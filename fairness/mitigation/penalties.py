"""In-training penalties on the impermissible (social-pathway) effect of A on the score: the per-sample form
(:class:`PathSpecificPenalty`) and the stratified form (:class:`StratifiedPathPenalty`). The quantity, the weights and
the row rule are in :mod:`fairness.mitigation.strata`.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fairness.mitigation.strata import ConsortiumStrata, DensityRatio, stratum_index, valid_rows


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
