"""Which pretext task gives label-efficient features: each task trains a SmallCNN encoder, centralised and without
DP, on the pooled training images of the default scenario; then, with 10 % and 100 % of their labels, a linear
probe (logistic regression on the frozen pooled features) and a short fine-tune of the whole network are scored
on the holdout.

    .venv/bin/python benchmarks/bench_pretext_probe.py [--tasks none,rotation,inpainting,contrastive]
        [--epochs 15] [--contrastive-epochs 30] [--draws 3] [--work DIR]

Centralised, so that the features are compared without FedAvg's spread; the federated figures are
`bench_label_efficiency.py`'s. The 10 % rows average `--draws` label draws (one per seed); the fine-tune takes 160
Adam steps of 16 images at learning rate 0.002 from the pretrained weights. One thread: the figures do not depend
on the machine's thread count.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from core_models.data import load_site
from core_models.networks import build_model
from core_models.pretext import PretextModel, embed, train_pretext
from core_models.splits import assign_splits
from simulations.generator import generate_consortium
from simulations.run import DEFAULT_SCENARIO

CPU = torch.device("cpu")


def _pooled(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, holdout images, holdout labels); each site's train split as the client draws
    it at the run config's default seed."""
    xs, ys = [], []
    for site in sorted(d for d in data.iterdir() if (d / "manifest.csv").exists() and d.name != "holdout"):
        loaded = load_site(site, image_size=64)
        train = (assign_splits(loaded.frame, seed=0) == "train").to_numpy()
        xs.append(loaded.images[train])
        ys.append(loaded.labels[train])
    holdout = load_site(data / "holdout", image_size=64)
    return np.concatenate(xs), np.concatenate(ys), holdout.images, holdout.labels


def _features(network: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    network.eval()
    with torch.no_grad():
        return torch.cat([embed(network, torch.from_numpy(x[i:i + 256])) for i in range(0, len(x), 256)]).numpy()


def _scores(network: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    network.eval()
    with torch.no_grad():
        return torch.cat([network(torch.from_numpy(x[i:i + 256])).softmax(1)[:, 1]
                          for i in range(0, len(x), 256)]).numpy()


def _fine_tune(state: dict, x: np.ndarray, y: np.ndarray, seed: int, steps: int = 160) -> torch.nn.Module:
    network = build_model("cnn", 2)
    network.load_state_dict(state)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    network.train()
    for _ in range(steps):
        batch = torch.randint(0, len(xt), (16,), generator=generator)
        loss = F.cross_entropy(network(xt[batch]), yt[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="none,rotation,inpainting,contrastive")
    parser.add_argument("--epochs", type=int, default=15, help="rotation and inpainting (batch 32)")
    parser.add_argument("--contrastive-epochs", type=int, default=30, help="contrastive (batch 128: the negatives)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(args.work or tempfile.mkdtemp(prefix="equifed-probe-")) / "data"
    generate_consortium(DEFAULT_SCENARIO, data)
    x, y, hx, hy = _pooled(data)
    print(f"{len(x)} training images (prevalence {y.mean():.2f}), {len(hx)} holdout", flush=True)
    rows = []
    for task in args.tasks.split(","):
        torch.manual_seed(1)
        network = build_model("cnn", 2)
        start = time.perf_counter()
        if task != "none":
            contrastive = task == "contrastive"
            stats = train_pretext(PretextModel(network, task), x, task,
                                  epochs=args.contrastive_epochs if contrastive else args.epochs,
                                  batch_size=128 if contrastive else 32, lr=1e-3, device=CPU,
                                  generator=torch.Generator().manual_seed(0))
            print(f"{task}: pretext loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}", flush=True)
        pretext_s = time.perf_counter() - start
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        features, holdout_features = _features(network, x), _features(network, hx)
        scaler = StandardScaler().fit(features)
        for fraction in (0.1, 1.0):
            probes, tunes = [], []
            for seed in range(args.draws if fraction < 1 else 1):
                keep = (np.random.default_rng(seed).choice(len(x), size=round(fraction * len(x)), replace=False)
                        if fraction < 1 else np.arange(len(x)))
                probe = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(features[keep]), y[keep])
                probes.append(roc_auc_score(hy, probe.predict_proba(scaler.transform(holdout_features))[:, 1]))
                tunes.append(roc_auc_score(hy, _scores(_fine_tune(state, x[keep], y[keep], seed), hx)))
            rows.append({"task": task, "fraction": fraction, "probe": np.mean(probes), "fine_tune": np.mean(tunes),
                         "fine_tune_draws": " / ".join(f"{t:.3f}" for t in tunes), "pretext_s": round(pretext_s)})
            print(f"{task} at {fraction:g}: probe {rows[-1]['probe']:.3f}, fine-tune {rows[-1]['fine_tune']:.3f}",
                  flush=True)
    table = pd.DataFrame(rows)
    print("\n| pretext | labels | linear probe AUROC | fine-tune AUROC (draws) | pretext s |")
    print("|---|---|---|---|---|")
    for r in table.itertuples():
        print(f"| {r.task} | {r.fraction:.0%} | {r.probe:.3f} | {r.fine_tune:.3f} ({r.fine_tune_draws}) | "
              f"{r.pretext_s} |")


if __name__ == "__main__":
    main()
