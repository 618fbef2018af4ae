"""Global holdout AUROC of the default 4-hospital federation at epsilon = inf, 8, 3, 1.

    .venv/bin/python benchmarks/bench_dp_accuracy.py [--rounds 5] [--epsilons inf,8,3,1] [-c KEY=VALUE ...]

`-c` overrides the run config of every run (e.g. the DP-friendly optimiser settings
`-c optimizer=sgd -c learning-rate=0.2 -c batch-size=64`: logical batch 64 through the
default physical batch of 16).

Each epsilon runs `equifed-simulate` on the default scenario in its own folder (fresh
data, so fresh privacy ledgers), delta = 1e-5, otherwise the default run config.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from simulations.run import DEFAULT_SCENARIO
from simulations.run import main as simulate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--work", default=None)
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="equifed-dp-acc-"))
    rows = []
    for text in args.epsilons.split(","):
        eps = float(text)
        out = work / f"eps_{text}"
        extra = [] if math.isinf(eps) else ["-c", "dp=true", "-c", f"target-epsilon={eps}", "-c", "target-delta=1e-5"]
        for item in args.run_config:
            extra += ["-c", item]
        start = time.perf_counter()
        code = simulate([str(DEFAULT_SCENARIO), "--out", str(out), "--rounds", str(args.rounds), *extra])
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"run at epsilon={text} failed; see {out}/flower.log")
        summary = json.loads((out / "summary.json").read_text())
        import pandas as pd

        per_site = pd.read_csv(out / "per_site.csv")
        spent = per_site[per_site["phase"] == "train"].groupby("site")["epsilon"].max()
        rows.append((text, summary["final_holdout_auroc"], spent.max(), wall))
    print(f"\ndefault scenario, {args.rounds} rounds, delta = 1e-5, run config overrides: {args.run_config or 'none'}")
    print(f"{'target eps':>10} {'holdout AUROC':>14} {'max site eps':>13} {'wall s':>8}")
    for text, auc, spent, wall in rows:
        print(f"{text:>10} {auc:14.3f} {spent:13.2f} {wall:8.0f}")


if __name__ == "__main__":
    main()
