"""Lesion localisation on the default scenario: holdout mAP@0.5, federated beside centralised.

    .venv/bin/python benchmarks/bench_detection.py [--out runs/bench_detection] [--rounds 5]

Federated: ``equifed-simulate simulations/scenarios/default.toml -c detection=true`` (4 sites, FedAvg, 2 local
epochs per round, the run's own holdout mAP@0.5 and each site's on its test split). Centralised: the same
network and detection loss on the four sites' train splits pooled (as each site splits them), trained for
rounds x local epochs epochs with the run's batch size, learning rate and optimizer, scored on the same holdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.site import list_sites, open_site
from core_models.data import load_site
from core_models.data.boxes import image_boxes
from core_models.detection import LesionDetector, box_meta, detection_objective, score_annotated
from core_models.networks import build_model
from core_models.training import make_loader, train_epochs

SCENARIO = Path(__file__).resolve().parents[1] / "simulations" / "scenarios" / "default.toml"


def federated(out: Path, rounds: int) -> dict:
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "equifed-simulate"), str(SCENARIO), "--out", str(out),
           "--rounds", str(rounds), "-c", "detection=true"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    per_site = pd.read_csv(out / "per_site.csv")
    last = per_site[(per_site.phase == "evaluate") & (per_site["round"] == per_site["round"].max())]
    return {"map50": summary["final_holdout_map50"], "auroc": summary["final_holdout_auroc"],
            "sites": dict(zip(last.site, last["eval-map50"])), "seconds": time.perf_counter() - t0}


def centralised(data: Path, epochs: int, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    xs, ys, boxes, annotated = [], [], [], []
    for path in list_sites(data):
        site = open_site(path, image_size=64, seed=0)
        x, y = site.part("train")
        b, a = site.boxes("train")
        xs.append(x), ys.append(y), annotated.append(a)
        boxes += b
    model = LesionDetector(build_model("cnn"), 64)
    loader = make_loader(np.concatenate(xs), np.concatenate(ys), batch_size=16, shuffle=True, seed=seed,
                         meta=box_meta(boxes, np.concatenate(annotated)))
    train_epochs(model, loader, epochs=epochs, optimizer="adam", lr=0.002, weight_decay=1e-4,
                 device=torch.device("cpu"), loss_fn=detection_objective())
    hold = load_site(data / "holdout", image_size=64, num_classes=2)
    ap = score_annotated(model, hold.images, *image_boxes(data / "holdout", hold.frame, 64))[0]
    return {"map50": ap, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_detection")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    fed = federated(out, args.rounds)
    cen = centralised(out / "data", epochs=2 * args.rounds)
    print(f"holdout mAP@0.5: federated {fed['map50']:.3f} ({fed['seconds']:.0f} s; holdout AUROC {fed['auroc']:.3f}) "
          f"| centralised {cen['map50']:.3f} ({cen['seconds']:.0f} s)")
    print("per site (test split, final global model): " + ", ".join(f"{k} {v:.3f}" for k, v in fed["sites"].items()))
    print(f"predicted boxes drawn: {out / 'holdout_boxes.png'}")


if __name__ == "__main__":
    main()
