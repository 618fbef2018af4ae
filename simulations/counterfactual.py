"""Fresh patients with exact counterfactual scores, cheaply, for benchmarking the fairness audit against the truth.

Rendering an image costs ~1 ms, and a benchmark needs tens of thousands of patients per seed. So the exogenous
image noise U_X (the anatomy, lesion and scanner-noise seeds of the generator) is drawn from a fixed pool of
``m`` atoms, rendered once for every (D, S) with the generator's own two-stage renderer
(``render_base`` then ``apply_scanner``) and scored once by the model. A patient is then (structural variables
drawn fresh per seed, an atom j drawn uniformly), its factual image is the render of (j, D, S) and its
counterfactual with S switched is the render of (j, D, S_cf): exactly what ``rerender_counterfactual`` would
produce for it, because the renderer is deterministic given the seeds, D and S. This is an exact structural
causal model whose U_X has a discrete distribution on ``m`` atoms: A, C, S, D and the atom index are independent
exogenous draws, so every graph assumption of the audit holds and per-patient counterfactuals are exact.

Structural models: the generator's (``structural_rows`` of a ``SiteSpec``) and a C-confounded variant the
generator does not have, where age also drives the group and the scanner (C -> A, C -> S, C -> D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.special import expit

from simulations.generator import (
    apply_scanner,
    causal_rates,
    exogenous_draws,
    render_base,
    site_columns,
    structural_rows,
)
from simulations.scenario import SiteSpec


@dataclass
class ConfoundedSpec:
    """A C-confounded structural model over the generator's image mechanism (``site``'s knobs):
    logit P(A=1) = a0 + a_c z, logit P(S=1) = s0 + s_a A + s_c z, logit P(D=1) = d0 + d_a A + d_c z, z = (C-55)/15."""

    site: SiteSpec
    a0: float = -0.2
    a_c: float = 1.0
    s0: float = -1.2
    s_a: float = 1.5
    s_c: float = 1.0
    d0: float = -1.0
    d_a: float = 0.5
    d_c: float = 0.6


def _draws(rng: np.random.Generator, n: int) -> pd.DataFrame:
    exo = pd.DataFrame({k: rng.random(n) for k in ("u_source", "U_A", "U_S", "U_D", "u_sex")})
    exo["z_age"] = rng.standard_normal(n)
    return exo


def sample_structural(model: SiteSpec | ConfoundedSpec, n: int, seed: int) -> pd.DataFrame:
    """Columns A, C, S, D, S_a0, S_a1 (S under A=0/1 with the same U_S) for ``n`` fresh patients."""
    rng = np.random.default_rng(seed)
    exo = _draws(rng, n)
    if isinstance(model, SiteSpec):
        t = structural_rows(model, exo, causal_rates(model)["base_logit"])
        return t[["A", "C", "S", "D", "S_a0", "S_a1"]].copy()
    site = model.site
    c = np.round(np.clip(site.age_mean + site.age_std * exo["z_age"].to_numpy(), 18, 95)).astype(int)
    z = (c - 55.0) / 15.0
    a = (exo["U_A"].to_numpy() < expit(model.a0 + model.a_c * z)).astype(int)
    u_s = exo["U_S"].to_numpy()
    s_a0 = (u_s < expit(model.s0 + model.s_c * z)).astype(int)
    s_a1 = (u_s < expit(model.s0 + model.s_a + model.s_c * z)).astype(int)
    d = (exo["U_D"].to_numpy() < expit(model.d0 + model.d_a * a + model.d_c * z)).astype(int)
    return pd.DataFrame({"A": a, "C": c, "S": np.where(a == 1, s_a1, s_a0), "D": d, "S_a0": s_a0, "S_a1": s_a1})


def image_site(model: SiteSpec | ConfoundedSpec) -> SiteSpec:
    return model if isinstance(model, SiteSpec) else model.site


def render_atoms(site: SiteSpec, m: int, seed: int, size: int) -> np.ndarray:
    """(m, 2, 2, 1, size, size) float32: atom j rendered with D = 0/1 and S = 0/1 (the generator's renderer)."""
    _exo, seeds = exogenous_draws(seed, f"{site.name}-atoms", m)
    knobs = site_columns(site)
    out = np.empty((m, 2, 2, 1, size, size), dtype=np.float32)
    for j in range(m):
        row = {**knobs, "seed_anatomy": seeds[j, 0], "seed_lesion": seeds[j, 1], "image_size": size}
        for d in (0, 1):
            base = render_base({**row, "D": d}, size)
            for s in (0, 1):
                out[j, d, s, 0] = apply_scanner(base, s, knobs, int(seeds[j, 2]))
    return out


def render_patients(site: SiteSpec, t: pd.DataFrame, seed: int, size: int) -> np.ndarray:
    """(n, 1, size, size) factual images of ``t`` (own image seeds per patient): a training set."""
    _exo, seeds = exogenous_draws(seed, f"{site.name}-train", len(t))
    knobs = site_columns(site)
    out = np.empty((len(t), 1, size, size), dtype=np.float32)
    for i, (d, s) in enumerate(zip(t["D"].to_numpy(), t["S"].to_numpy())):
        row = {**knobs, "seed_anatomy": seeds[i, 0], "seed_lesion": seeds[i, 1], "D": int(d), "image_size": size}
        out[i, 0] = apply_scanner(render_base(row, size), int(s), knobs, int(seeds[i, 2]))
    return out


@torch.no_grad()
def score_atoms(model: torch.nn.Module, atoms: np.ndarray, batch: int = 512) -> np.ndarray:
    """(m, 2, 2) P(D=1) of every atom x D x S image."""
    model.eval()
    flat = atoms.reshape(-1, *atoms.shape[3:])
    probs = [torch.softmax(model(torch.as_tensor(flat[i:i + batch])), 1)[:, 1].numpy()
             for i in range(0, len(flat), batch)]
    return np.concatenate(probs).astype(np.float64).reshape(atoms.shape[:3])


def patients_with_truth(model: SiteSpec | ConfoundedSpec, table: np.ndarray, n: int, seed: int
                        ) -> tuple[pd.DataFrame, float]:
    """``n`` fresh patients as a predictions table (manifest column names + ``score``) and the true impermissible
    PSE of the model for these very patients: the mean over the reference group (A=0) of
    score(counterfactual image with S = S_a1) - score(factual image)."""
    t = sample_structural(model, n, seed)
    j = np.random.default_rng([seed, 17]).integers(0, table.shape[0], n)
    d, s, s1 = t["D"].to_numpy(), t["S"].to_numpy(), t["S_a1"].to_numpy()
    score = table[j, d, s]
    a0 = t["A"].to_numpy() == 0
    truth = float(np.mean(table[j, d, s1][a0] - score[a0]))
    frame = pd.DataFrame({"group": t["A"], "age": t["C"], "scanner_legacy": s, "label": d, "score": score})
    return frame, truth
