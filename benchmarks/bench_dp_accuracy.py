"""Global holdout AUROC of the default 4-hospital federation under local DP-SGD, per method and epsilon.

    .venv/bin/python benchmarks/bench_dp_accuracy.py [--rounds 5] [--epsilons inf,8,3,1]
        [--methods scratch,transfer] [--pretrain-scenario label_skew] [--pretrain-rounds 8] [-c KEY=VALUE ...]

Methods:
* `scratch`: the network trained end to end from random weights (under DP its stem stays frozen).
* `transfer`: first a model is trained without DP on a *different* synthetic scenario (`--pretrain-scenario`,
  standing in for public data; trained once per invocation), then the default federation starts from it with
  `freeze=encoder`: each site trains only the linear head, under DP-SGD when epsilon is finite.
* `transfer-full`: the same checkpoint, every layer but the stem fine-tuned (the DP default otherwise).
* `scatter`: fixed wavelet scattering features (`model=scatter`: kymatio's Scattering2D, no parameters, no
  privacy cost) and a small CNN on them, trained end to end under DP-SGD (Tramer & Boneh 2021).
* `ssl`: a federated self-supervised run on the default federation's own images (`--ssl-task`, `--ssl-rounds`),
  then the head trained on its encoder (`freeze=encoder`) on the same sites. Under DP both runs are DP-SGD on the
  same ledgers: the pretext run gets `--ssl-share` of epsilon, the head the rest.

`-c` overrides the run config of every run of the default scenario (e.g. `-c learning-rate=0.05`).
`--method-config METHOD:KEY=VALUE` overrides one method's runs only.

Each (method, epsilon) runs `equifed-simulate` in its own folder (fresh data, so fresh privacy ledgers),
delta = 1e-5. The table shows the epsilon each site's ledger holds at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from simulations.run import DEFAULT_SCENARIO
from simulations.run import main as simulate

SCENARIOS = DEFAULT_SCENARIO.parent
METHODS = {
    "scratch": [],
    "transfer": ["-c", "freeze=encoder"],
    "transfer-full": [],
    "ssl": ["-c", "freeze=encoder"],
    "scatter": ["-c", "model=scatter"],
}


def _pretrain(work: Path, scenario: str, rounds: int) -> Path:
    """A model trained without DP on another scenario: the stand-in for a public checkpoint."""
    out = work / "pretrain"
    if not (out / "final_model.pt").exists():
        code = simulate([str(SCENARIOS / f"{scenario}.toml"), "--out", str(out), "--rounds", str(rounds)])
        if code != 0:
            raise SystemExit(f"pretraining on {scenario} failed; see {out}/flower.log")
    return out / "final_model.pt"


def _ssl_encoder(out: Path, args, eps: float) -> Path:
    """The federated pretext run on the default scenario (under DP with its share of epsilon): its encoder."""
    dp = [] if math.isinf(eps) else ["-c", "dp=true", "-c", f"target-epsilon={eps * args.ssl_share}",
                                     "-c", "target-delta=1e-5"]
    code = simulate([str(DEFAULT_SCENARIO), "--out", str(out), "--rounds", str(args.ssl_rounds),
                     "-c", f"pretext={args.ssl_task}", *dp])
    if code != 0:
        raise SystemExit(f"the pretext run failed; see {out}/flower.log")
    return out / "final_model.pt"


def _method_config(items: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for item in items:
        method, _, setting = item.partition(":")
        extra.setdefault(method, []).extend(["-c", setting])
    return extra


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--methods", default="scratch,transfer")
    parser.add_argument("--pretrain-scenario", default="label_skew")
    parser.add_argument("--pretrain-rounds", type=int, default=8)
    parser.add_argument("--ssl-task", default="rotation")
    parser.add_argument("--ssl-rounds", type=int, default=5)
    parser.add_argument("--ssl-share", type=float, default=0.5, help="share of epsilon the pretext run spends")
    parser.add_argument("--work", default=None)
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--method-config", action="append", default=[], metavar="METHOD:KEY=VALUE")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="equifed-dp-acc-"))
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {sorted(METHODS)}")
    per_method = _method_config(args.method_config)
    checkpoint = None
    if any(m.startswith("transfer") for m in methods):
        start = time.perf_counter()
        checkpoint = _pretrain(work, args.pretrain_scenario, args.pretrain_rounds)
        print(f"pretrained on {args.pretrain_scenario} in {time.perf_counter() - start:.0f} s: {checkpoint}")
    rows = []
    for method in methods:
        for text in args.epsilons.split(","):
            eps = float(text)
            out = work / f"{method}_eps_{text}"
            shutil.rmtree(out, ignore_errors=True)  # fresh data: a ledger from an earlier run would be spent
            share = args.ssl_share if method == "ssl" else 0.0
            extra = [] if math.isinf(eps) else ["-c", "dp=true", "-c", f"target-epsilon={eps * (1 - share)}",
                                                "-c", "target-delta=1e-5"]
            source = [str(DEFAULT_SCENARIO)]
            start = time.perf_counter()
            if method == "ssl":
                pretext = _ssl_encoder(out / "pretext", args, eps)
                source = ["--sites", str(out / "pretext" / "data")]
                extra += ["-c", f"pretrained-path={pretext}"]
                out = out / "head"
            if method.startswith("transfer"):
                extra += ["-c", f"pretrained-path={checkpoint}"]
            extra += METHODS[method] + per_method.get(method, [])
            for item in args.run_config:
                extra += ["-c", item]
            code = simulate([*source, "--out", str(out), "--rounds", str(args.rounds), *extra])
            wall = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"{method} at epsilon={text} failed; see {out}/flower.log")
            summary = json.loads((out / "summary.json").read_text())
            per_site = pd.read_csv(out / "per_site.csv")
            spent = per_site[per_site["phase"] == "train"].groupby("site")["epsilon"].max()
            start_auc = pd.read_csv(out / "metrics.csv").set_index("round").loc[0, "holdout_auroc"]
            rows.append((method, text, start_auc, summary["final_holdout_auroc"], spent, wall))
            print(f"{method} eps={text}: holdout AUROC {summary['final_holdout_auroc']:.3f} ({wall:.0f} s)",
                  flush=True)
    print(f"\ndefault scenario, {args.rounds} rounds, delta = 1e-5, overrides: {args.run_config or 'none'}"
          f" {args.method_config or ''}")
    sites = sorted(rows[0][4].index)
    print(f"| method | target eps | holdout AUROC round 0 -> final | {' | '.join(f'eps {s}' for s in sites)}"
          " | wall s |")
    print("|---|---|---|" + "---|" * len(sites) + "---|")
    for method, text, start_auc, auc, spent, wall in rows:
        cells = " | ".join(f"{spent.get(s, math.nan):.2f}" for s in sites)
        print(f"| {method} | {text} | {start_auc:.3f} -> {auc:.3f} | {cells} | {wall:.0f} |")


if __name__ == "__main__":
    main()
