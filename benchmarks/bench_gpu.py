"""Training on the `device` a run or a site names: plain and DP-SGD steps side by side, on CUDA where present.

    .venv/bin/python benchmarks/bench_gpu.py [--device auto] [--models cnn,resnet] [--batches 64,256] [--rounds 30]

One step is what a site's loop does with a batch (core_models.training.train_steps): the batch moved from the CPU
to the device, forward, cross-entropy, backward, the optimizer step, the loss read back. "plain" is Adam (lr 2e-3,
as the app trains); "DP" is the step `client.dp.train_dp` takes: `prepare_for_dp`, Opacus hooks with the noise
from an OS-entropy generator on the device, `NonfiniteGuard`, sigma 1, clip 1. 1x64x64 images, 2 classes, a fixed
batch of each size. Plain and DP steps of one model and batch alternate (machine noise hits both alike) after 3
warm-up steps each; the table gives the median step (CUDA: synchronised), the DP / plain ratio, images per second,
and on CUDA the peak memory of each configuration alone (torch.cuda.max_memory_allocated, after
reset_peak_memory_stats, over 3 steps in a fresh model). Prints the card's name; without CUDA, the CPU's figures
(and says so). `--device cuda` on a machine without CUDA stops with the reason, as a run would.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.dp import NonfiniteGuard, os_entropy_generator
from core_models.devices import DeviceUnavailable, device_name, resolve_device
from core_models.networks import build_model, prepare_for_dp
from core_models.training import local_optimizer, train_steps

SIZE, LR, SIGMA, CLIP = 64, 2e-3, 1.0, 1.0
warnings.filterwarnings("ignore", module="opacus")  # secure-RNG notice (client.dp says why OS entropy instead)
warnings.filterwarnings("ignore", message=".*full backward hook.*")


class Step:
    """One training step of a fresh `model` on a fixed batch, plain or under DP-SGD as a site takes it."""

    def __init__(self, model: str, dp: bool, batch: int, device: torch.device):
        torch.manual_seed(0)
        net = build_model(model).to(device).train()
        g = torch.Generator().manual_seed(1)
        self.batch = [(torch.rand(batch, 1, SIZE, SIZE, generator=g), torch.randint(0, 2, (batch,), generator=g))]
        self.device = device
        if dp:
            prepare_for_dp(net)
        opt, _ = local_optimizer(net, "adam", LR, 0.0, 0.0)
        if dp:  # the loader only sets Opacus' sample rate (batch / 1024): the steps use the fixed batch
            rate = DataLoader(TensorDataset(torch.zeros(1024, 1), torch.zeros(1024, dtype=torch.long)), batch)
            net, opt, _ = PrivacyEngine(accountant="rdp").make_private(
                module=net, optimizer=opt, data_loader=rate, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                poisson_sampling=False, noise_generator=os_entropy_generator(device))
            opt.expected_batch_size = batch
            NonfiniteGuard(opt)
        self.net, self.opt = net, opt

    def __call__(self) -> float:
        """Seconds of one step (its loss read back, as the loop does: the step has finished on the device)."""
        sync(self.device)
        start = time.perf_counter()
        train_steps(self.net, self.batch, self.opt, self.device)
        sync(self.device)
        return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: str, batch: int, device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per step, plain and DP, alternating."""
    steps = {"plain": Step(model, False, batch, device), "dp": Step(model, True, batch, device)}
    for step in steps.values():
        for _ in range(3):
            step()
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            seconds[k].append(steps[k]())
    return {k: statistics.median(v) for k, v in seconds.items()}


def peak_mb(model: str, dp: bool, batch: int, device: torch.device) -> float:
    """Peak CUDA memory (MiB) of one configuration alone: a fresh model, 3 steps."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = Step(model, dp, batch, device)
    for _ in range(3):
        step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del step
    return peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (as run config device)")
    p.add_argument("--models", default="cnn,resnet", help="comma-separated model names (run config model)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 64,256 on CUDA, 64 on CPU)")
    p.add_argument("--rounds", type=int, default=None, help="timed steps of each (default: 30 on CUDA, 5 on CPU)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DeviceUnavailable as err:
        print(f"bench_gpu: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"bench_gpu: --device {err}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("64,256" if cuda else "64")).split(",")]
    rounds = args.rounds or (30 if cuda else 5)
    print(f"device: {device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}")
    if not cuda:
        print(f"no CUDA on this machine (torch.cuda.is_available() is {torch.cuda.is_available()}): CPU figures, "
              f"{torch.get_num_threads()} thread(s)")
    print(f"1x{SIZE}x{SIZE} images; median of {rounds} steps after 3 warm-up; DP: hooks + prepare_for_dp, "
          f"OS-entropy noise on the device, NonfiniteGuard, sigma {SIGMA}, clip {CLIP}\n")
    head = (f"{'model':8s} {'batch':>5s} | {'plain ms':>9s} {'DP ms':>9s} {'DP/plain':>8s} | {'plain img/s':>11s} "
            f"{'DP img/s':>9s} | {'plain peak MiB':>14s} {'DP peak MiB':>11s}")
    print(head)
    print("-" * len(head))
    t0 = time.time()
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for batch in batches:
            s = timed(model, batch, device, rounds)
            plain, dp = (f"{peak_mb(model, dp, batch, device):.1f}" if cuda else "n/a" for dp in (False, True))
            print(f"{model:8s} {batch:5d} | {1e3 * s['plain']:9.2f} {1e3 * s['dp']:9.2f} {s['dp'] / s['plain']:8.2f} | "
                  f"{batch / s['plain']:11.0f} {batch / s['dp']:9.0f} | {plain:>14s} {dp:>11s}", flush=True)
    print(f"\n{time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
