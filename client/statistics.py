"""Site statistics the server may ask for, and the one way they leave the site.

A producer computes a statistic from the site's data (and the global model) and hands
every vector to `Releaser.release`, which suppresses small cells, adds Gaussian noise for
the declared L2 sensitivity and charges the site's privacy ledger. The producers are listed
by name in `client/producers.py`; the server asks for them by name (run config `statistics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from client.ledger import PrivacyLedger
from client.site import LocalSite


@dataclass
class Releaser:
    """Noise, suppression and accounting for one query reply.

    `ledger=None` with `noise_multiplier=0` is for analysis code that runs on pooled data
    (benchmarks, the federated == pooled test); the client's query handler always builds
    it with the site's ledger and a positive noise multiplier.
    """

    ledger: PrivacyLedger | None
    noise_multiplier: float
    min_count: int = 0
    round: int | None = None
    run_id: str | None = None
    rng: np.random.Generator | None = None  # None: the ledger's OS-entropy generator (tests pass their own)
    released: dict[str, float] = field(default_factory=dict)  # label -> noise std used

    def __post_init__(self) -> None:
        if self.ledger is None and self.noise_multiplier != 0:
            raise ValueError("noise without a ledger would release uncharged statistics")
        if self.ledger is not None and not self.noise_multiplier > 0:
            raise ValueError(f"a site releases only noised statistics; noise_multiplier={self.noise_multiplier}")

    def release(self, label: str, value, sensitivity: float) -> list[float]:
        """`value` noised for L2 `sensitivity` (to one patient's records) and charged."""
        self.released[label] = self.noise_multiplier * sensitivity
        if self.ledger is None:
            return np.asarray(value, dtype=np.float64).ravel().tolist()
        noised = self.ledger.release(value, sensitivity, self.noise_multiplier, label=label, round=self.round,
                                     run_id=self.run_id, rng=self.rng)
        return np.asarray(noised, dtype=np.float64).ravel().tolist()

    def release_counts(self, label: str, counts, sensitivity: float = 1.0) -> list[float]:
        """Counts noised, then cells below `min_count` (after noise) reported as 0.

        Suppressing after the noise is post-processing: it costs no extra privacy, and
        what the server sees never reveals whether a true count was small.
        """
        noised = np.asarray(self.release(label, counts, sensitivity))
        noised[noised < self.min_count] = 0.0
        return noised.tolist()


Producer = Callable[[LocalSite, torch.nn.Module | None, dict, Releaser], dict]
