"""Shift statistics benchmark: label-prior error and covariate-shift detection on released statistics.

One SmallCNN is trained once (32 px, synthetic hospitals from simulations/generator.py); patients are rendered
once into pools whose logits are computed once; each repeat then draws sites from the pools and releases their
statistics exactly as client/shift_stats.py does (same bins, same sensitivities, Gaussian noise of std
z x sensitivity, cells below the minimum count zeroed), and the server-side code of server/shift.py analyses them.

z for DP epsilon = 8: the six releases of one "shift" reply together spend epsilon = 8 at delta = 1e-5 (RDP),
i.e. the budget covers the whole reply, not each table.

    nice .venv/bin/python benchmarks/bench_shift.py            # ~5 minutes on 2 CPU cores
    nice .venv/bin/python benchmarks/bench_shift.py --repeats 40 --quick   # smaller pools, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier

from client.shift_stats import model_outputs
from core_models.label_shift import N_BINS, output_bins
from core_models.networks import build_model
from core_models.training import evaluate, make_loader, train_epochs
from server.shift import ShiftStats, bbse_prior, compare_site, imputed_sum, mlls_prior
from simulations.generator import render, sample_truth
from simulations.scenario import SiteSpec

SIZE = 32
SEED = 2026
RELEASES = 6  # tables in one "shift" reply (client/shift_stats.py)
SOURCE_PRIOR = 0.3
MIN_COUNT = 5
NOISE_SHIFT = 0.03  # "moderate" scanner-noise shift: extra_noise_std added to every scanner (modern: 0.03)


def render_site(spec: SiteSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    truth = sample_truth(spec, SEED, n, image_size=SIZE)
    x = np.stack([render(r) for r in truth.to_dict("records")])[:, None].astype(np.float32)
    return x, truth["D"].to_numpy()


class Pool:
    """Rendered patients of one mechanism, kept as (label, output bin, predicted label) per patient."""

    def __init__(self, model, spec: SiteSpec, n: int):
        x, self.y = render_site(spec, n)
        logits, _ = model_outputs(model, x)
        self.bins = output_bins(logits)[:, 0]
        self.pred = logits.argmax(1)
        self.by_label = [np.flatnonzero(self.y == k) for k in (0, 1)]

    def draw(self, rng, n: int, prior: float) -> np.ndarray:
        n1 = rng.binomial(n, prior)
        return np.concatenate([rng.choice(self.by_label[0], n - n1), rng.choice(self.by_label[1], n1)])


def release_site(name: str, pool: Pool, idx: np.ndarray, z: float, rng) -> ShiftStats:
    """The released label counts, confusion and per-label output histograms of one site (holdout = idx)."""
    y, b, p = pool.y[idx], pool.bins[idx], pool.pred[idx]

    def noised(v, sens=1.0):
        v = np.asarray(v, float)
        if z == 0:
            return v
        v = v + rng.normal(0.0, z * sens, v.shape)
        v[v < MIN_COUNT] = 0.0
        return v

    hist = np.zeros((2, 1, N_BINS))
    np.add.at(hist[:, 0], (y, b), 1.0)
    stats = ShiftStats(
        site=name,
        label_counts=noised(np.bincount(y, minlength=2)),
        confusion=noised(np.bincount(y * 2 + p, minlength=4).reshape(2, 2)),
        output_hist=noised(hist),
        rff_sum=np.zeros((2, 2)),  # not benchmarked here
        intensity=noised(np.full(4, 50.0)),
        manufacturers=noised(np.full(2, 50.0)),
        sigma={k: z for k in ("label_counts", "confusion", "output", "rff_sum", "intensity", "manufacturers")},
        min_count=MIN_COUNT if z > 0 else 0.0,
    )
    return stats


def train_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    x, y = render_site(SiteSpec(name="train", n=2000, prevalence=SOURCE_PRIOR), 2000)
    xv, yv = render_site(SiteSpec(name="valid", n=600, prevalence=SOURCE_PRIOR), 600)
    model = build_model("cnn")
    train_epochs(model, make_loader(x, y, 32, shuffle=True, seed=SEED), epochs=3, optimizer="adam", lr=0.003)
    print(f"model: SmallCNN, 3 epochs on 2000 images ({SIZE} px); validation "
          f"AUROC {evaluate(model, make_loader(xv, yv, 256))['auroc']:.3f}")
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="smaller pools")
    ap.add_argument("--rest-sites", type=int, default=3)
    ap.add_argument("--rest-holdout", type=int, default=300, help="labelled holdout images per consortium site")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    model = train_model()
    pool_n = 4000 if args.quick else 12000
    # one pool per mechanism, every site draws from it with replacement: under "no shift" the sites then
    # share their distribution exactly (two finite pools would differ by their own sampling error)
    ref = Pool(model, SiteSpec(name="pool_ref", n=pool_n, label_prior=0.5), pool_n)
    noisy = Pool(model, SiteSpec(name="pool_noisy", n=pool_n, label_prior=0.5, extra_noise_std=NOISE_SHIFT), pool_n)
    print(f"pools rendered and scored in {time.time() - started:.0f} s")
    z8 = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=1.0, steps=RELEASES,
                              accountant="rdp")
    print(f"epsilon=8 for one reply of {RELEASES} releases at delta=1e-5: noise multiplier z = {z8:.3f}")
    sizes = (100, 500, 2000)

    def rest_sites(rng, z):
        return [release_site(f"rest{j}", ref, ref.draw(rng, args.rest_holdout, SOURCE_PRIOR), z, rng)
                for j in range(args.rest_sites)]

    print(f"\nlabel prior: L1 error |pi_hat - pi| (mean over {args.repeats} repeats, target prior ~ U(0.1, 0.9); "
          f"consortium: {args.rest_sites} sites x {args.rest_holdout} labelled holdout images, prior {SOURCE_PRIOR})")
    print(f"{'epsilon':>8} {'n':>6} | {'MLLS new site':>14} {'BBSE new site':>14} {'MLLS server':>12} "
          f"{'95% CI cover':>12}")
    label_rows = []
    for eps, z in (("inf", 0.0), ("8", z8)):
        for n in sizes:
            rng = np.random.default_rng([SEED, n, int(z * 1000)])
            err_local, err_bbse, err_server, cover = [], [], [], []
            for _ in range(args.repeats):
                q = rng.uniform(0.1, 0.9)
                truth = np.array([1 - q, q])
                rest = rest_sites(rng, z)
                cond = imputed_sum(rest)  # what shift_consortium.json holds
                conf = np.sum([r.confusion for r in rest], axis=0)
                idx = ref.draw(rng, n, q)
                local = np.bincount(ref.bins[idx], minlength=N_BINS)[None].astype(float)
                err_local.append(np.abs(mlls_prior(local, cond) - truth).sum())
                err_bbse.append(np.abs(bbse_prior(np.bincount(ref.pred[idx], minlength=2), conf)
                                       - truth).sum())
                site = release_site("target", ref, idx, z, rng)
                row = compare_site(site, rest, rng, n_boot=200)
                err_server.append(abs(row["prior_mlls_1"] - q) * 2)
                cover.append(row["prior_mlls_lo_1"] <= q <= row["prior_mlls_hi_1"])
            label_rows.append((eps, n, np.mean(err_local), np.mean(err_bbse), np.mean(err_server), np.mean(cover)))
            print(f"{eps:>8} {n:>6} | {np.mean(err_local):14.3f} {np.mean(err_bbse):14.3f} {np.mean(err_server):12.3f} "
                  f"{np.mean(cover):12.2f}", flush=True)

    print(f"\ncovariate shift (p_covariate < 0.05, per-label BBSD on log-odds bins, Bonferroni; {args.repeats} repeats): "
          f"shifted site extra_noise_std={NOISE_SHIFT}, prior {SOURCE_PRIOR}; FPR on unshifted sites "
          f"(prior {SOURCE_PRIOR}, and pure label shift to prior 0.6)")
    print(f"{'epsilon':>8} {'n':>6} | {'power':>6} {'FPR none':>9} {'FPR label':>10} | {'label flag':>10}")
    for eps, z in (("inf", 0.0), ("8", z8)):
        for n in sizes:
            rng = np.random.default_rng([SEED, n, int(z * 1000), 1])
            hits, fp_none, fp_label, label_flag = [], [], [], []
            for _ in range(args.repeats):
                rest = rest_sites(rng, z)
                shifted = release_site("noisy", noisy, noisy.draw(rng, n, SOURCE_PRIOR), z, rng)
                hits.append(compare_site(shifted, rest, rng, n_boot=200)["p_covariate"] < 0.05)
                same = release_site("same", ref, ref.draw(rng, n, SOURCE_PRIOR), z, rng)
                fp_none.append(compare_site(same, rest, rng, n_boot=200)["p_covariate"] < 0.05)
                lab = compare_site(release_site("label", ref, ref.draw(rng, n, 0.6), z, rng), rest,
                                   rng, n_boot=200)
                fp_label.append(lab["p_covariate"] < 0.05)
                label_flag.append(lab["p_label"] < 0.05)
            print(f"{eps:>8} {n:>6} | {np.mean(hits):6.2f} {np.mean(fp_none):9.2f} {np.mean(fp_label):10.2f} | "
                  f"{np.mean(label_flag):10.2f}", flush=True)
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
