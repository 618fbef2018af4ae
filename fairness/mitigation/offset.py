"""**The mediator offset** (:class:`MediatorOffset`): train with ``logit P(D | S)`` as a fixed logit offset and drop it
at inference, so the network has nothing to gain from reading S off the pixels; combined with either penalty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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
