"""Small structural models with known path-specific effects, to check the audit where the truth is known.

A binary sensitive attribute A, a covariate C, a social mediator S (A -> S impermissible), the disease D (A -> D
permissible, also the label), an unobserved image X (S, D, C -> X) and the model's score from X. Knobs add what
real data have and the Markovian audit got wrong: a hidden cause of A and C (``u_ac``), a hidden cause of S and the
image (``u_sx``: site or scanner effects), strong confounding by C, a continuous S.

Counterfactuals share each patient's exogenous noise, so the truth of an effect in the reference group is the
mean difference of the patient's own counterfactual and factual scores (:func:`true_effects`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fairness.graph import CausalSpec


@dataclass(frozen=True)
class StructuralModel:
    name: str = "markovian"
    a0: float = 0.0          # intercept of A
    kappa: float = 0.5       # C -> A
    s0: float = -0.5
    gamma: float = 1.0       # A -> S (impermissible)
    gamma_c: float = 0.5     # C -> S
    d0: float = -0.5
    alpha: float = 0.8       # A -> D (permissible)
    alpha_c: float = 0.8     # C -> D
    b0: float = -1.0
    beta_s: float = 0.8      # S -> score (through the image)
    beta_d: float = 2.0      # D -> score
    beta_c: float = 0.3      # C -> score
    u_ac: float = 0.0        # hidden U -> A and U -> C
    u_sx: float = 0.0        # hidden U -> S and U -> the image
    u_sd: float = 0.0        # hidden U -> S and U -> D (a recanting district: the PSE is not identified)
    continuous_s: bool = False
    noise: float = 0.5       # image noise on the logit of the score

    def spec(self) -> CausalSpec:
        nodes: dict[str, Any] = {
            "A": {"role": "sensitive", "column": "A", "reference": 0},
            "C": {"role": "covariate", "column": "C"},
            "S": {"role": "mediator", "column": "S", "kind": "social"},
            "D": {"role": "outcome", "column": "D", "kind": "biological"},
            "X": {"role": "mediator"},
            "Yhat": {"role": "prediction", "column": "score"},
        }
        edges = [("C", "A", True), ("A", "S", False), ("A", "D", True), ("C", "S", True), ("C", "D", True),
                 ("S", "X", True), ("D", "X", True), ("C", "X", True), ("X", "Yhat", True)]
        if self.u_ac:
            nodes["U_ac"] = {"role": "latent"}
            edges += [("U_ac", "A", True), ("U_ac", "C", True)]
        if self.u_sx:
            nodes["U_sx"] = {"role": "latent"}
            edges += [("U_sx", "S", True), ("U_sx", "X", True)]
        if self.u_sd:
            nodes["U_sd"] = {"role": "latent"}
            edges += [("U_sd", "S", True), ("U_sd", "D", True)]
        return CausalSpec.from_dict({"name": self.name, "nodes": nodes,
                                     "edges": [{"from": u, "to": v, "permissible": p} for u, v, p in edges]})


MODELS = {
    "markovian": StructuralModel(),
    "latent_a_c": StructuralModel(name="latent_a_c", kappa=0.0, u_ac=1.5),
    "latent_s_image": StructuralModel(name="latent_s_image", u_sx=1.5),
    "strong_c": StructuralModel(name="strong_c", kappa=1.5, gamma_c=1.5, alpha_c=1.5, beta_c=1.5),
    "continuous_s": StructuralModel(name="continuous_s", continuous_s=True, beta_s=0.6),
    "latent_s_d": StructuralModel(name="latent_s_d", u_sd=1.5),
}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _exogenous(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(n) if k in ("c", "u_ac", "u_sx", "u_sd", "e_s", "e_x") else rng.random(n))
            for k in ("c", "u_ac", "u_sx", "u_sd", "u_a", "e_s", "u_s", "u_d", "e_x")}


def _solve(m: StructuralModel, e: dict[str, np.ndarray], a_s: np.ndarray | None = None,
           a_d: np.ndarray | None = None, e_s: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The model's values for one patient noise draw; ``a_s`` / ``a_d`` override the A that S / D see, ``e_s``
    gives S its own (independent) noise draw."""
    c = e["c"] + m.u_ac * e["u_ac"]
    a = (e["u_a"] < _sigmoid(m.a0 + m.kappa * c + m.u_ac * e["u_ac"])).astype(np.int64)
    a_s = a if a_s is None else a_s
    a_d = a if a_d is None else a_d
    es = e if e_s is None else e_s
    s_lin = m.s0 + m.gamma * a_s + m.gamma_c * c + m.u_sx * e["u_sx"] + m.u_sd * es["u_sd"]
    s = s_lin + es["e_s"] if m.continuous_s else (es["u_s"] < _sigmoid(s_lin)).astype(np.float64)
    d = (e["u_d"] < _sigmoid(m.d0 + m.alpha * a_d + m.alpha_c * c + m.u_sd * e["u_sd"])).astype(np.int64)
    score = _sigmoid(m.b0 + m.beta_s * s + m.beta_d * d + m.beta_c * c + m.u_sx * e["u_sx"] + m.noise * e["e_x"])
    return {"A": a, "C": c, "S": s, "D": d, "score": score}


def sample(m: StructuralModel, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n patients' observed columns A, C, S, D, score."""
    return pd.DataFrame(_solve(m, _exogenous(n, rng)))


def true_effects(m: StructuralModel, n: int = 1_000_000, seed: int = 12345) -> dict[str, float]:
    """Effects of A (0 -> 1) on the score in the reference group A = 0, by counterfactual simulation:
    total, impermissible (A -> S switched), permissible (A -> D switched), direct (zero here), and the
    interventional analogue of the impermissible effect (S drawn from its a1-law given C independently of D)."""
    rng = np.random.default_rng(seed)
    e = _exogenous(n, rng)
    fact = _solve(m, e)
    ref = fact["A"] == 0
    one, zero = np.ones(n, np.int64), np.zeros(n, np.int64)
    worlds = {"total": (one, one), "impermissible": (one, zero), "permissible": (zero, one)}
    out = {eff: float((_solve(m, e, a_s, a_d)["score"] - fact["score"])[ref].mean())
           for eff, (a_s, a_d) in worlds.items()}
    out["direct"] = 0.0
    fresh = _exogenous(n, rng)  # S's noise and hidden cause drawn apart from D's: their laws given C, independent
    out["interventional"] = float((_solve(m, e, one, zero, e_s=fresh)["score"] - fact["score"])[ref].mean())
    return out


