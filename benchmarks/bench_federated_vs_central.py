"""Federated simulation wall time vs centralised training of the same model on the pooled
data for the same number of optimizer steps, measured side by side in one run.

    .venv/bin/python benchmarks/bench_federated_vs_central.py [--rounds 5] [--local-epochs 20] [--site-evaluation]

Federated: `equifed-simulate` on the default 4-hospital scenario (own SuperLink, Ray,
1 CPU per client, 2 clients at a time on 2 cores), timed from the command's start to its
end, and the ServerApp's own time (strategy start to finish, without SuperLink/Ray start).
Centralised: the same network, optimizer and batch size on the union of the sites' train
splits (2 threads), the same total number of optimizer steps, and the same holdout
evaluation after every round's worth of steps. Centralised runs before and after the
federated run; the ratio uses their mean.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from client.site import open_site
from core_models.data import load_site
from core_models.networks import build_model
from core_models.training import evaluate, make_loader, train_epochs
from simulations.generator import generate_consortium, load_consortium
from simulations.run import DEFAULT_SCENARIO
from simulations.run import main as simulate

BATCH, LR, SEED, SIZE = 16, 0.002, 0, 64


def central(sites: list[Path], holdout: Path, rounds: int, local_epochs: int) -> tuple[float, int, float]:
    torch.set_num_threads(2)
    parts = [open_site(s, SIZE, SEED).part("train") for s in sites]
    fed_steps = rounds * local_epochs * sum(math.ceil(len(y) / BATCH) for _, y in parts)
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    hold = load_site(holdout, SIZE)
    hold_loader = make_loader(hold.images, hold.labels, 256)
    torch.manual_seed(SEED)
    model = build_model("cnn")
    steps_per_round = fed_steps // rounds
    rng = np.random.default_rng(SEED)
    done, start = 0, time.perf_counter()
    for _ in range(rounds):
        # epoch-style sampling (concatenated permutations), exactly steps_per_round batches
        need = steps_per_round * BATCH
        idx = np.concatenate([rng.permutation(len(y)) for _ in range(need // len(y) + 1)])[:need]
        loader = make_loader(x[idx], y[idx], BATCH)
        done += int(train_epochs(model, loader, epochs=1, optimizer="adam", lr=LR, weight_decay=1e-4)["steps"])
        auc = evaluate(model, hold_loader)["auroc"]
    return time.perf_counter() - start, done, auc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--site-evaluation", action="store_true",
                        help="also let every site score the global model each round (the demo does; centralised has no equivalent)")
    parser.add_argument("--work", default=None, help="folder for data and the run (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="equifed-bench-"))
    generate_consortium(DEFAULT_SCENARIO, work / "data")
    sites, holdout = load_consortium(work / "data")

    t_c1, steps, auc_c1 = central(sites, holdout, args.rounds, args.local_epochs)
    start = time.perf_counter()
    code = simulate([str(DEFAULT_SCENARIO), "--out", str(work / "fed"), "--rounds", str(args.rounds),
                     "-c", f"local-epochs={args.local_epochs}",
                     "-c", f"fraction-evaluate={1.0 if args.site_evaluation else 0.0}"])
    t_fed = time.perf_counter() - start
    if code != 0:
        raise SystemExit("federated run failed")
    summary = json.loads((work / "fed" / "summary.json").read_text())
    t_c2, _, auc_c2 = central(sites, holdout, args.rounds, args.local_epochs)
    t_c = (t_c1 + t_c2) / 2

    print(f"\nworkload: default scenario, {args.rounds} rounds x {args.local_epochs} local epochs, "
          f"site evaluation {'on' if args.site_evaluation else 'off'}, "
          f"{steps} optimizer steps in total, batch {BATCH}, {SIZE}px")
    print(f"{'':34}{'wall s':>9}{'holdout AUROC':>15}")
    print(f"{'centralised (run 1)':34}{t_c1:9.1f}{auc_c1:15.3f}")
    print(f"{'centralised (run 2)':34}{t_c2:9.1f}{auc_c2:15.3f}")
    print(f"{'federated, whole command':34}{t_fed:9.1f}{summary['final_holdout_auroc']:15.3f}")
    print(f"{'federated, ServerApp only':34}{summary['wall_time_s']:9.1f}")
    print(f"ratio federated/centralised, whole command : {t_fed / t_c:.2f}")
    print(f"ratio federated/centralised, ServerApp only: {summary['wall_time_s'] / t_c:.2f}")


if __name__ == "__main__":
    main()
