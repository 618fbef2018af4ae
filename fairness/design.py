"""What the path-specific estimators read: the rows compressed to patterns with per-column counts and sums.

Within a pattern of (A, observed mediators, label, covariates) only the score varies, so the estimators need each
pattern's count and score sum, per column: column 0 the data, then one column per bootstrap replicate (or, in the
federated audit on noised cells, per finite-difference step). :class:`Design` holds them; the pooled audit builds
it from rows (:meth:`Design.from_rows`), the federated one from the released cells. :class:`Problem` adds the graph
and :class:`Settings` the tuning; every estimator is a function of these two and returns its :class:`Means`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from fairness.graph import CausalSpec, GraphError
from fairness.identification import Identification


class EstimationError(GraphError):
    """The data cannot be analysed as asked (e.g. a continuous mediator, one group empty)."""


@dataclass(frozen=True)
class Var:
    name: str
    column: str
    codes: np.ndarray  # per row
    levels: list[Any]
    numeric: bool = False
    values: np.ndarray | None = None  # numeric covariates: value per code


def categorical_var(frame: pd.DataFrame, node: str, column: str, max_levels: int, what: str) -> Var:
    col = frame[column]
    levels = sorted(pd.unique(col).tolist(), key=lambda x: (str(type(x)), x))
    if len(levels) > max_levels:
        raise EstimationError(f"{what} '{node}' (column '{column}') has {len(levels)} levels; the estimator needs "
                              f"categorical {what}s with at most {max_levels} levels: bin it first")
    codes = pd.Categorical(col, categories=levels).codes.astype(np.int64)
    return Var(node, column, codes, levels)


def covariate_var(frame: pd.DataFrame, node: str, column: str, max_levels: int) -> Var:
    col = frame[column]
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        v = col.to_numpy(dtype=np.float64)
        uniq = np.unique(v)
        if len(uniq) <= max_levels:
            codes = np.searchsorted(uniq, v)
            return Var(node, column, codes, uniq.tolist(), True, uniq)
        edges = np.unique(np.quantile(v, np.linspace(0, 1, max_levels + 1)[1:-1]))
        codes = np.searchsorted(edges, v, side="right")
        means = np.bincount(codes, weights=v) / np.maximum(np.bincount(codes), 1)
        return Var(node, column, codes, [f"bin{i}" for i in range(len(means))], True, means)
    return categorical_var(frame, node, column, max_levels, "covariate")


def mixed_radix(cols: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    key = np.zeros(len(cols[0]) if cols else 0, dtype=np.int64)
    for c, s in zip(cols, sizes):
        key = key * s + c
    return key


@dataclass(frozen=True)
class Design:
    """Patterns of (A, mediators, label, covariates): their codes, and counts ``N`` and score sums ``T``
    (patterns x columns)."""

    a: np.ndarray  # per pattern: 0 = a0, 1 = a1
    med: np.ndarray  # patterns x mediators
    cov: list[np.ndarray]
    label: np.ndarray | None
    N: np.ndarray
    T: np.ndarray

    @property
    def k(self) -> int:
        return len(self.a)

    @cached_property
    def L(self) -> np.ndarray | None:
        """Label sums per pattern and column."""
        return None if self.label is None else self.N * self.label[:, None]

    @classmethod
    def from_rows(cls, a: np.ndarray, meds: list[Var], label: np.ndarray | None, label_in_meds: bool,
                  covs: list[Var], score: np.ndarray, n_boot: int, seed: int) -> "Design":
        """The rows' patterns with the data in column 0 and ``n_boot`` row-bootstrap replicates after it."""
        cols = [a] + [m.codes for m in meds] + [c.codes for c in covs]
        sizes = [2] + [len(m.levels) for m in meds] + [len(c.levels) for c in covs]
        if label is not None and not label_in_meds:
            lab_levels, lab_codes = np.unique(label, return_inverse=True)
            cols.append(lab_codes)
            sizes.append(len(lab_levels))
        uniq, first, inv = np.unique(mixed_radix(cols, sizes), return_index=True, return_inverse=True)
        k, n = len(uniq), len(a)
        med = np.stack([m.codes[first] for m in meds], axis=1) if meds else np.zeros((k, 0), np.int64)
        N, T = np.empty((k, n_boot + 1)), np.empty((k, n_boot + 1))
        N[:, 0] = np.bincount(inv, minlength=k)
        T[:, 0] = np.bincount(inv, weights=score, minlength=k)
        rng = np.random.default_rng(seed)
        for j in range(1, n_boot + 1):
            idx = rng.integers(0, n, n)
            p = inv[idx]
            N[:, j] = np.bincount(p, minlength=k)
            T[:, j] = np.bincount(p, weights=score[idx], minlength=k)
        return cls(a[first], med, [c.codes[first] for c in covs],
                   None if label is None else label[first].astype(np.float64), N, T)


@dataclass(frozen=True)
class Settings:
    """The estimators' tuning (see :func:`fairness.pse.estimate_effects`)."""

    n_boot: int = 200
    ci: float = 0.95
    max_weight: float = 50.0
    gformula_bins: int = 4
    positivity_ratio: float = 20.0
    min_cell: int = 5
    max_gformula_cells: int = 200_000


@dataclass(frozen=True)
class Problem:
    """A design with its graph: what every estimator reads."""

    d: Design
    spec: CausalSpec
    ident: Identification
    meds: list[Var]
    covs: list[Var]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.meds]

    @cached_property
    def _projection(self) -> tuple[Any, list[frozenset[str]]]:
        return self.spec.projection()

    @property
    def bidirected(self) -> list[frozenset[str]]:
        """The hidden common causes among the observed nodes (pairs)."""
        return self._projection[1]

    @cached_property
    def parents(self) -> dict[str, list[str]]:
        """The mediators each mediator's factor conditions on: its parents among them; with hidden common causes
        Tian's set (its district's), except for a recanting district's interventional analogue, where each
        mediator is drawn from its own law given its parents (the district's dependence left out)."""
        names, ident = self.names, self.ident
        graph = {m: [p for p in self._projection[0].predecessors(m) if p in names] for m in names}
        if ident.interventional:
            return graph
        return {m: [p for p in ident.conditioning.get(m, graph[m]) if p in names] for m in names}


@dataclass(frozen=True)
class Means:
    """One estimator's mean of each outcome ("score", "label") in each effect's world, per design column.

    ``baseline``: the estimator's own E[T | A=a0] when its contrasts are taken against that (so its model's noise
    cancels), else None (the data's); ``coupling``: bounds over a recanting district's couplings (the cell
    g-formula's, when they apply); ``diagnostics`` and ``notes`` go to the audit. No means: it was skipped."""

    estimator: str
    by_outcome: dict[str, dict[str, np.ndarray]]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    baseline: dict[str, np.ndarray] | None = None
    coupling: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None

    @property
    def skipped(self) -> bool:
        return not any(self.by_outcome.values())

    @classmethod
    def skip(cls, estimator: str, note: str) -> "Means":
        return cls(estimator, {"score": {}, "label": {}}, notes=(note,))
