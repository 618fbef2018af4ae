"""DP-SGD against plain training of the 3-D networks (volumes), at the physical batch a CPU site can hold.

    .venv/bin/python benchmarks/bench_volume.py [--reps 7] [--sides 32 64] [--models cnn resnet] [--no-rss]

A step is one logical batch of `--logical` volumes (8; 1 x S^3 voxels, 2 classes) in physical batches of
`--physical` (2), through the loops the sites run:

* plain: `core_models.training.train_steps` with `accumulation = logical / physical` (gradient accumulation to
  the logical batch), Adam;
* DP: as `client.dp.train_dp` takes a step: `prepare_for_dp` (frozen stem, no summed conv gradients),
  `PrivacyEngine.make_private` (hooks, sigma 1, clip 1, noise from OS entropy), `NonfiniteGuard`, and
  `BatchMemoryManager` cutting the logical batch into physical ones, through the same `train_steps`.

1. Step time: one process builds both trainers per (network, side) on the same initial weights and the same
   volumes, one thread, and alternates them (plain, DP, DP, plain, ...) for `--reps` rounds after a warm-up;
   ratio DP / plain (target <= 1.5) of the medians of wall and process CPU time, and of the fastest CPU times
   ("x min": what load from other processes on the machine adds to both is noise, never less).
2. Peak RSS (VmHWM): every (network, side, mode) in its own fresh subprocess (a process's peak cannot be taken
   back), which imports the same modules, builds the model and the volumes and takes 3 logical steps; baseline =
   the same process without a step. Runs alternate between the modes, 3 each, medians; ratio DP / plain of the
   peak (target <= 1.5) and of the increment over the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import NonfiniteGuard, os_entropy_generator
from core_models.networks import build_model, prepare_for_dp
from core_models.training import train_steps

LR, SIGMA, CLIP = 2e-3, 1.0, 1.0
# Opacus' notes on secure_mode (the noise comes from OS entropy here, as at the sites) and on backward hooks firing
# with a frozen stem: expected, and printed once per trainer
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
CPU = torch.device("cpu")


def volumes(n: int, side: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, side, side, side, generator=g), torch.randint(0, 2, (n,), generator=g))


class Trainer:
    """One logical step of `logical` volumes in physical batches of `physical`, plain or DP-SGD."""

    def __init__(self, name: str, side: int, dp: bool, logical: int, physical: int) -> None:
        if logical % physical:
            raise ValueError("--logical must be a multiple of --physical")
        torch.manual_seed(0)
        self.model, self.dp, self.logical, self.physical = build_model(name, 2, 1, dims=3), dp, logical, physical
        self.data = volumes(logical, side)
        if dp:
            prepare_for_dp(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=LR)
        if not dp:
            self.module, self.opt = self.model, opt
            self.loader = DataLoader(self.data, batch_size=physical)
            return
        # the loader sets Opacus' sample rate and is what BatchMemoryManager cuts: one logical batch, fixed size
        self.module, self.opt, self.loader = PrivacyEngine(accountant="rdp").make_private(
            module=self.model, optimizer=opt, data_loader=DataLoader(self.data, batch_size=logical),
            noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False,
            noise_generator=os_entropy_generator(CPU))
        self.opt.expected_batch_size = logical
        NonfiniteGuard(self.opt)

    def step(self) -> None:
        if not self.dp:
            train_steps(self.module, self.loader, self.opt, CPU, accumulation=self.logical // self.physical)
            return
        with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.physical,
                                optimizer=self.opt) as batches:
            train_steps(self.module, batches, self.opt, CPU)


def time_pair(name: str, side: int, reps: int, logical: int, physical: int) -> dict[str, float]:
    trainers = {"plain": Trainer(name, side, False, logical, physical), "dp": Trainer(name, side, True, logical,
                                                                                      physical)}
    for t in trainers.values():
        t.step()
    wall: dict[str, list[float]] = {k: [] for k in trainers}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    for r in range(reps):
        for k in (("plain", "dp") if r % 2 == 0 else ("dp", "plain")):
            w0, c0 = time.perf_counter(), time.process_time()
            trainers[k].step()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    out = {f"{k}_wall_s": statistics.median(v) for k, v in wall.items()}
    out |= {f"{k}_cpu_s": statistics.median(v) for k, v in cpu.items()}
    out["x_wall"] = out["dp_wall_s"] / out["plain_wall_s"]
    out["x_cpu"] = out["dp_cpu_s"] / out["plain_cpu_s"]
    out["x_cpu_min"] = min(cpu["dp"]) / min(cpu["plain"])
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; not ru_maxrss, which a child inherits from a big parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(name: str, side: int, mode: str, logical: int, physical: int) -> None:
    torch.set_num_threads(1)
    trainer = Trainer(name, side, mode == "dp", logical, physical)
    if mode != "baseline":
        for _ in range(3):
            trainer.step()
    print(json.dumps({"peak_mb": peak_rss_mb()}))


def peak_rss(name: str, side: int, reps: int, logical: int, physical: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {"baseline": [], "plain": [], "dp": []}
    for r in range(reps):
        for mode in (("baseline", "plain", "dp") if r % 2 == 0 else ("dp", "plain", "baseline")):
            out = subprocess.run([sys.executable, __file__, "--rss-child", name, str(side), mode, "--logical",
                                  str(logical), "--physical", str(physical)], capture_output=True, text=True,
                                 check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {**{f"{k}_mb": v for k, v in med.items()}, "x_peak": med["dp"] / med["plain"],
            "x_increment": (med["dp"] - med["baseline"]) / max(med["plain"] - med["baseline"], 1e-9)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rss-reps", type=int, default=3)
    p.add_argument("--sides", type=int, nargs="+", default=[32, 64])
    p.add_argument("--models", nargs="+", default=["cnn", "resnet"])
    p.add_argument("--logical", type=int, default=8)
    p.add_argument("--physical", type=int, default=2)
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--rss-child", nargs=3, metavar=("MODEL", "SIDE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        name, side, mode = args.rss_child
        rss_child(name, int(side), mode, args.logical, args.physical)
        return
    torch.set_num_threads(1)
    print(f"3-D networks, 1 thread, logical batch {args.logical} volumes in physical batches of {args.physical}; "
          f"step time: median of {args.reps} interleaved logical steps; peak RSS: medians of {args.rss_reps} "
          f"fresh subprocesses per mode")
    head = (f"{'network':8s} {'side':>5s} | {'plain s':>8s} {'DP s':>8s} {'x wall':>7s} {'x cpu':>6s} {'x min':>6s}"
            + ("" if args.no_rss else f" | {'base MiB':>8s} {'plain MiB':>9s} {'DP MiB':>8s} {'x peak':>7s} "
                                      f"{'x incr.':>7s}"))
    print(head)
    print("-" * len(head))
    results = {}
    for name in args.models:
        for side in args.sides:
            row = time_pair(name, side, args.reps, args.logical, args.physical)
            line = (f"{name:8s} {side:>4d}^3 | {row['plain_wall_s']:8.3f} {row['dp_wall_s']:8.3f} "
                    f"{row['x_wall']:7.2f} {row['x_cpu']:6.2f} {row['x_cpu_min']:6.2f}")
            if not args.no_rss:
                row |= peak_rss(name, side, args.rss_reps, args.logical, args.physical)
                line += (f" | {row['baseline_mb']:8.0f} {row['plain_mb']:9.0f} {row['dp_mb']:8.0f} "
                         f"{row['x_peak']:7.2f} {row['x_increment']:7.2f}")
            print(line, flush=True)
            results[f"{name}@{side}"] = row
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
