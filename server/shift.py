"""Server-side shift analysis (analyser "shift"): each site against the pooled rest.

Works only on what sites released (client/shift_stats.py): noised counts whose noise std each
site reports. For every site and round it writes a row of `shift.csv`:

* covariate shift: the site's per-label histograms of the model's log-odds against the rest's,
  one test per (label, output), Bonferroni (`p_covariate`). Conditioning on the label keeps a
  pure label shift from being flagged as covariate shift. `p_bbsd` is the label-blind BBSD test
  (any shift of the output distribution). Effect sizes: total-variation distances, and the
  bias-corrected squared MMD of the random-Fourier-feature means (`mmd2`, `mmd2_cond`).
* label shift: the site's prior from its label counts, and two estimates that use only the
  site's unlabelled view and the rest's labelled statistics, as a new site would: MLLS (maximum
  likelihood over the log-odds bins, EM) with a parametric-bootstrap 95% interval, and BBSE
  (confusion matrix inverse). `p_label` tests the site's label counts against the rest's.
* acquisition drift: intensity histograms (`p_intensity`) and manufacturer counts (`p_scanner`).

Every p-value comes from a parametric bootstrap whose null includes the multinomial sampling of
each site and the Gaussian noise (and small-cell suppression) each site applied, so DP noise
never looks like shift. The pooled statistics are written to `shift_consortium.json` for new-site
adaptation (client/adapt.py), and a per-site figure to `shift.png`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core_models.config import RunConfig, run_config_of  # noqa: E402
from core_models.label_shift import LOGODDS_EDGES, bbse_prior, mlls_interval, mlls_prior  # noqa: E402,F401
from core_models.label_shift import normalise as _normalise  # noqa: E402
from core_models.protocol import (BINS, CONFUSION, INTENSITY_HIST, LABEL_COUNTS, MANUFACTURERS, MIN_COUNT,  # noqa: E402
                                  NUM_CLASSES, NUM_OUTPUTS, OUTPUT_HIST, RFF_SUM, SHIFT_TABLES, SIGMA, STAT_SHIFT)
from core_models.run_files import SHIFT_CONSORTIUM_JSON, SHIFT_CSV, SHIFT_PNG  # noqa: E402
from server.site_statistics import SiteRelease  # noqa: E402

DEFAULT_ALPHA = 0.05
DEFAULT_BOOTSTRAP = 500


@dataclass
class ShiftStats:
    """One site's released shift statistics, reshaped; `sigma` = noise std per statistic."""

    site: str
    label_counts: np.ndarray  # (K,)
    confusion: np.ndarray  # (K, K) true x predicted
    output_hist: np.ndarray  # (K, K', B)
    rff_sum: np.ndarray  # (K, D)
    intensity: np.ndarray  # (I,)
    manufacturers: np.ndarray  # (V+1,)
    sigma: dict  # noise std by the release's table name (protocol.SHIFT_TABLES)
    min_count: float = 0.0

    @classmethod
    def from_record(cls, site: str, rec: dict) -> ShiftStats:
        k, k_out, b = int(rec[NUM_CLASSES]), int(rec[NUM_OUTPUTS]), int(rec[BINS])
        return cls(
            site=site,
            label_counts=np.asarray(rec[LABEL_COUNTS], float),
            confusion=np.asarray(rec[CONFUSION], float).reshape(k, k),
            output_hist=np.asarray(rec[OUTPUT_HIST], float).reshape(k, k_out, b),
            rff_sum=np.asarray(rec[RFF_SUM], float).reshape(k, -1),
            intensity=np.asarray(rec[INTENSITY_HIST], float),
            manufacturers=np.asarray(rec[MANUFACTURERS], float),
            sigma={n: float(rec[SIGMA + n]) for n in SHIFT_TABLES},
            min_count=float(rec.get(MIN_COUNT, 0)),
        )

    @property
    def k(self) -> int:
        return len(self.label_counts)

    def holdout_counts(self) -> np.ndarray:
        """Holdout images per label, from the confusion rows: large cells, rarely suppressed, unlike the
        histograms' cells (the histograms' own sums lose every suppressed cell)."""
        return np.clip(self.confusion, 0.0, None).sum(1)

    def imputed_output_hist(self, shape: np.ndarray) -> np.ndarray:
        """The per-label output histograms with the suppressed mass put back (see `impute_suppressed`)."""
        totals = self.holdout_counts()
        return np.stack([np.stack([impute_suppressed(self.output_hist[y, o], totals[y], shape[y, o])
                                   for o in range(shape.shape[1])]) for y in range(shape.shape[0])])


def impute_suppressed(hist: np.ndarray, total: float, shape: np.ndarray) -> np.ndarray:
    """`hist` with the mass that suppression removed (`total` minus its sum) spread over its zero cells.

    The spread follows `shape` (pooled histograms) widened by one bin, so a tail suppressed at every
    site still gets its share. Without this, MLLS sees no source mass where small cells were
    suppressed and misattributes the target's images that land there.
    """
    out = np.clip(np.asarray(hist, float), 0.0, None)
    shape = np.asarray(shape, float)
    widened = shape + 0.5 * (np.roll(shape, 1) + np.roll(shape, -1))
    weights = np.where(out == 0, widened, 0.0)
    missing = float(total) - out.sum()
    if missing > 0 and weights.sum() > 0:
        out = out + missing * weights / weights.sum()
    return out


def imputed_sum(stats: list[ShiftStats]) -> np.ndarray:
    """Sum of the sites' per-label output histograms, each with its suppressed mass put back."""
    shape = np.sum([np.clip(s.output_hist, 0.0, None) for s in stats], axis=0)
    return np.sum([s.imputed_output_hist(shape) for s in stats], axis=0)


# ------------------------------------------------------------------------------------------- two-sample test

def _chi2(a: np.ndarray, c: np.ndarray, var_a: float, var_c: float) -> np.ndarray:
    """Noise-aware chi-square distance between the shapes of histograms a (site) and c (rest); batches too."""
    a, c = np.clip(a, 0.0, None), np.clip(c, 0.0, None)
    na, nc = np.maximum(a.sum(-1, keepdims=True), 1.0), np.maximum(c.sum(-1, keepdims=True), 1.0)
    p = (a + c) / (na + nc)
    v = p * (1 / na + 1 / nc) + var_a / na**2 + var_c / nc**2 + 1e-12
    return (((a / na - c / nc) ** 2) / v).sum(-1)


def hist_test(site_hist, site_sigma: float, rest_hists: list, rest_sigmas: list[float], min_count: float,
              rng: np.random.Generator, n_boot: int = DEFAULT_BOOTSTRAP, site_total: float | None = None,
              rest_totals: list[float] | None = None) -> tuple[float, float]:
    """(p-value, total-variation distance) of H0: the site's histogram and the rest's share one distribution.

    The null is simulated: each site draws its own total from the pooled distribution, adds its
    own Gaussian noise and suppresses cells below `min_count`, as it did when releasing. Totals
    from larger cells (`site_total`, `rest_totals`: e.g. confusion rows) are used when they exceed
    the histograms' own sums, which lose the suppressed mass.
    Histograms of fractional counts (intensity) are treated as multinomial, which is conservative.
    """
    site_hist = np.asarray(site_hist, float)
    rest = [np.asarray(h, float) for h in rest_hists]
    totals = [np.clip(h, 0, None).sum() for h in [site_hist, *rest]]  # lower bounds: suppression removes mass
    if site_total is not None:
        totals = [max(a, float(b)) for a, b in zip(totals, [site_total, *rest_totals])]
    rest_sum = np.sum(rest, axis=0)
    var_c = float(sum(s**2 for s in rest_sigmas))
    tv = 0.5 * float(np.abs(_normalise(site_hist) - _normalise(rest_sum)).sum())
    shape = np.clip(site_hist, 0, None) + np.clip(rest_sum, 0, None)
    # the null's distribution gets the suppressed mass back: else its tails are thinner than the data's
    pooled = _normalise(sum(impute_suppressed(h, n, shape) for h, n in zip([site_hist, *rest], totals)))
    # compare only cells every site expects to fill (above the suppression threshold, and with 2
    # images at least): in sparser cells a single image, or whether a cell survived suppression,
    # says more about the null's estimated tails than about shift
    keep = pooled * min(totals) >= max(min_count, 2.0)
    if not keep.any():
        keep = pooled > 0
    observed = float(_chi2(site_hist[keep], rest_sum[keep], site_sigma**2, var_c))

    def draw(n, sigma):
        x = rng.multinomial(int(round(n)), pooled, size=n_boot) + rng.normal(0.0, sigma, (n_boot, len(pooled)))
        x[x < min_count] = 0.0
        return x

    sim_site = draw(totals[0], site_sigma)
    sim_rest = sum(draw(n, s) for n, s in zip(totals[1:], rest_sigmas))
    null = _chi2(sim_site[:, keep], sim_rest[:, keep], site_sigma**2, var_c)
    return float((1 + np.sum(null >= observed)) / (n_boot + 1)), tv


# --------------------------------------------------------------------------------------------- per-site analysis

def _mmd2(site_sum, site_n, rest_sum, rest_n, site_sigma, rest_var) -> float:
    """Squared distance of the mean random features, minus its expectation when both samples share a
    distribution: every feature vector has norm 1, so the sampling part is (1 - |mean|^2)(1/n_s + 1/n_r)."""
    ns, nr = max(site_n, 1.0), max(rest_n, 1.0)
    ms, mr = site_sum / ns, rest_sum / nr
    pooled = (site_sum + rest_sum) / (ns + nr)
    bias = (1 - pooled @ pooled) * (1 / ns + 1 / nr) + len(ms) * (site_sigma**2 / ns**2 + rest_var / nr**2)
    return float((ms - mr) @ (ms - mr) - bias)


def compare_site(site: ShiftStats, rest: list[ShiftStats], rng: np.random.Generator,
                 n_boot: int = DEFAULT_BOOTSTRAP, alpha: float = DEFAULT_ALPHA) -> dict:
    """One row of shift.csv: `site` against the pooled `rest`."""
    k, k_out = site.k, site.output_hist.shape[1]
    mc = site.min_count
    row: dict = {}

    # covariate shift given the label: one test per (label, output), Bonferroni
    tests = []
    n_site_y = site.holdout_counts()
    for y in range(k):
        if n_site_y[y] < 1:
            continue  # this site has no holdout images of label y
        for o in range(k_out):
            tests.append(hist_test(site.output_hist[y, o], site.sigma[OUTPUT_HIST],
                                   [r.output_hist[y, o] for r in rest], [r.sigma[OUTPUT_HIST] for r in rest], mc,
                                   rng, n_boot, n_site_y[y], [r.holdout_counts()[y] for r in rest]))
    row["p_covariate"] = min(1.0, len(tests) * min(p for p, _ in tests)) if tests else float("nan")
    row["tv_covariate"] = max(tv for _, tv in tests) if tests else float("nan")
    # label-blind BBSD: the output distribution, whatever the labels
    blind = [hist_test(site.output_hist[:, o].sum(0), site.sigma[OUTPUT_HIST] * np.sqrt(k),
                       [r.output_hist[:, o].sum(0) for r in rest], [r.sigma[OUTPUT_HIST] * np.sqrt(k) for r in rest],
                       0.0, rng, n_boot, n_site_y.sum(), [r.holdout_counts().sum() for r in rest])
             for o in range(k_out)]
    row["p_bbsd"] = min(1.0, k_out * min(p for p, _ in blind))
    row["tv_bbsd"] = max(tv for _, tv in blind)

    # label shift
    p_label, _ = hist_test(site.label_counts, site.sigma[LABEL_COUNTS], [r.label_counts for r in rest],
                           [r.sigma[LABEL_COUNTS] for r in rest], mc, rng, n_boot)
    row["p_label"] = p_label
    rest_cond = imputed_sum(rest)
    rest_cond_sigma = float(np.sqrt(sum(r.sigma[OUTPUT_HIST] ** 2 for r in rest)))
    everyone = np.sum([np.clip(s.output_hist, 0.0, None) for s in [site, *rest]], axis=0).sum(0)
    target = np.stack([impute_suppressed(site.output_hist[:, o].sum(0), site.holdout_counts().sum(), everyone[o])
                       for o in range(k_out)])  # label-blind: only the holdout's total is used
    pi, lo, hi = mlls_interval(target, site.sigma[OUTPUT_HIST] * np.sqrt(k), rest_cond, rest_cond_sigma, rng,
                               n_boot=min(200, n_boot))
    bbse = bbse_prior(site.confusion.sum(0), np.sum([r.confusion for r in rest], axis=0))
    prior_site = _normalise(site.label_counts)
    prior_rest = _normalise(np.sum([r.label_counts for r in rest], axis=0))
    for y in range(k):
        row.update({f"prior_site_{y}": prior_site[y], f"prior_rest_{y}": prior_rest[y], f"prior_mlls_{y}": pi[y],
                    f"prior_mlls_lo_{y}": lo[y], f"prior_mlls_hi_{y}": hi[y], f"prior_bbse_{y}": bbse[y]})
    row["label_shift_l1"] = float(np.abs(pi - prior_rest).sum())

    # MMD on the random-feature means (effect sizes)
    rest_var = sum(r.sigma[RFF_SUM] ** 2 for r in rest)
    n_rest_y = np.sum([r.holdout_counts() for r in rest], axis=0)
    rest_rff = np.sum([r.rff_sum for r in rest], axis=0)
    row["mmd2"] = _mmd2(site.rff_sum.sum(0), n_site_y.sum(), rest_rff.sum(0), n_rest_y.sum(),
                        site.sigma[RFF_SUM] * np.sqrt(k), rest_var * k)
    per_label = [_mmd2(site.rff_sum[y], n_site_y[y], rest_rff[y], n_rest_y[y], site.sigma[RFF_SUM], rest_var)
                 for y in range(k)]
    row["mmd2_cond"] = float(np.average(per_label, weights=n_site_y + 1e-9))

    # acquisition drift
    row["p_intensity"], row["tv_intensity"] = hist_test(site.intensity, site.sigma[INTENSITY_HIST],
                                                        [r.intensity for r in rest],
                                                        [r.sigma[INTENSITY_HIST] for r in rest], mc, rng, n_boot)
    row["p_scanner"], row["tv_scanner"] = hist_test(site.manufacturers, site.sigma[MANUFACTURERS],
                                                    [r.manufacturers for r in rest],
                                                    [r.sigma[MANUFACTURERS] for r in rest], mc, rng, n_boot)
    covariate, label = row["p_covariate"] < alpha, p_label < alpha
    row["shift"] = {(False, False): "none", (True, False): "covariate", (False, True): "label",
                    (True, True): "both"}[(bool(covariate), bool(label))]
    return row


def consortium_summary(stats: list[ShiftStats], run_config: RunConfig | Mapping[str, Any], server_round: int) -> dict:
    """What a new site needs to adapt (client/adapt.py): pooled per-label output histograms, confusion and
    label counts, with the noise std of each pooled table. All of it is post-processing of releases."""
    train = run_config_of(run_config).train
    return {
        "round": server_round,
        "sites": [s.site for s in stats],
        "model": train.model,
        NUM_CLASSES: stats[0].k,
        "image_size": train.image_size,
        "in_channels": train.in_channels,
        "logodds_edges": LOGODDS_EDGES.tolist(),
        OUTPUT_HIST: imputed_sum(stats).tolist(),
        "output_hist_sigma": float(np.sqrt(sum(s.sigma[OUTPUT_HIST] ** 2 for s in stats))),
        CONFUSION: np.sum([s.confusion for s in stats], axis=0).tolist(),
        LABEL_COUNTS: np.sum([s.label_counts for s in stats], axis=0).tolist(),
    }


def plot_shift(path: Path, server_round: int, stats: dict[str, ShiftStats], rows: list[dict]) -> None:
    """Per site: its per-label log-odds histograms against the rest's, and its prior estimates."""
    sites = [r["site"] for r in rows if r["status"] == "ok"]
    if not sites:
        return
    fig, axes = plt.subplots(len(sites), 2, figsize=(10, 2.6 * len(sites)), squeeze=False)
    centres = np.concatenate([[LOGODDS_EDGES[0] - 0.5], (LOGODDS_EDGES[:-1] + LOGODDS_EDGES[1:]) / 2,
                              [LOGODDS_EDGES[-1] + 0.5]])
    for ax_row, name in zip(axes, sites):
        row = next(r for r in rows if r["site"] == name)
        site = stats[name]
        rest = np.sum([s.output_hist for n, s in stats.items() if n != name], axis=0)
        ax = ax_row[0]
        for y in range(site.k):
            colour = f"C{y}"
            ax.plot(centres, _normalise(site.output_hist[y, 0]), color=colour, label=f"site, label {y}")
            ax.plot(centres, _normalise(rest[y, 0]), color=colour, ls="--", label=f"rest, label {y}")
        ax.set_title(f"{name}: p_covariate={row['p_covariate']:.3g}  MMD²={row['mmd2']:.2g}", fontsize=9)
        ax.set_xlabel("log-odds of the global model (output 0)", fontsize=8)
        ax.legend(fontsize=6)
        ax = ax_row[1]
        ks = range(site.k)
        est = np.array([row[f"prior_mlls_{y}"] for y in ks])
        err = np.array([[est[y] - row[f"prior_mlls_lo_{y}"] for y in ks], [row[f"prior_mlls_hi_{y}"] - est[y]
                                                                           for y in ks]])
        x = np.arange(site.k)
        ax.bar(x - 0.3, [row[f"prior_rest_{y}"] for y in ks], 0.2, label="rest (labels)")
        ax.bar(x - 0.1, [row[f"prior_site_{y}"] for y in ks], 0.2, label="site (labels)")
        ax.bar(x + 0.1, est, 0.2, yerr=np.clip(err, 0, None), label="site MLLS (unlabelled) 95%")
        ax.bar(x + 0.3, [row[f"prior_bbse_{y}"] for y in ks], 0.2, label="site BBSE")
        ax.set_xticks(x, [f"label {y}" for y in ks])
        ax.set_title(f"prior: p_label={row['p_label']:.3g}  shift: {row['shift']}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"dataset shift, round {server_round} (each site vs the pooled rest)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def analyse_shift(out_dir: Path, server_round: int, releases: list[SiteRelease],
                  run_config: RunConfig | Mapping[str, Any]) -> None:
    """Append this round's rows to shift.csv (a rerun round replaces its rows), redraw shift.png,
    write shift_consortium.json."""
    out_dir = Path(out_dir)
    cfg = run_config_of(run_config)
    stats = {r.site: ShiftStats.from_record(r.site, r.records[STAT_SHIFT]) for r in releases
             if r.status == "ok" and STAT_SHIFT in r.records}
    rng = np.random.default_rng([cfg.train.seed, server_round, 44])
    n_boot, alpha = cfg.shift.bootstrap, cfg.shift.alpha
    rows = []
    for rel in releases:
        row = {"round": server_round, "site": rel.site, "status": rel.status, "epsilon": rel.epsilon}
        if rel.site in stats and len(stats) >= 2:
            site = stats[rel.site]
            row.update(n_labelled=float(np.clip(site.label_counts, 0, None).sum()),
                       n_holdout=float(site.holdout_counts().sum()))
            row.update(compare_site(site, [s for n, s in stats.items() if n != rel.site], rng, n_boot, alpha))
        elif rel.status == "ok":
            row["status"] = "no comparison (fewer than 2 sites released)"
        rows.append(row)
    path = out_dir / SHIFT_CSV
    table = pd.DataFrame(rows)
    if path.exists():
        old = pd.read_csv(path)
        table = pd.concat([old[old["round"] != server_round], table], ignore_index=True)
    table.to_csv(path, index=False)
    if len(stats) >= 2:
        plot_shift(out_dir / SHIFT_PNG, server_round, stats, rows)
    if stats:
        summary = consortium_summary(list(stats.values()), cfg, server_round)
        (out_dir / SHIFT_CONSORTIUM_JSON).write_text(json.dumps(summary, indent=1) + "\n")
