"""Bias and 95 % coverage of the federated audit when the sites' cell statistics carry privacy noise.

    .venv/bin/python benchmarks/bench_audit_federated_noise.py [--reps 400] [--sigmas 5,10] [--workers 2]

Each replication draws fresh patients from the generator's structural model (site ``north``, the score of the
fairness tests: disease, legacy scanner and age), builds the cell statistics the sites would release (layout
``stats-fairness-bins = C:40|55|70``), adds the Gaussian noise the releaser adds (std ``sigma`` per cell and
statistic, sensitivity 1) and runs ``effects_from_statistics``. Two consortia of pooled n = 2,000: one site of
2,000 patients with noise ``sigma``, and four sites of 500 each with noise ``sigma / 2`` (four independent
releases add up to ``sigma``). The target is the audit's estimand on these cells: the noiseless weighting
estimate on 200,000 patients (binning age into four cells leaves a little confounding: the same with or without
noise, so the target is the cells' estimand, not the population counterfactual effect). Reported per estimator: mean estimate
relative to the target, the replicates' standard deviation, coverage of the target by the 95 % CI.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy.special import expit
from threadpoolctl import threadpool_limits

from core_models.config import run_config_of
from fairness import load_graph_spec
from fairness.federated import CellLayout, effects_from_statistics, site_statistics, sum_statistics
from simulations.generator import causal_rates, structural_rows
from simulations.scenario import SiteSpec

SITE = SiteSpec(name="north", p_a=0.3, p_s_a0=0.1, p_s_a1=0.5, age_mean=62)
EFFECTS = ("impermissible", "permissible", "total")
ESTIMATORS = ("smoothed", "weighting", "gformula")
N_POOLED = 2000


def layout() -> CellLayout:
    return CellLayout.from_config(load_graph_spec("synthetic"),
                                  run_config_of({"stats-fairness-bins": "C:40|55|70"}).audit)


def patients(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Structural rows of ``SITE`` and a score that depends on disease, scanner and age."""
    exo = pd.DataFrame({k: rng.random(n) for k in ("u_source", "U_A", "U_S", "U_D", "u_sex")})
    exo["z_age"] = rng.standard_normal(n)
    t = structural_rows(SITE, exo, causal_rates(SITE)["base_logit"])
    eps = rng.normal(0.0, 0.5, n)
    t["score"] = expit(1.5 * t.D + 0.8 * t.S + 0.2 * (t.C - 55) / 15 - 1.0 + eps)
    return pd.DataFrame({"group": t.A, "age": t.C, "scanner_legacy": t.S, "label": t.D, "score": t.score})


def noised(stats, sigma: float, rng: np.random.Generator):
    """What the releaser sends for ``stats`` at noise std ``sigma`` (sensitivity 1 per statistic)."""
    if sigma == 0:
        return stats
    draw = lambda a: a + sigma * rng.standard_normal(a.shape)  # noqa: E731
    return replace(stats, n=draw(stats.n), score=draw(stats.score), score_sq=draw(stats.score_sq),
                   hist=None if stats.hist is None else draw(stats.hist),
                   sigma={k: sigma for k in stats.sigma})


def one(args) -> list[dict]:
    sites, sigma, rep = args
    with threadpool_limits(1):
        rng = np.random.default_rng([sites, int(sigma * 10), rep])
        lay = layout()
        parts = [noised(site_statistics(patients(N_POOLED // sites, rng), lay), sigma / math.sqrt(sites), rng)
                 for _ in range(sites)]
        table = effects_from_statistics(sum_statistics(parts), n_boot=200, seed=rep)
    rows = []
    for estimator in ESTIMATORS:
        for effect in EFFECTS:
            try:
                r = table.get(effect, "score", estimator)
            except KeyError:
                continue
            rows.append({"sites": sites, "sigma": sigma, "estimator": estimator, "effect": effect,
                         "estimate": r["estimate"], "lo": r["ci_low"], "hi": r["ci_high"]})
    return rows


def target() -> dict[str, float]:
    with threadpool_limits(1):
        table = effects_from_statistics(site_statistics(patients(200_000, np.random.default_rng(7)), layout()),
                                        n_boot=20, seed=0)
    return {e: table.estimate(e, "score", estimator="weighting") for e in EFFECTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--sigmas", default="5,10")
    ap.add_argument("--sites", default="1,4")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    truth = target()
    jobs = [(int(s), float(sg), r) for s in args.sites.split(",") for sg in args.sigmas.split(",")
            for r in range(args.reps)]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = [row for chunk in pool.map(one, jobs, chunksize=8) for row in chunk]
    df = pd.DataFrame(rows)
    df["truth"] = df.effect.map(truth)
    df["covered"] = (df.lo <= df.truth) & (df.truth <= df.hi)
    summary = df.groupby(["sites", "sigma", "estimator", "effect"], sort=False).agg(
        truth=("truth", "first"), mean=("estimate", "mean"), sd=("estimate", "std"), coverage=("covered", "mean"),
        width=("hi", "mean"), reps=("estimate", "size"))
    summary["width"] -= df.groupby(["sites", "sigma", "estimator", "effect"], sort=False).lo.mean()
    summary["rel_bias_%"] = 100 * (summary["mean"] / summary["truth"] - 1)
    print("target (noiseless weighting, 200k patients): " + ", ".join(f"{k} {v:+.4f}" for k, v in truth.items()))
    print(summary.round(4).to_string())


if __name__ == "__main__":
    main()
