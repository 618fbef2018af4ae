"""ScatterNet training with and without the coefficient cache, side by side in one run.

    .venv/bin/python benchmarks/bench_scatter_cache.py [--images 300] [--rounds 3] [--epochs 2] [--size 64]

A site's training as the client does it: every round a fresh ScatterNet (the global model) trained for ``--epochs``
local epochs (Adam, batch 16) on the same ``--images`` images. Process CPU time, one thread, per round and in all,
for a cache of 256 MiB and for none (max_bytes 0: every forward pass recomputes the scattering transform).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from core_models import networks
from core_models.networks import build_model
from core_models.training import make_loader, train_epochs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.random((args.images, 1, args.size, args.size), dtype=np.float32)
    y = rng.integers(0, 2, args.images)
    caches = {"no cache": networks.CoefficientCache(0), "cache": networks.CoefficientCache()}
    seconds: dict[str, list[float]] = {name: [] for name in caches}
    for rnd in range(args.rounds):
        for name, cache in caches.items():  # interleaved, so machine noise hits both alike
            networks.SCATTER_CACHE = cache
            torch.manual_seed(0)
            model = build_model("scatter")
            t0 = time.process_time()
            train_epochs(model, make_loader(x, y, 16, shuffle=True, seed=rnd), epochs=args.epochs, optimizer="adam",
                         lr=0.002, device=torch.device("cpu"))
            seconds[name].append(time.process_time() - t0)
    for name, values in seconds.items():
        print(f"{name}: per round {', '.join(f'{v:.1f}' for v in values)} s cpu, total {sum(values):.1f} s")
    print(f"cache / no cache: {sum(seconds['cache']) / sum(seconds['no cache']):.2f}x "
          f"({args.images} images of {args.size} px, {args.rounds} rounds x {args.epochs} epochs)")


if __name__ == "__main__":
    main()
