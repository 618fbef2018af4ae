"""Site statistics the server may ask for, and the one way they leave the site.

A producer computes a statistic from the site's data (and the global model) and hands
every vector to `Releaser.release`, which suppresses small cells, adds Gaussian noise for
the declared L2 sensitivity and charges the site's privacy ledger. The producers are listed
by name in `client/producers.py`; the server asks for them by name (run config `statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client import secagg
from client.ledger import PrivacyLedger, os_entropy_rng
from client.site import LocalSite
from core_models.config import RunConfig
from fairness.federated import SECURE_SUM, SUMMED


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
    # a share of a secure sum: the noise multiplier the ledger charges (that of the sum's honest threshold), while
    # `noise_multiplier` is the site's share of the sum's noise; None: a plain release, charged for what it adds
    charged_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.ledger is None and self.noise_multiplier != 0:
            raise ValueError("noise without a ledger would release uncharged statistics")
        if self.ledger is not None and not self.noise_multiplier > 0:
            raise ValueError(f"a site releases only noised statistics; noise_multiplier={self.noise_multiplier}")
        if self.charged_multiplier is not None and not (self.ledger is not None
                                                        and 0 < self.charged_multiplier):
            raise ValueError("a share of a secure sum is charged to the site's ledger at a positive multiplier")

    def release(self, label: str, value, sensitivity: float) -> list[float]:
        """`value` noised for L2 `sensitivity` (to one patient's records) and charged."""
        self.released[label] = self.noise_multiplier * sensitivity
        if self.ledger is None:
            return np.asarray(value, dtype=np.float64).ravel().tolist()
        if self.charged_multiplier is not None:
            return self._share(label, value, sensitivity)
        noised = self.ledger.release(value, sensitivity, self.noise_multiplier, label=label, round=self.round,
                                     run_id=self.run_id, rng=self.rng)
        return np.asarray(noised, dtype=np.float64).ravel().tolist()

    def _share(self, label: str, value, sensitivity: float) -> np.ndarray:
        """A share of a secure sum: noise of std noise_multiplier x sensitivity (the site's part of the sum's
        noise), charged as the ledger's release is (budget checked first, written before the value is returned)
        but at `charged_multiplier`: the noise the site trusts to be in the sum whatever the others do."""
        ledger = self.ledger
        if not (np.isfinite(sensitivity) and sensitivity > 0):
            raise ValueError(f"sensitivity must be positive, got {sensitivity}")
        x = np.asarray(value, dtype=np.float64)
        x = np.where(np.isfinite(x), x, 0.0)  # as the ledger's release: a non-finite value leaves as 0 + noise
        ledger.check_budget([(self.charged_multiplier, 1.0, 1)])
        rng = self.rng if self.rng is not None else os_entropy_rng()
        noised = x + rng.normal(0.0, self.noise_multiplier * sensitivity, size=x.shape)
        ledger.charge(self.charged_multiplier, 1.0, 1, kind="release", label=label, round=self.round,
                      run_id=self.run_id)
        return np.asarray(noised, dtype=np.float64).ravel().tolist()

    def release_counts(self, label: str, counts, sensitivity: float = 1.0) -> list[float]:
        """Counts noised, then cells below `min_count` (after noise) reported as 0.

        Suppressing after the noise is post-processing: it costs no extra privacy, and
        what the server sees never reveals whether a true count was small. A share of a secure sum is not
        suppressed (the server sees only the sum; zeroing a share's negative noise would bias it).
        """
        if self.charged_multiplier is not None:
            return self.release(label, counts, sensitivity)
        noised = np.asarray(self.release(label, counts, sensitivity))
        noised[noised < self.min_count] = 0.0
        return noised.tolist()


Producer = Callable[[LocalSite, torch.nn.Module | None, dict, Releaser], dict]


def fairness_noise(cfg: RunConfig) -> float:
    """The noise multiplier of the fairness cells: stats-fairness-noise, or release-noise when it is 0 (the cells
    released once can carry less noise than the every-round statistics at the same epsilon)."""
    return cfg.audit.noise or cfg.release.noise


def secure_share(noise_multiplier: float, sites: int) -> tuple[float, float]:
    """(the noise multiplier each of `sites` adds, the one it is charged for) in a secure sum whose release
    carries `noise_multiplier`: each adds 1/sqrt(K) of it, so the K shares sum to the stated noise; the site
    trusts only the threshold t (a strict majority, the fewest honest sites that unmask a sum), whose shares
    carry noise_multiplier x sqrt(t / K)."""
    if sites < 2:
        raise ValueError(f"a secure sum needs at least 2 sites, got {sites}")
    threshold = sites // 2 + 1
    return noise_multiplier / math.sqrt(sites), noise_multiplier * math.sqrt(threshold / sites)


def keep_for_sum(state: RecordDict, server_round: int, record: dict, sites: int) -> dict:
    """A fairness release that goes through the secure sum: its vectors (already noised with the share of a sum
    over `sites`, and charged) wait in the site's Context as the round's input (weight 1, so the sum is the plain
    sum; `sites` noted with it, for the sum's parameters to be checked against); the reply keeps only the noise
    stds and the marker."""
    vectors = ArrayRecord({k: Array(np.asarray(record[k], dtype=np.float64)) for k in SUMMED if k in record})
    secagg.keep_update(state, server_round, vectors, 1.0)
    state[secagg.INPUT] = ConfigRecord({**dict(state[secagg.INPUT]), "sites": int(sites)})
    return {**{k: v for k, v in record.items() if k.startswith("sigma_")}, SECURE_SUM: 1}
