"""Label efficiency without DP: holdout AUROC of the default federation when only a share of each site's
training patients keep their label, for a network trained from scratch, from a federated self-supervised encoder
(trained on every image, labelled or not) and from a checkpoint pretrained on another scenario.

    .venv/bin/python benchmarks/bench_label_efficiency.py [--fractions 0.05,0.1,0.25,1] [--rounds 20]
        [--label-epochs 5] [--methods scratch,ssl,transfer] [--ssl-task contrastive] [--ssl-rounds 20]
        [--ssl-batch-size 64] [--ssl-epochs 5] [--pretrain-scenario label_skew] [--seed 0]

The default scenario is generated once. Its split is fixed per patient (written into each manifest's `split`
column, as the client would draw it), then for each fraction the labels of the other training patients are blanked
(drawn per site from `--seed`, which also seeds both runs' initial weights and shuffling; the split stays): those
rows become unlabelled images, which only the pretext run uses. Validation and test rows keep their labels. Each
(method, fraction) trains in a fresh copy of the sites. Every label phase runs the same number of rounds and local
epochs, enough for the smallest fractions to converge (20 rounds of 5 epochs: a site with 26 labelled images takes
2 steps an epoch). One pretext run per seed serves every fraction: it reads the same images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core_models.data import load_site
from core_models.splits import assign_splits
from simulations.generator import generate_consortium
from simulations.run import DEFAULT_SCENARIO
from simulations.run import main as simulate

SCENARIOS = DEFAULT_SCENARIO.parent


def _fix_splits(data: Path, seed: int) -> None:
    """Each site's manifest with the split the client draws at `seed`, so blanking labels cannot move it."""
    for site in sorted(d for d in data.iterdir() if (d / "manifest.csv").exists() and d.name != "holdout"):
        frame = load_site(site, image_size=64).frame
        split = assign_splits(frame, seed=seed)
        manifest = pd.read_csv(site / "manifest.csv", dtype=str)
        by_patient = dict(zip(frame["patient_id"].astype(str), split))
        manifest["split"] = manifest["patient_id"].map(by_patient)
        manifest.to_csv(site / "manifest.csv", index=False)


def _with_fraction(base: Path, out: Path, fraction: float, seed: int) -> dict[str, int]:
    """A copy of the sites in which only `fraction` of each site's training patients keep their label."""
    shutil.copytree(base, out)
    kept = {}
    rng = np.random.default_rng(seed)
    for site in sorted(d for d in out.iterdir() if (d / "manifest.csv").exists() and d.name != "holdout"):
        manifest = pd.read_csv(site / "manifest.csv", dtype=str)
        train = sorted(manifest.loc[manifest["split"] == "train", "patient_id"].unique())
        keep = set(rng.choice(train, size=max(2, round(fraction * len(train))), replace=False))
        blank = (manifest["split"] == "train") & ~manifest["patient_id"].isin(keep)
        manifest.loc[blank, "label"] = ""
        manifest.to_csv(site / "manifest.csv", index=False)
        kept[site.name] = int((manifest["split"] == "train").sum() - blank.sum())
    return kept


def _run(args_list: list[str], what: str) -> dict:
    code = simulate(args_list)
    out = Path(args_list[args_list.index("--out") + 1])
    if code != 0:
        raise SystemExit(f"{what} failed; see {out}/flower.log")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", default="0.05,0.1,0.25,1")
    parser.add_argument("--methods", default="scratch,ssl,transfer")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--label-epochs", type=int, default=5, help="local epochs of every label phase")
    parser.add_argument("--ssl-task", default="contrastive")
    parser.add_argument("--ssl-rounds", type=int, default=20)
    parser.add_argument("--ssl-batch-size", type=int, default=64, help="the contrastive task's negatives")
    parser.add_argument("--ssl-epochs", type=int, default=5)
    parser.add_argument("--pretrain-scenario", default="label_skew")
    parser.add_argument("--pretrain-rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[], help="run-config key=value for the label phase")
    parser.add_argument("--ssl-extra", action="append", default=[], help="run-config key=value for the pretext run")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="equifed-label-eff-"))
    base = work / "base"
    if not (base / "consortium.json").exists():
        generate_consortium(DEFAULT_SCENARIO, base)
        _fix_splits(base, seed=0)  # the run config's default seed: the split the sites would draw
    methods = args.methods.split(",")
    checkpoint = work / f"pretrain_{args.pretrain_scenario}_{args.pretrain_rounds}r" / "final_model.pt"
    if "transfer" in methods and not checkpoint.exists():
        _run([str(SCENARIOS / f"{args.pretrain_scenario}.toml"), "--out", str(checkpoint.parent),
              "--rounds", str(args.pretrain_rounds)], "pretraining")
    settings = "_".join([args.ssl_task, f"{args.ssl_rounds}r", f"{args.ssl_epochs}e", f"b{args.ssl_batch_size}",
                         *args.ssl_extra, f"seed{args.seed}"])
    ssl_checkpoint = work / f"pretext_{settings}" / "final_model.pt"  # a run with other settings trains anew
    if "ssl" in methods and not ssl_checkpoint.exists():
        # one pretext run serves every fraction: it reads the same images (the train split, labelled or not)
        start = time.perf_counter()
        pretext = ["--sites", str(base), "--out", str(ssl_checkpoint.parent), "--rounds", str(args.ssl_rounds),
                   "-c", f"pretext={args.ssl_task}", "-c", f"batch-size={args.ssl_batch_size}",
                   "-c", f"local-epochs={args.ssl_epochs}", "-c", f"seed={args.seed}"]
        for extra in args.ssl_extra:
            pretext += ["-c", extra]
        _run(pretext, "pretext run")
        print(f"pretext run ({args.ssl_task}, {args.ssl_rounds} rounds): {time.perf_counter() - start:.0f} s",
              flush=True)
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for method in methods:
            folder = work / f"{method}_{fraction:g}"
            shutil.rmtree(folder, ignore_errors=True)
            kept = _with_fraction(base, folder / "data", fraction, args.seed)
            start = time.perf_counter()
            label = ["--sites", str(folder / "data"), "--out", str(folder / "run"), "--rounds", str(args.rounds),
                     "-c", f"local-epochs={args.label_epochs}", "-c", f"seed={args.seed}"]
            for extra in args.extra:
                label += ["-c", extra]
            if method == "ssl":
                label += ["-c", f"pretrained-path={ssl_checkpoint}"]
            elif method == "transfer":
                label += ["-c", f"pretrained-path={checkpoint}"]
            summary = _run(label, f"{method} at {fraction:g}")
            wall = time.perf_counter() - start
            rows.append({"fraction": fraction, "method": method, "labelled_train_images": sum(kept.values()),
                         "holdout_auroc": summary["final_holdout_auroc"], "wall_s": round(wall)})
            print(f"{method} at {fraction:g} of the labels ({sum(kept.values())} labelled training images): "
                  f"holdout AUROC {summary['final_holdout_auroc']:.3f} ({wall:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    full = table[table["fraction"] == 1.0].set_index("method")["holdout_auroc"]
    table["of_own_full"] = table.apply(lambda r: r["holdout_auroc"] / full.get(r["method"], np.nan), axis=1)
    table["of_scratch_full"] = table["holdout_auroc"] / full.get("scratch", np.nan)
    print(f"\nlabel efficiency, default scenario, {args.rounds} label rounds of {args.label_epochs} epochs, no DP "
          f"(work folder {work})")
    print("| fraction of labels | labelled training images | method | holdout AUROC | / same method at 100 % "
          "| / scratch at 100 % | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(f"| {r.fraction:g} | {r.labelled_train_images} | {r.method} | {r.holdout_auroc:.3f} | "
              f"{r.of_own_full:.3f} | {r.of_scratch_full:.3f} | {r.wall_s} |")


if __name__ == "__main__":
    main()
