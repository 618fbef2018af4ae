"""Where the calibrated model's holdout ECE comes from: the estimator's floor, the records, the release noise.

    .venv/bin/python benchmarks/bench_calibration.py RUN:SITES [RUN:SITES ...] [--draws 40] [--noise 2,5]

Each RUN is an `equifed-simulate --sites SITES ... -c calibrate=true` run folder (final_model.pt, summary.json).
Its final model scores every site's records (one per patient, as the sites release them) and the holdout; then,
with numpy's seeded generator standing in for the sites' OS-entropy noise, for each run:

* `raw`, `run`: the holdout ECE of the final model and of the run's own calibrated model (summary.json);
* `floor`: the mean ECE of a *perfectly calibrated* model on as many holdout images (labels drawn from the
  holdout-fitted calibration's probabilities): what no calibration can go below on that holdout;
* `oracle`: the calibration fitted on the holdout itself;
* `val`, `train+val` x release-noise x `per-site` / `secure`: the mean holdout ECE of the federated fit
  (core_models.calibration.fit_from_histograms) from the pooled histograms of those splits, noised per cell with
  std release-noise x sqrt(sites) (each site noises its own table) or release-noise (one noise for the sum, as a
  secure sum would give).

Every number is post-processing of the models and splits on this machine; nothing is released.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from client.shift_stats import one_per_patient
from client.site import open_site
from core_models import calibration as C
from core_models.config import run_config_of
from core_models.data import load_site
from core_models.model_factory import ModelSpec
from core_models.training import make_loader


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _logits(model, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        batches = make_loader(images, np.zeros(len(images), dtype=np.int64), 256)
        return torch.cat([model(x) for x, _ in batches]).double().numpy()


def score_run(run: Path, sites: Path) -> dict:
    """{(site, split): (logits, labels)} of every site's records (one per patient) and ("holdout", ""): the
    holdout's, all from the run's final model."""
    cfg = run_config_of(json.loads((run / "run_overrides.json").read_text()))
    train = cfg.train
    model = ModelSpec.of_run(train).scoring().build()
    model.load_state_dict(torch.load(run / "final_model.pt", weights_only=True))
    out = {}
    for folder in sorted(p for p in sites.iterdir() if (p / "manifest.csv").is_file() and p.name != "holdout"):
        site = open_site(folder, image_size=train.image_size, seed=train.seed, num_classes=train.num_classes,
                         channels=train.in_channels)
        one = one_per_patient(site.data.frame)
        for split in ("val", "train"):
            keep = one & (site.split == split).to_numpy()
            out[(folder.name, split)] = (_logits(model, site.data.images[keep]), site.data.labels[keep])
    holdout = load_site(sites / "holdout", image_size=train.image_size, num_classes=train.num_classes,
                        channels=train.in_channels)
    out[("holdout", "")] = (_logits(model, holdout.images), holdout.labels)
    return out


def ece(logits: np.ndarray, labels: np.ndarray, fit: C.Calibration | None = None) -> float:
    return C.expected_calibration_error(_softmax(logits if fit is None else fit.apply(logits)), labels)


def floor(probs: np.ndarray, rng: np.random.Generator, draws: int = 300) -> float:
    """Mean ECE of labels drawn from `probs` themselves (a perfectly calibrated model) on as many records."""
    cum = np.cumsum(probs, axis=1)
    return float(np.mean([C.expected_calibration_error(probs, (rng.random((len(probs), 1)) > cum).sum(axis=1))
                          for _ in range(draws)]))


def judge(scores: dict, noises: list[float], draws: int, seed: int = 0) -> dict:
    """The figures of one run (module docstring)."""
    rng = np.random.default_rng(seed)
    hz, hy = scores[("holdout", "")]
    k = hz.shape[1]
    s, t = C.calibration_scores(hz, hy)
    oracle = C.fit_scaling(s, t, platt=k == 2, offset=C.top_label_offset(k))
    out = {"raw": ece(hz, hy), "oracle": ece(hz, hy, oracle), "floor": floor(_softmax(oracle.apply(hz)), rng)}
    sites = sorted({site for site, split in scores if split == "val"})
    for splits in (("val",), ("train", "val")):
        hist = sum(C.calibration_histograms(*scores[(site, split)]) for site in sites for split in splits)
        name = "+".join(splits)
        out[f"{name} exact"] = ece(hz, hy, C.fit_from_histograms(hist, k))
        for noise in noises:
            for how, std in (("per-site", noise * math.sqrt(len(sites))), ("secure", noise)):
                got = []
                for _ in range(draws):
                    try:
                        fit = C.fit_from_histograms(hist + rng.normal(0.0, std, hist.shape), k, noise_std=std)
                        got.append(ece(hz, hy, fit))
                    except ValueError:  # no fit: the model stays as it is
                        got.append(out["raw"])
                out[f"{name} noise {noise:g} {how}"] = float(np.mean(got))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN:SITES (a run folder and the site folders it trained on)")
    parser.add_argument("--draws", type=int, default=40, help="noise draws per setting")
    parser.add_argument("--noise", default="2,5", help="release-noise values (comma-separated)")
    args = parser.parse_args(argv)
    noises = [float(x) for x in args.noise.split(",")]
    rows = []
    for spec in args.runs:
        run, sites = (Path(p) for p in spec.split(":"))
        summary = json.loads((run / "summary.json").read_text())
        figures = judge(score_run(run, sites), noises, args.draws)
        figures["run"] = (summary.get("calibration") or {}).get("holdout_calibrated_ece", math.nan)
        rows.append((run.name, figures))
        print(run.name, " | ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
    keys = list(rows[0][1])
    print("\n| run | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for name, figures in rows:
        print(f"| {name} | " + " | ".join(f"{figures.get(k, math.nan):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
