"""Are the explanations faithful? Grad-CAM, HiResCAM and occlusion on the marker scenario, before and after the
mitigation.

    nice .venv/bin/python benchmarks/bench_explanations.py [--seeds 0,1,2,3,4] [--network resnet] [--epochs 10]
        [--images 32] [--occlusion-stride 4] [--markdown table.md] [--figure benchmarks/explanations.png]

Data: ``simulations/scenarios/social_marker_64.toml`` (4 hospitals x 500 patients at 64 px; legacy scans differ from
modern ones only by a 6x6 corner marker, and the legacy scanner is mostly the a1 group's), each draw a fresh
consortium (scenario seed + draw) and split, as in ``bench_mitigation.py``.

Models (same draw, same initialisation): the network trained plainly ("unmitigated") and with the one mitigation
recipe (the mediator's logit offset + the path-specific penalty, lambda 30, on half the validation split). Each is
scored for AUROC and its true social-path effect (counterfactual re-renders with the scanner switched).

Explanations, on the test images that carry the marker (``fairness.attribution.image_evidence``):
* Grad-CAM and HiResCAM at the network's default layer (a ResNet's second stage: 16x16 at 64 px), grown by its
  stride;
* occlusion (8 px windows every ``--occlusion-stride`` px).
For each: the share of the attribution mass on the marker (against its area), the parameter-randomisation rank
correlation (Adebayo et al. 2018; pass: <= 0.3), the deletion AUC against random order (Petsiuk et al. 2018; pass:
below). Faithful maps put less mass on the marker after the mitigation, as the true social effect falls.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_mitigation import cnn_scores, evaluate, load_data, train_cnn
from fairness.attribution import RANDOMISATION_PASS, attribution_maps, image_evidence
from simulations.generator import marker_mask

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "simulations" / "scenarios" / "social_marker_64.toml"
RECIPE = {"lam": 30.0, "mode": "pooled-sd-val", "offset": True}
"""The mitigation of ``bench_mitigation.py --calibration-split 0.5`` (its post-processing shifts the logit by the
scanner read from the image's metadata: it leaves the network, and so its maps, as they are)."""


def half_pool(data: dict, seed: int) -> dict:
    """The half of the validation split the penalty draws from (as ``bench_mitigation.run`` holds out the other)."""
    va = data["val"]
    held = np.random.default_rng(seed + 7).random(len(va["y"])) >= 0.5
    return {k: va[k][~held] for k in ("x", "y", "meta")}


def run_draw(seed: int, args) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    data = load_data(Path(args.scenario), seed=seed, fresh_consortium=True)
    te = data["test"]
    marked = te["x"][te["meta"][:, 1] == 1][: args.images]
    mask = marker_mask(marked.shape[-1])
    models = {
        "unmitigated": train_cnn(data, args.epochs, seed, network=args.network)[0],
        "mitigated": train_cnn(data, args.epochs, seed, pool=half_pool(data, seed), network=args.network,
                               **RECIPE)[0],
    }
    rows, maps = [], {}
    for name, model in models.items():
        scores = evaluate(lambda x, s, a, m=model: cnn_scores(m, x), data)
        for method, draws in (("gradcam", args.gradcam_draws), ("hirescam", args.gradcam_draws),
                              ("occlusion", args.occlusion_draws)):
            ev = image_evidence(model, marked, mask, seed=seed, method=method, n_draws=draws,
                                occlusion_stride=args.occlusion_stride)
            rows.append({"seed": seed, "model": name, "method": method, "layer": ev["layer"],
                         "cam": "x".join(map(str, ev["cam_resolution"])), "auroc": scores["auroc"],
                         "true_social_pse": scores["true_social_pse"],
                         "marker_share": ev["region_share_mean"], "area_share": ev["region_area_share"],
                         "zero_maps": ev["n_zero_maps"], "randomisation_rho": ev["randomisation_spearman"],
                         "deletion_auc": ev["deletion_auc_attribution"],
                         "deletion_auc_random": ev["deletion_auc_random"]})
            maps[(name, method)] = attribution_maps(model, marked[:4], method,
                                                    occlusion_stride=args.occlusion_stride)
    print(f"draw {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, {"x": marked[:4], "maps": maps}


def summary(rows: list[dict]) -> pd.DataFrame:
    """Mean (sd) over draws per model and method, and the pass/fail of the three checks."""
    df = pd.DataFrame(rows)
    out = []
    for (method, model), g in df.groupby(["method", "model"], sort=False):
        def ms(col: str) -> str:
            return f"{g[col].mean():.3f} ({g[col].std(ddof=1) if len(g) > 1 else 0:.3f})"

        out.append({"method": method, "layer": g["layer"].iloc[0], "grid": g["cam"].iloc[0], "model": model,
                    "draws": len(g), "auroc": ms("auroc"), "true social PSE": ms("true_social_pse"),
                    "marker share": ms("marker_share"), "area share": f"{g['area_share'].iloc[0]:.3f}",
                    "randomisation rho": ms("randomisation_rho"),
                    "deletion AUC / random": f"{g['deletion_auc'].mean():.3f} / {g['deletion_auc_random'].mean():.3f}",
                    f"randomisation <= {RANDOMISATION_PASS:g}":
                        bool((g["randomisation_rho"] <= RANDOMISATION_PASS).all()),
                    "deletion below random": bool((g["deletion_auc"] < g["deletion_auc_random"]).all())})
    table = pd.DataFrame(out)
    falls = {}
    for method, g in df.groupby("method", sort=False):
        wide = g.pivot(index="seed", columns="model", values="marker_share")
        falls[method] = f"{int((wide['mitigated'] < wide['unmitigated']).sum())} of {len(wide)}"
    table["marker share falls (draws)"] = table["method"].map(falls)
    return table


def markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def figure(path: Path, shown: dict) -> None:
    """Four marker-carrying test images of the first draw with each model's Grad-CAM and occlusion maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(shown["maps"])
    fig, axes = plt.subplots(len(shown["x"]), 1 + len(keys), figsize=(2 * (1 + len(keys)), 2 * len(shown["x"])))
    for i, img in enumerate(shown["x"]):
        axes[i, 0].imshow(img[0], cmap="gray")
        for j, key in enumerate(keys, start=1):
            axes[i, j].imshow(img[0], cmap="gray")
            axes[i, j].imshow(np.clip(shown["maps"][key][i], 0, None), cmap="jet", alpha=0.45)
            if i == 0:
                axes[i, j].set_title(f"{key[0]}\n{key[1]}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default=str(SCENARIO))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--network", default="resnet", help="core_models.networks.build_model name (cnn | resnet)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--images", type=int, default=32, help="marker-carrying test images explained per draw")
    p.add_argument("--gradcam-draws", type=int, default=10, help="re-initialisations in the CAMs' randomisation")
    p.add_argument("--occlusion-draws", type=int, default=3)
    p.add_argument("--occlusion-stride", type=int, default=4)
    p.add_argument("--markdown", default=None, help="also write the summary table here")
    p.add_argument("--figure", default=None, help="PNG of the first draw's maps")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows, shown = [], None
    for seed in [int(s) for s in args.seeds.split(",")]:
        r, maps = run_draw(seed, args)
        rows += r
        shown = shown or maps
    per_draw = pd.DataFrame(rows)
    print(per_draw.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    table = summary(rows)
    print(markdown(table))
    if args.markdown:
        Path(args.markdown).write_text(markdown(table) + "\n")
    if args.figure and shown:
        figure(Path(args.figure), shown)
    print(f"draws {args.seeds}, network {args.network}, epochs {args.epochs}, wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
