"""DP-SGD (Opacus 1.6) cost against plain training of the same network, measured side by side.

    .venv/bin/python benchmarks/bench_dp.py [--rounds 20] [--accuracy] [--no-rss]

1. Step time. One process builds every configuration (same initial weights, same fixed batch
   of 1x64x64 images, 2 classes) and times them interleaved: each round runs one training
   step (forward, loss, backward, optimizer step, zero_grad) of every configuration, in a
   rotating order, and the table gives the median over the rounds. Non-DP is the network with
   plain Adam (lr 2e-3, as the app uses); DP is `PrivacyEngine(accountant="rdp").make_private(
   ..., noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=...)`.
   A DP step here is fed exactly B images (Poisson sampling varies the size around B), so both
   sides do the same work. "stock" rows run Opacus' own conv grad sampler (the model's
   `DPConv2d` layers are switched to plain `nn.Conv2d`); the other DP rows use the model as
   built plus `prepare_for_dp` where named (core_models/networks.py). With one thread
   (each simulated client's setting) the ratio is also given on process CPU time, which other
   jobs on the machine disturb far less than wall time. "head only" rows train the linear head
   on a frozen encoder (`freeze=encoder`, DP on fixed features), against the non-DP step of the
   same frozen model. "DP as the client trains" rows also run `client.dp.NonfiniteGuard` (a sample with a
   non-finite per-sample gradient gets a zero one; one `isfinite` per parameter per step), as `train_dp` does;
   "(no guard)" is the same step without it, side by side. Then 2 threads (wall time).
2. Peak RSS, each configuration in its own fresh subprocess, 3 times alternately, medians of
   the peak resident set (VmHWM; `peak_rss_mb` says why not ru_maxrss): a process that only
   imports torch+opacus and builds the model and the data (baseline), non-DP training at
   batch 32, and DP training with logical batch 256 in physical batches of 32
   (`BatchMemoryManager`), also 16 and 64.
3. `--accuracy`: holdout AUROC after 3 epochs on the pooled default consortium (generated in
   a temporary folder), old layout (`SmallCNN(stem_stride=1)`) vs the new default, 3 seeds,
   non-DP and DP (sigma 1.0, clip 1.0, batch 16), a few more minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import core_models.grad_samplers  # noqa: F401  (registers DPConv2d with Opacus, also for variants without prepare_for_dp)
from core_models.networks import DPConv2d, SmallCNN, build_model, prepare_for_dp
from core_models.pretrained import freeze

SIZE, LR, SIGMA, CLIP, TARGET = 64, 2e-3, 1.0, 1.0, 1.3
warnings.filterwarnings("ignore", module="opacus")  # secure-RNG and poisson/hooks notices
warnings.filterwarnings("ignore", message=".*full backward hook.*")


# ------------------------------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Config:
    label: str
    mode: str | None = None  # Opacus grad_sample_mode; None = non-DP
    stock: bool = False  # Opacus' own conv grad sampler (DPConv2d -> nn.Conv2d)
    prepare: dict | None = None  # kwargs of prepare_for_dp
    stem_stride: int = 2  # 1 = the earlier layout
    freeze_stem: bool = False  # non-DP only
    os_noise: bool = False  # the noise from an OS-entropy-seeded generator, as client.dp trains
    freeze: str = "none"  # core_models.pretrained.freeze: "encoder" = only the head trains (DP on fixed features)
    guard: bool = False  # client.dp.NonfiniteGuard on the DP optimizer (zeroes non-finite per-sample gradients)


NONDP = Config("non-DP, Adam")
STOCK_HOOKS = Config("DP hooks, stock Opacus", "hooks", stock=True)
RECOMMENDED = Config("DP hooks + prepare_for_dp (recommended)", "hooks", prepare={})
NONDP_FROZEN = Config("non-DP, stem frozen", freeze_stem=True)
SKIP_ONLY = Config("DP hooks + skip summed grads", "hooks", prepare={"freeze_stem": False})
CLIENT = Config("DP as the client trains (OS noise, guard)", "hooks", prepare={}, os_noise=True, guard=True)
CLIENT_NO_GUARD = Config("DP as the client trained (no guard)", "hooks", prepare={}, os_noise=True)
NONDP_HEAD = Config("head only: non-DP", freeze="encoder")
CLIENT_HEAD = Config("head only: DP as the client trains", "hooks", prepare={}, os_noise=True, freeze="encoder",
                     guard=True)
MAIN = [
    NONDP,
    NONDP_FROZEN,
    STOCK_HOOKS,
    Config("DP ew, stock", "ew", stock=True),
    Config("DP functorch, stock", "functorch", stock=True),
    Config("DP ghost, stock", "ghost", stock=True),
    Config("DP hooks, DPConv2d sampler", "hooks"),
    SKIP_ONLY,
    Config("DP hooks + freeze stem", "hooks", prepare={"skip_summed_grads": False}),
    RECOMMENDED,
    CLIENT,
    CLIENT_NO_GUARD,
    Config("old layout: non-DP", stem_stride=1),
    Config("old layout: DP hooks, stock", "hooks", stock=True, stem_stride=1),
    Config("old layout: DP hooks + prepare_for_dp", "hooks", prepare={}, stem_stride=1),
    NONDP_HEAD,
    CLIENT_HEAD,
]
SUBSET = [NONDP, STOCK_HOOKS, RECOMMENDED, CLIENT, CLIENT_NO_GUARD, NONDP_HEAD, CLIENT_HEAD]


def make_model(cfg: Config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("cnn") if cfg.stem_stride == 2 else SmallCNN(num_classes=2, stem_stride=cfg.stem_stride)
    if cfg.stock:
        for m in model.modules():
            if type(m) is DPConv2d:
                m.__class__ = nn.Conv2d  # same parameters; Opacus then uses its own conv grad sampler
    if cfg.prepare is not None:
        prepare_for_dp(model, **cfg.prepare)
    if cfg.freeze_stem:
        for p in model.stem.parameters():
            p.requires_grad_(False)
    if cfg.freeze != "none":
        freeze(model, cfg.freeze)
    return model


def make_private(cfg: Config, model: nn.Module, loader: DataLoader):
    """(module, optimizer, criterion, loader) after Opacus' make_private, or the plain ones."""
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    if cfg.mode is None:
        return model, opt, criterion, loader
    engine = PrivacyEngine(accountant="rdp")
    kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
              poisson_sampling=True, grad_sample_mode=cfg.mode)
    if cfg.os_noise:
        from client.dp import os_entropy_generator

        kw["noise_generator"] = os_entropy_generator("cpu")
    if cfg.mode == "ghost":
        module, opt, criterion, loader = engine.make_private(criterion=criterion, **kw)
    else:
        module, opt, loader = engine.make_private(**kw)
    if cfg.guard:
        from client.dp import NonfiniteGuard

        NonfiniteGuard(opt)
    return module, opt, criterion, loader


class Trainer:
    def __init__(self, cfg: Config, batch: int):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(batch, 1, SIZE, SIZE, generator=g)
        self.y = torch.randint(0, 2, (batch,), generator=g)
        # the loader only sets Opacus' sample rate (batch / 1024); steps use the fixed batch
        data = TensorDataset(torch.rand(1024, 1, SIZE, SIZE, generator=g), torch.randint(0, 2, (1024,), generator=g))
        self.module, self.opt, self.criterion, _ = make_private(cfg, make_model(cfg), DataLoader(data, batch))

    def step(self) -> None:
        loss = self.criterion(self.module(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()


def time_configs(configs: list[Config], batch: int, rounds: int) -> dict[str, dict[str, float]]:
    trainers = [Trainer(c, batch) for c in configs]
    for t in trainers:
        for _ in range(3):
            t.step()
    wall: list[list[float]] = [[] for _ in configs]
    cpu: list[list[float]] = [[] for _ in configs]
    for r in range(rounds):
        for k in range(len(configs)):
            i = (k + r) % len(configs)  # rotate so that no configuration always follows the same one
            w0, c0 = time.perf_counter(), time.process_time()
            trainers[i].step()
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
    return {c.label: {"wall": 1e3 * statistics.median(w), "cpu": 1e3 * statistics.median(p)}
            for c, w, p in zip(configs, wall, cpu)}


def baseline_of(cfg: Config) -> str:
    if cfg.freeze == "encoder":
        return NONDP_HEAD.label
    return "old layout: non-DP" if cfg.stem_stride == 1 else NONDP.label


def print_table(title: str, configs: list[Config], results: dict[int, dict], with_cpu: bool) -> None:
    batches = list(results)
    print(f"\n{title}")
    head = f"{'configuration':46s}" + "".join(
        f" | B={b:<3d} {'ms':>6s} {'x wall':>6s}" + (f" {'x cpu':>6s}" if with_cpu else "") for b in batches)
    print(head)
    print("-" * len(head))
    for c in configs:
        row = f"{c.label:46s}"
        for b in batches:
            res, base = results[b][c.label], results[b][baseline_of(c)]
            row += f" | {'':5s} {res['wall']:6.1f} {res['wall'] / base['wall']:6.2f}"
            if with_cpu:
                row += f" {res['cpu'] / base['cpu']:6.2f}"
        print(row)


def step_times(rounds: int) -> dict:
    out = {}
    torch.set_num_threads(1)
    res1 = {b: time_configs(MAIN, b, rounds) for b in (16, 32, 64)}
    print_table(f"Step time, 1 thread, median of {rounds} interleaved steps (x = DP / non-DP of the same layout; "
                "'x cpu' on process CPU time)", MAIN, res1, with_cpu=True)
    torch.set_num_threads(2)
    res2 = {b: time_configs(SUBSET, b, rounds) for b in (16, 32, 64)}
    print_table("Step time, 2 threads (wall)", SUBSET, res2, with_cpu=False)
    torch.set_num_threads(1)
    out.update(one_thread=res1, two_threads=res2)
    return out


# ------------------------------------------------------------------------------------------------------ peak RSS

RSS_CONFIGS = {
    "baseline (import, model, data)": None,
    "non-DP, batch 32": dict(dp=False),
    "DP stock hooks, 256 via 32": dict(dp=True, stock=True),
    "DP + prepare_for_dp, 256 via 32": dict(dp=True),
    "DP + prepare_for_dp, 256 via 16": dict(dp=True, physical=16),
    "DP + prepare_for_dp, 256 via 64": dict(dp=True, physical=64),
}
RSS_N, RSS_LOGICAL, RSS_PHYSICAL, RSS_NONDP_BATCH = 1024, 256, 32, 32


def rss_child(name: str) -> None:
    spec = RSS_CONFIGS[name]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(RSS_N, 1, SIZE, SIZE, generator=g), torch.randint(0, 2, (RSS_N,), generator=g))
    cfg = Config("rss", "hooks" if spec and spec["dp"] else None, stock=bool(spec and spec.get("stock")),
                 prepare={} if spec and spec["dp"] and not spec.get("stock") else None)
    model = make_model(cfg)
    steps = 0
    if spec is not None:
        batch = RSS_LOGICAL if spec["dp"] else RSS_NONDP_BATCH
        module, opt, criterion, loader = make_private(cfg, model, DataLoader(data, batch, shuffle=True))
        if spec["dp"]:
            physical = spec.get("physical", RSS_PHYSICAL)
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt) as batches:
                for x, y in batches:  # one epoch: ~RSS_N / RSS_LOGICAL logical (noised) steps
                    if len(y) == 0:
                        continue
                    criterion(module(x), y).backward()
                    opt.step()
                    opt.zero_grad()
                    steps += 1
        else:
            for x, y in loader:
                criterion(module(x), y).backward()
                opt.step()
                opt.zero_grad()
                steps += 1
    print(json.dumps({"peak_mb": peak_rss_mb(), "steps": steps}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's peak over
    fork/vfork + exec into the child's ru_maxrss, so a child of a big parent reports the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(reps: int = 3) -> dict:
    runs: dict[str, list[float]] = {k: [] for k in RSS_CONFIGS}
    for _ in range(reps):
        for name in RSS_CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--rss-child", name], capture_output=True, text=True,
                                 check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["baseline (import, model, data)"]
    ref = med["non-DP, batch 32"]
    print(f"\nPeak RSS (MiB, VmHWM), one fresh subprocess per run, {reps} runs each alternately, medians; "
          f"data {RSS_N} images of 1x{SIZE}x{SIZE}, 1 thread, one epoch")
    head = f"{'configuration':44s} {'peak':>8s} {'runs':>22s} {'- baseline':>11s} {'x non-DP':>9s} {'x incr.':>8s}"
    print(head)
    print("-" * len(head))
    for name, v in runs.items():
        incr = med[name] - base
        ratios = "" if name.startswith("baseline") else f" {med[name] / ref:9.2f} {incr / (ref - base):8.2f}"
        print(f"{name:44s} {med[name]:8.0f} {' '.join(f'{x:.0f}' for x in v):>22s} {incr:11.0f}{ratios}")
    return {"runs": runs, "median": med}


# ------------------------------------------------------------------------------------------------------ accuracy


def accuracy(seeds=(0, 1, 2), epochs: int = 3) -> dict:
    from core_models.data import load_site
    from core_models.training import evaluate, make_loader, train_epochs
    from simulations.generator import generate_consortium

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sites = generate_consortium("default", Path(tmp) / "consortium")
        parts = [load_site(s, SIZE) for s in sites]
        hold = load_site(sites[0].parent / "holdout", SIZE)
    x = np.concatenate([p.images for p in parts])
    y = np.concatenate([p.labels for p in parts])
    hold_loader = make_loader(hold.images, hold.labels, 256)
    rows = {
        "old layout (stem_stride=1), non-DP": Config("", stem_stride=1),
        "new default, non-DP": Config(""),
        "new default, stem frozen, non-DP": Config("", freeze_stem=True),
        "old layout, DP stock hooks": Config("", "hooks", stock=True, stem_stride=1),
        "new default, DP stock hooks": Config("", "hooks", stock=True),
        "new default, DP + prepare_for_dp": Config("", "hooks", prepare={}),
    }
    print(f"\nHoldout AUROC after {epochs} epochs on the pooled default consortium ({len(y)} train images, "
          f"{len(hold.labels)} holdout), Adam lr {LR} batch 16; DP: sigma {SIGMA}, clip {CLIP}, Poisson q=16/{len(y)}")
    out = {}
    for label, cfg in rows.items():
        aucs, t0 = [], time.perf_counter()
        for seed in seeds:
            model = make_model(cfg, seed)
            loader = make_loader(x, y, 16, shuffle=True, seed=seed)
            if cfg.mode is None:
                train_epochs(model, loader, epochs=epochs, optimizer="adam", lr=LR, weight_decay=1e-4)
            else:
                module, opt, criterion, ploader = make_private(cfg, model, loader)
                for _ in range(epochs):
                    for xb, yb in ploader:
                        if len(yb) == 0:
                            continue
                        criterion(module(xb), yb).backward()
                        opt.step()
                        opt.zero_grad()
            aucs.append(evaluate(model, hold_loader)["auroc"])
        out[label] = aucs
        print(f"{label:40s} AUROC " + " ".join(f"{a:.3f}" for a in aucs)
              + f"  mean {np.mean(aucs):.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved timed steps per configuration")
    ap.add_argument("--accuracy", action="store_true", help="also train old and new layout 3 epochs (+~4 min)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--no-steps", action="store_true", help="skip the step-time tables")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, opacus {__import__('opacus').__version__}, "
          f"default model {sum(p.numel() for p in build_model('cnn').parameters())} parameters, input 1x{SIZE}x{SIZE}")
    if not args.no_steps:
        res = step_times(args.rounds)
        for threads, table in (("1 thread", res["one_thread"]), ("2 threads", res["two_threads"])):
            b16 = table[16]
            print(f"\nDP / non-DP step time, default model, batch 16, {threads} (target <= {TARGET}):")
            pairs = [(STOCK_HOOKS, NONDP), (SKIP_ONLY, NONDP), (RECOMMENDED, NONDP), (RECOMMENDED, NONDP_FROZEN),
                     (CLIENT_NO_GUARD, NONDP), (CLIENT, NONDP)]
            for cfg, ref in pairs:
                if cfg.label not in b16 or ref.label not in b16:
                    continue
                w = b16[cfg.label]["wall"] / b16[ref.label]["wall"]
                c = b16[cfg.label]["cpu"] / b16[ref.label]["cpu"]
                cpu = f", {c:.2f}x cpu" if threads == "1 thread" else ""
                met = "MET" if (w if threads != "1 thread" else max(w, c)) <= TARGET else "not met"
                print(f"  {cfg.label:40s} / {ref.label:20s} {w:.2f}x wall{cpu}  {met}")
    if not args.no_rss:
        rss = peak_rss()["median"]
        ratio = rss["DP + prepare_for_dp, 256 via 32"] / rss["non-DP, batch 32"]
        print(f"\nPeak RSS DP (logical 256 via physical 32, prepare_for_dp) / non-DP batch 32: {ratio:.2f}x "
              f"(target <= {TARGET}: {'MET' if ratio <= TARGET else 'not met'})")
    if args.accuracy:
        accuracy()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
