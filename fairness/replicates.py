"""How an effect's values on the design's columns become its estimate (first) and its replicates (after it).

* :func:`bootstrap_replicates`: the columns are the data and then bootstrap replicates (rows resampled, or the cells
  perturbed as resampling would): the values already are the estimate and its replicates.
* :class:`Linearized`: the columns are the data and then finite-difference steps in every cell; each replicate is
  the estimate plus the effect's gradient times that replicate's perturbation of the cells (the federated audit on
  noised cells: re-evaluating the estimator on twice-noised cells would spread the replicates wider than the
  estimate varies, its ratios being steeper near small cells; a second-order bias correction was tried and is
  unstable at large noise, its curvature dominated by the smallest cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STEPS = (1.0, 0.5)  # finite-difference steps: one row (counts), half a score unit (sums)


def bootstrap_replicates(values: np.ndarray) -> np.ndarray:
    return values


@dataclass(frozen=True)
class Linearized:
    """Replicates ``estimate + gradient . (dn_j, dt_j)`` for the perturbations ``dn``, ``dt`` (cells x replicates)
    of the counts and the score sums, the gradient from the values on :meth:`columns`."""

    dn: np.ndarray
    dt: np.ndarray

    @staticmethod
    def columns(n0: np.ndarray, t0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts and sums at the data (column 0), then each count stepped up and down, then each sum: 1 + 4K
        columns."""
        k = n0.size
        hn, ht = STEPS
        eye = np.eye(k)
        same_n, same_t = np.repeat(n0[:, None], 2 * k, 1), np.repeat(t0[:, None], 2 * k, 1)
        n_cols = np.concatenate([n0[:, None] + hn * eye, n0[:, None] - hn * eye], axis=1)
        t_cols = np.concatenate([t0[:, None] + ht * eye, t0[:, None] - ht * eye], axis=1)
        return (np.concatenate([n0[:, None], n_cols, same_n], axis=1),
                np.concatenate([t0[:, None], same_t, t_cols], axis=1))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        k = self.dn.shape[0]
        hn, ht = STEPS
        est = values[0]
        up_n, down_n, up_t, down_t = (values[1 + i * k:1 + (i + 1) * k] for i in range(4))
        grad = np.concatenate([(up_n - down_n) / (2 * hn), (up_t - down_t) / (2 * ht)])
        return np.concatenate([[est], est + grad @ np.concatenate([self.dn, self.dt], axis=0)])
