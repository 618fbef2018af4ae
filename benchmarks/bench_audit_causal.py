"""Bias and 95 % coverage of the audit's estimators on structural models with known effects, each model's
identification verdict, and the time of a 100k-row audit.

    .venv/bin/python benchmarks/bench_audit_causal.py [--reps 50] [--n 2000] [--models markovian,...]
        [--timing-rows 100000]

Models (simulations/causal_models.py): ``markovian``; ``latent_a_c`` (a hidden cause of A and the covariate C);
``latent_s_image`` (a hidden cause of the scanner S and the image: site / scanner effects); ``strong_c`` (C drives
A, S, D and the score strongly); ``continuous_s`` (S continuous: only the robust estimator applies); ``latent_s_d``
(a hidden cause of S and D: a recanting district, the PSE is not identified; the audit's rows then hold the
interventional analogue, compared here with that analogue's truth, and bounds on the PSE itself for any dependence
between S and D, compared with the PSE's truth). Each replication draws ``--n`` fresh
patients; the truth comes from 1,000,000 patients' counterfactual scores.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd

from fairness.identification import identify
from fairness.pse import EstimationError, estimate_effects
from simulations.causal_models import MODELS, sample, true_effects

EXPECTED_IDENTIFIED = {"markovian": True, "latent_a_c": True, "latent_s_image": True, "strong_c": True,
                       "continuous_s": True, "latent_s_d": False}
EFFECTS = ("impermissible", "permissible", "total")


def replicate(name: str, n: int, reps: int) -> list[dict]:
    model = MODELS[name]
    spec = model.spec()
    truth = true_effects(model)
    ident = identify(spec)
    rows = []
    for r in range(reps):
        frame = sample(model, n, np.random.default_rng(1000 + r))
        try:
            eff = estimate_effects(frame, spec, n_boot=200, seed=r)
        except EstimationError as err:
            raise SystemExit(f"{name}: {err}")
        for estimator in ("robust", "weighting", "gformula"):
            for effect in EFFECTS:
                try:
                    got = eff.get(effect, "score", estimator)
                except KeyError:
                    continue
                if not math.isfinite(got["estimate"]):  # e.g. the analogue has no weighting / robust form
                    continue
                target = truth["interventional"] if (effect == "impermissible" and not ident.identified) \
                    else truth[effect]
                if effect == "permissible" and not ident.identified:
                    continue
                rows.append({"model": name, "estimator": estimator, "effect": effect, "truth": target,
                             "estimate": got["estimate"], "covered": got["ci_low"] <= target <= got["ci_high"],
                             "width": got["ci_high"] - got["ci_low"]})
        for b in eff.diagnostics.get("bounds", []):  # a recanting district: the PSE itself, bounded
            if b["outcome"] == "score":
                target = truth[b["effect"]]
                rows.append({"model": name, "estimator": "bounds", "effect": b["effect"], "truth": target,
                             "estimate": math.nan, "lower": b["lower"], "upper": b["upper"],
                             "in_bounds": b["lower"] <= target <= b["upper"],
                             "covered": b["ci_low"] <= target <= b["ci_high"], "width": b["ci_high"] - b["ci_low"]})
    return rows


def timing(rows: int) -> tuple[float, float]:
    model = MODELS["strong_c"]
    frame = sample(model, rows, np.random.default_rng(7))
    t0 = time.perf_counter()
    eff = estimate_effects(frame, model.spec(), n_boot=200, seed=0)
    return time.perf_counter() - t0, eff.diagnostics["robust"].get("seconds", math.nan)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--timing-rows", type=int, default=100_000)
    args = p.parse_args()
    print("| model | identified (expected) | estimator | effect | truth | mean estimate | bias | 95 % coverage | "
          "mean CI width |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        ident = identify(MODELS[name].spec())
        verdict = f"{ident.identified} ({EXPECTED_IDENTIFIED[name]})"
        t0 = time.perf_counter()
        df = pd.DataFrame(replicate(name, args.n, args.reps))
        for (estimator, effect), g in df.groupby(["estimator", "effect"], sort=False):
            if estimator == "bounds":
                print(f"| {name} | {verdict} | bounds | {effect} (the PSE itself) | {g.truth.iloc[0]:+.4f} | "
                      f"[{g.lower.mean():+.4f}, {g.upper.mean():+.4f}] (truth inside in {g.in_bounds.mean():.2f}) | "
                      f" | {g.covered.mean():.2f} | {g.width.mean():.4f} |")
                continue
            label = effect + (" (interventional analogue)" if effect == "impermissible" and not ident.identified
                              else "")
            print(f"| {name} | {verdict} | {estimator} | {label} | {g.truth.iloc[0]:+.4f} | {g.estimate.mean():+.4f} "
                  f"| {g.estimate.mean() - g.truth.iloc[0]:+.4f} | {g.covered.mean():.2f} | {g.width.mean():.4f} |")
        print(f"<!-- {name}: {time.perf_counter() - t0:.0f} s for {args.reps} replications -->", flush=True)
    if args.timing_rows:
        total, _ = timing(args.timing_rows)
        print(f"\naudit of {args.timing_rows} rows (strong_c, robust + weighting + g-formula, 200 bootstrap "
              f"replicates): {total:.1f} s")


if __name__ == "__main__":
    main()
