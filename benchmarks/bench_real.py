"""Federated training on real public images (MedMNIST), in-process: DP-SGD vs no DP, federated vs local-only vs
centralised, IID vs Dirichlet label skew, several seeds.

    .venv/bin/python benchmarks/bench_real.py --benefit            # the default grid below (~6 min, 1 thread)
    .venv/bin/python benchmarks/bench_real.py --methods cnn,scatter,scatter-linear --epsilons inf,8,3,1 \\
        --partitions iid,dir0.5 --modes fed,local,central --seeds 0,1,2 --benefit

What it does, per (set, partition, seed): the set's official train+val rows are divided among K sites with
`simulations.partition.assign_sites` (the code `equifed-partition` runs: IID, or Dirichlet(alpha) label skew drawn
per class and split, seeded by the seed); each site trains on its train rows; its val rows are its own test part
(under label skew they follow the site's label mix); the official test split is the global holdout. Then, per
(method, epsilon, mode), with the method's settings: the project's defaults without DP, `DP_RECIPE` (below;
`--no-recipe`: the defaults) under DP, then `-c`, `--dp-config` and `--method-config` on top:

The training is `simulations.baselines` (what `equifed-simulate --baselines` runs), with every draw seeded:

* `fed`: a loop of rounds without Flower or Ray. Each site trains a fresh copy of the global model with the
  project's own functions (`client.dp.plan_dp` + `client.dp.train_dp` charging a `client.ledger.PrivacyLedger`
  opened in a temporary folder per site at delta = `client.policy.default_delta(train + val patients)`, the site's
  patient count noised once (std 20) and its test-patient count too, as the client does; `train_epochs` without
  DP), and the server averages the returned state dicts weighted by the (noised, under DP) patient counts: FedAvg,
  or with `-c server_opt=fedavgm|fedadam` a server optimizer on the averaged update (post-processing: no privacy
  cost). `-c avg_last=K` scores the mean of the last K global models (also post-processing). Every ledger's
  epsilon is checked against the target at the end (the run stops if one is over).
* `local`: each site alone, the same rounds x local epochs, its own ledger (same plan, so the same spend).
* `central`: the sites' training rows pooled in one place, the same rounds x epochs (one ledger, its own delta).

Scores: holdout AUROC, accuracy at 0.5 (argmax: what the deployed model predicts), accuracy at the
prevalence-matched threshold (`acc_prev`: the top pi fraction of holdout scores called class 1, pi = the training
prevalence of class 1: ranks only, so it says what a recalibrated threshold could give; it reads the holdout's
score distribution, no labels), ECE and Brier score (metrics.csv's: core_models.calibration; before Session 18
this benchmark had its own, 10 ECE bins and a Brier score summed over both classes, twice the binary one); the global
model on each site's own part; and (`--benefit`) the per-site benefit of joining: local-only vs federated, on the
holdout and on the site's own part.

Methods: `cnn`, `scatter`, `resnet` (its residual blocks work out of place, so it trains under DP-SGD) and
`scatter-linear` (`core_models.networks.build_model`; scatter-linear: kymatio's fixed scattering transform, J=2,
8 angles, OrderNorm and one linear layer on the coefficients average-pooled to `pool` x `pool`, Tramer & Boneh
(2021)'s ScatterNet + linear model; `-c norm=gn9` puts ScatterNet's GroupNorm(9, 81) in OrderNorm's place), and
`scatter-order`, the project's ScatterNet with OrderNorm in place of its GroupNorm(9, 81). `--epsilons` takes `inf` (no DP) and
`clip` (DP-SGD's clipping and sampling without noise: an ablation that shows what the noise costs).
`--method-config METHOD:KEY=VALUE` overrides one method's settings (e.g. `scatter-linear:lr=0.25`); `-c KEY=VALUE`
every method's (keys: the fields of `Settings`); `--dp-config KEY=VALUE` every method's DP runs.

Randomness: under DP the Poisson draws and the noise come from generators seeded from the seed (the client seeds
them from OS entropy; same distribution, but a benchmark should repeat). Initial weights, shuffling and the
partition follow the seed. One thread (`torch.set_num_threads(1)`).

Wall time on the 2-core machine (1 thread; benchmarks/RESULTS.md "Session 17"): the default invocation
(scatter-linear and cnn, epsilon 8 and inf, IID and Dirichlet(0.5), fed + local + central, 3 seeds): 349 s,
120 runs, figures identical to the grid's (the seeds fix everything). One
federated DP run (3 sites, 20 rounds): scatter-linear ~10-15 s, cnn and scatter ~10-20 s, resnet ~80 s. The grid
of RESULTS.md (scatter-linear, scatter, cnn x epsilon 8, 3, 1, inf x fed, local, central x 3 seeds) took 18-19 min
per partition, the two partitions run side by side; resnet adds ~6 min per partition and epsilon for fed alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core_models.config import RECIPES  # noqa: E402
from core_models.networks import SCATTER_CACHE, OrderNorm, ScatterLinear, build_model  # noqa: E402
from core_models.training import make_loader, predict_proba  # noqa: E402
from simulations import baselines  # noqa: E402
from simulations.baselines import CLIP_ONLY, Training  # noqa: E402
from simulations.partition import assign_sites, load_npz_source  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Settings:
    """One method's training settings (the run-config keys they stand for in brackets)."""

    rounds: int = 10                 # num-server-rounds
    local_epochs: int = 2            # local-epochs
    lr: float = 0.002                # learning-rate
    optimizer: str = "adam"          # optimizer: adam | sgd (momentum 0.9)
    batch_size: int = 16             # batch-size (the logical batch under DP)
    physical_batch_size: int = 64    # physical-batch-size (memory only)
    max_grad_norm: float = 1.0       # max-grad-norm
    weight_decay: float = 1e-4       # weight-decay
    freeze: str = "none"             # freeze: none | encoder
    server_opt: str = "fedavg"       # strategy: fedavg | fedavgm | fedadam
    server_lr: float = 1.0           # server learning rate (fedavgm, fedadam)
    server_momentum: float = 0.9     # fedavgm's momentum; fedadam's beta1
    avg_last: int = 1                # score the mean of the last K global models (1 = the last)
    pool: int = 7                    # scatter-linear only: coefficients average-pooled to pool x pool
    norm: str = "order"              # scatter-linear only: order (OrderNorm) | gn9 (GroupNorm(9, 81))

    def training(self, eps: float) -> Training:
        """What simulations.baselines trains with: these settings at `eps` (inf: no DP; CLIP_ONLY: no noise)."""
        return Training(rounds=self.rounds, local_epochs=self.local_epochs, lr=self.lr, optimizer=self.optimizer,
                        batch_size=self.batch_size, weight_decay=self.weight_decay, epsilon=eps,
                        max_grad_norm=self.max_grad_norm, physical_batch_size=self.physical_batch_size,
                        freeze=self.freeze)

    def override(self, items: list[str]) -> "Settings":
        out = copy.copy(self)
        fields = {f.name: f.type for f in dataclasses.fields(self)}
        for item in items:
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            aliases = {"learning_rate": "lr", "num_server_rounds": "rounds", "strategy": "server_opt"}
            key = aliases.get(key, key)
            if key not in fields:
                raise SystemExit(f"unknown setting {key!r}; choose from {sorted(fields)}")
            kind = type(getattr(self, key))
            setattr(out, key, kind(value))
        return out


# the settings each method starts from (before -c, --dp-config and --method-config): the project defaults
METHOD_DEFAULTS: dict[str, list[str]] = {
    "cnn": [],
    "scatter": [],
    "resnet": [],
    "scatter-linear": [],
    "scatter-order": [],
}
# what a method trains with under DP (finite epsilon) unless overridden: what dp = true trains scatter-linear with
# (core_models.config.RECIPES; RESULTS.md Session 17), 20 rounds. Full-batch DP-GD: batch 256 >= a hospital's
# patient count, so q = 1 and one noised step per local epoch; one local epoch a round (FedSGD: no client drift under
# label skew); plain SGD (its momentum restarts every round, so each round is one gradient step), learning rate 0.5
# on the clipped (C = 1) mean gradient.
_DP = RECIPES[("scatter-linear", True)]
RECIPE = [f"optimizer={_DP.optimizer}", f"lr={_DP.learning_rate}", f"batch_size={_DP.batch_size}",
          "physical_batch_size=64", f"local_epochs={_DP.local_epochs}", "rounds=20", "max_grad_norm=1.0"]
DP_RECIPE: dict[str, list[str]] = {
    "cnn": RECIPE,
    "scatter": RECIPE,
    "resnet": RECIPE,
    "scatter-linear": RECIPE,
    "scatter-order": RECIPE,
}


# ----------------------------------------------------------------------------------------------------------------
# the networks


def make_model(method: str, num_classes: int = 2, pool: int = 7, norm: str = "order") -> nn.Module:
    """build_model's network, or a variant: scatter-linear with `pool` x `pool` pooled coefficients and `norm`
    "gn9" (ScatterNet's GroupNorm(9, 81), 162 trained parameters) in place of OrderNorm; scatter-order, ScatterNet
    with OrderNorm in place of its GroupNorm(9, 81)."""
    if method == "scatter-linear":
        model = ScatterLinear(num_classes, pool=pool)
        if norm not in ("order", "gn9"):
            raise SystemExit(f"unknown norm {norm!r}; choose order or gn9")
        if norm == "gn9":
            model.norm = nn.GroupNorm(9, 81)
    elif method == "scatter-order":
        model = build_model("scatter", num_classes)
        model.norm = OrderNorm()
    else:
        model = build_model(method, num_classes)
    return model


def fresh_copy(method: str, state: dict, num_classes: int) -> nn.Module:
    """A new module holding `state` (Opacus wraps a module once: every round trains a fresh one, as sites do)."""
    head = state.get("head.weight")
    pool = round(math.sqrt(head.shape[1] / 81)) if method == "scatter-linear" else 7
    norm = "gn9" if "norm.weight" in state else "order"
    model = make_model(method, num_classes, pool, norm)
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------------------------------------------
# data


Site = baselines.SiteRows  # a site's training rows and its own test part (its val rows)


@dataclass
class Federation:
    set_name: str
    partition: str
    seed: int
    sites: list[Site]
    x_hold: np.ndarray
    y_hold: np.ndarray
    num_classes: int


def data_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".npz" and path.exists():
        return path
    return DATA / f"{name}.npz"


def load_federation(set_name: str, partition: str, k: int, seed: int, min_per_site: int = 10) -> Federation:
    """Partition a MedMNIST set as `equifed-partition` does (same functions, same seed meaning)."""
    alpha = None if partition == "iid" else float(partition.removeprefix("dir"))
    frame, images = load_npz_source(data_path(set_name))
    if images["train"].shape[1] != 1:
        raise ValueError(f"{set_name} has {images['train'].shape[1]}-channel images; this benchmark's networks are "
                         f"grey (one channel)")
    site_of = assign_sites(frame, k, alpha, seed, min_per_site, unit="image").to_numpy()
    sites = []
    for j in range(k):
        rows = frame[site_of == j]
        tr, va = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
        sites.append(Site(
            name=f"site_{j + 1}",
            x=images["train"][tr["source_index"].to_numpy()], y=tr["label"].to_numpy().astype(np.int64),
            x_own=images["val"][va["source_index"].to_numpy()], y_own=va["label"].to_numpy().astype(np.int64),
            n_manifest=len(rows), own_split="val"))
    test = frame[frame["split"] == "test"]
    return Federation(set_name, partition, seed, sites, images["test"][test["source_index"].to_numpy()],
                      test["label"].to_numpy().astype(np.int64), int(frame["label"].max()) + 1)


# ----------------------------------------------------------------------------------------------------------------
# metrics


def scores(model: nn.Module, x: np.ndarray, y: np.ndarray, prevalence: float) -> dict[str, float]:
    """simulations.baselines.scores (AUROC, accuracy, ECE, Brier: metrics.csv's), with accuracy at the
    prevalence-matched threshold and the mean p(class 1) (binary tasks)."""
    out = baselines.scores(model, x, y)
    out["acc"] = out["accuracy"]
    out["acc_prev"] = out["mean_p1"] = math.nan
    probs = predict_proba(model, make_loader(x, y, 256), torch.device("cpu"))
    if probs.shape[1] == 2:
        p1 = probs[:, 1]
        k = int(round(prevalence * len(y)))  # the top k scores called class 1
        called = np.zeros(len(y), dtype=bool)
        called[np.argsort(-p1, kind="stable")[:k]] = True
        out["acc_prev"] = float(np.mean(called == (y == 1)))
        out["mean_p1"] = float(p1.mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# training


class ServerOpt:
    """FedAvg, FedAvgM (Hsu et al. 2019) or FedAdam (Reddi et al. 2021) on the averaged update."""

    def __init__(self, s: Settings):
        self.s, self.m, self.v = s, {}, {}

    def step(self, current: dict, averaged: dict) -> dict:
        if self.s.server_opt == "fedavg":
            return averaged
        out = {}
        for key, g in current.items():
            if not torch.is_floating_point(g):
                out[key] = averaged[key]
                continue
            d = averaged[key] - g
            if self.s.server_opt == "fedavgm":
                self.m[key] = self.s.server_momentum * self.m.get(key, torch.zeros_like(d)) + d
                out[key] = g + self.s.server_lr * self.m[key]
            elif self.s.server_opt == "fedadam":
                b1, b2, tau = self.s.server_momentum, 0.99, 1e-3
                self.m[key] = b1 * self.m.get(key, torch.zeros_like(d)) + (1 - b1) * d
                self.v[key] = b2 * self.v.get(key, torch.zeros_like(d)) + (1 - b2) * d * d
                out[key] = g + self.s.server_lr * self.m[key] / (self.v[key].sqrt() + tau)
            else:
                raise SystemExit(f"unknown server optimizer {self.s.server_opt!r}")
        return out


def run_fed(fed: Federation, method: str, s: Settings, eps: float, work: Path, seed: int) -> dict:
    """FedAvg over the sites (simulations.baselines.run_federated, draws seeded by `seed`); returns the final (or
    averaged) global state, per-round holdout AUROC, spends."""
    torch.manual_seed(seed)
    make = functools.partial(make_model, method, fed.num_classes, s.pool, s.norm)
    res = baselines.run_federated(make, make().state_dict(), fed.sites, s.training(eps), work, seed,
                                  server_step=ServerOpt(s).step, keep_last=s.avg_last,
                                  holdout=(fed.x_hold, fed.y_hold), noise_seed=seed)
    res["prevalence"] = float(np.mean(np.concatenate([site.y for site in fed.sites]) == 1))
    return res


def run_alone(method: str, x: np.ndarray, y: np.ndarray, n_own: int, n_manifest: int, s: Settings, eps: float,
              folder: Path, seed: int, num_classes: int) -> dict:
    """One site alone (or the pooled data): the same rounds x epochs (simulations.baselines.run_alone)."""
    torch.manual_seed(seed)
    make = functools.partial(make_model, method, num_classes, s.pool, s.norm)
    res = baselines.run_alone(make, make().state_dict(), x, y, n_own, n_manifest, s.training(eps), folder, seed,
                              noise_seed=seed)
    return {**res, "spent": [res["spent"]]}


# ----------------------------------------------------------------------------------------------------------------
# the grid


def evaluate_all(fed: Federation, method: str, state: dict, prevalence: float) -> dict:
    model = fresh_copy(method, state, fed.num_classes)
    out = {"holdout": scores(model, fed.x_hold, fed.y_hold, prevalence)}
    for site in fed.sites:
        out[site.name] = scores(model, site.x_own, site.y_own, float(np.mean(site.y == 1)))
    return out


def run_cell(fed: Federation, method: str, s: Settings, eps: float, modes: list[str], seed: int) -> list[dict]:
    rows = []
    base = dict(set=fed.set_name, partition=fed.partition, seed=seed, method=method, eps=eps,
                settings=dataclasses.asdict(s))
    prevalence = float(np.mean(np.concatenate([site.y for site in fed.sites]) == 1))
    with tempfile.TemporaryDirectory(prefix="equifed-bench-real-") as tmp:
        work = Path(tmp)
        if "fed" in modes:
            start = time.perf_counter()
            res = run_fed(fed, method, s, eps, work / "fed", seed)
            rows.append({**base, "mode": "fed", "wall_s": time.perf_counter() - start, "curve": res["curve"],
                         "spent": res["spent"], "sigma": res["sigma"],
                         **evaluate_all(fed, method, res["state"], prevalence)})
        if "local" in modes:
            for j, site in enumerate(fed.sites):
                start = time.perf_counter()
                res = run_alone(method, site.x, site.y, len(site.y_own), site.n_manifest, s, eps,
                                work / "local" / site.name, seed * 100 + j, fed.num_classes)
                rows.append({**base, "mode": f"local:{site.name}", "wall_s": time.perf_counter() - start,
                             "spent": res["spent"], "sigma": res["sigma"],
                             **evaluate_all(fed, method, res["state"], float(np.mean(site.y == 1)))})
        if "central" in modes:
            start = time.perf_counter()
            x = np.concatenate([site.x for site in fed.sites])
            y = np.concatenate([site.y for site in fed.sites])
            n_own = sum(len(site.y_own) for site in fed.sites)
            res = run_alone(method, x, y, n_own, sum(site.n_manifest for site in fed.sites), s, eps,
                            work / "central", seed, fed.num_classes)
            rows.append({**base, "mode": "central", "wall_s": time.perf_counter() - start, "spent": res["spent"],
                         "sigma": res["sigma"], **evaluate_all(fed, method, res["state"], prevalence)})
    for row in rows:
        spent = max(row["spent"])
        if math.isfinite(eps) and eps != CLIP_ONLY and spent > eps + 1e-6:
            raise SystemExit(f"{method} {row['mode']}: a ledger holds epsilon {spent:.3f} > target {eps:g}")
    return rows


def eps_label(eps: float) -> str:
    return "clip" if eps == CLIP_ONLY else f"{eps:g}"


def fmt(values: list[float], digits: int = 3) -> str:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def summarise(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        mode = "local (mean of sites)" if row["mode"].startswith("local:") else row["mode"]
        groups[(row["set"], row["partition"], row["method"], row["eps"], mode)].append(row)
    print("\nholdout (official test split); mean ± sd over seeds (local: over sites x seeds)")
    print("| set | partition | method | eps | mode | n | AUROC | acc@0.5 | acc@prev | ECE | Brier | mean p1 | "
          "site-part AUROC | eps spent (max) | sigma | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (set_name, part, method, eps, mode), grp in groups.items():
        h = [r["holdout"] for r in grp]
        own = [np.nanmean([r[k]["auroc"] for k in r if k.startswith("site_")]) for r in grp]
        spent = max(max(r["spent"]) for r in grp)
        print(f"| {set_name} | {part} | {method} | {eps_label(eps)} | {mode} | {len(grp)} | "
              f"{fmt([x['auroc'] for x in h])} | "
              f"{fmt([x['acc'] for x in h])} | {fmt([x['acc_prev'] for x in h])} | {fmt([x['ece'] for x in h])} | "
              f"{fmt([x['brier'] for x in h])} | {fmt([x['mean_p1'] for x in h], 2)} | {fmt(own)} | "
              f"{spent:.2f} | {np.mean([r['sigma'] for r in grp]):.2f} | {np.mean([r['wall_s'] for r in grp]):.0f} |")


def benefit_table(rows: list[dict]) -> None:
    """Per site: its local-only model vs the federated model, on the holdout and on its own part."""
    by_key: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        key = (row["set"], row["partition"], row["method"], row["eps"])
        by_key[key][row["mode"]].append(row)
    print("\nbenefit of joining: each site's local-only model vs the federated model (AUROC; mean over seeds)")
    print("| set | partition | method | eps | site | n train (share class 1) | holdout local | holdout fed | "
          "own part local | own part fed | own acc local | own acc fed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, modes in by_key.items():
        if "fed" not in modes:
            continue
        for mode, grp in sorted(modes.items()):
            if not mode.startswith("local:"):
                continue
            site = mode.split(":", 1)[1]
            fed = modes["fed"]
            n = f"{np.mean([r['n_train'][site] for r in grp]):.0f} ({np.mean([r['share1'][site] for r in grp]):.2f})"
            print(f"| {key[0]} | {key[1]} | {key[2]} | {eps_label(key[3])} | {site} | {n} | "
                  f"{fmt([r['holdout']['auroc'] for r in grp])} | {fmt([r['holdout']['auroc'] for r in fed])} | "
                  f"{fmt([r[site]['auroc'] for r in grp])} | {fmt([r[site]['auroc'] for r in fed])} | "
                  f"{fmt([r[site]['acc'] for r in grp])} | {fmt([r[site]['acc'] for r in fed])} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="breastmnist", help="MedMNIST .npz names in ../shared/data (or paths)")
    parser.add_argument("--partitions", default="iid,dir0.5", help="iid and/or dirALPHA (Dirichlet label skew)")
    parser.add_argument("-k", "--sites", type=int, default=3)
    parser.add_argument("--methods", default="scatter-linear,cnn", help=f"of {sorted(METHOD_DEFAULTS)}")
    parser.add_argument("--epsilons", default="8,inf")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default="fed,local,central", help="fed, local, central")
    parser.add_argument("-c", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every method (rounds, local_epochs, lr, optimizer, batch_size, ...)")
    parser.add_argument("--dp-config", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every method's DP runs (finite epsilon) only")
    parser.add_argument("--no-recipe", action="store_true", help="DP runs start from the project defaults, "
                        "not DP_RECIPE")
    parser.add_argument("--method-config", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--benefit", action="store_true", help="print the per-site benefit-of-joining table")
    parser.add_argument("--curves", action="store_true", help="print each federated run's holdout AUROC per round")
    parser.add_argument("--json", default=None, help="write every row (per seed, mode) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for message in ("Secure RNG turned off", "Optimal order is the", "Full backward hook is firing"):
        warnings.filterwarnings("ignore", message=message)

    methods = args.methods.split(",")
    unknown = set(methods) - set(METHOD_DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {sorted(METHOD_DEFAULTS)}")
    per_method: dict[str, list[str]] = defaultdict(list)
    for item in args.method_config:
        method, _, setting = item.partition(":")
        per_method[method].append(setting)

    def settings_for(method: str, eps: float) -> Settings:
        dp = [] if math.isinf(eps) else ([] if args.no_recipe else DP_RECIPE[method]) + args.dp_config
        return Settings().override(METHOD_DEFAULTS[method] + dp + args.overrides + per_method[method])

    epsilons = [CLIP_ONLY if v == "clip" else float(v) for v in args.epsilons.split(",")]
    settings = {(m, e): settings_for(m, e) for m in methods for e in epsilons}
    modes = args.modes.split(",")
    rows: list[dict] = []
    start = time.perf_counter()
    for set_name in args.sets.split(","):
        for part in args.partitions.split(","):
            for seed in (int(v) for v in args.seeds.split(",")):
                try:
                    fed = load_federation(set_name, part, args.sites, seed)
                except (ValueError, OSError) as err:
                    print(f"{set_name}: skipped ({err})", flush=True)
                    break
                SCATTER_CACHE.clear()
                for method in methods:
                    for eps in epsilons:
                        cell = run_cell(fed, method, settings[method, eps], eps, modes, seed)
                        for row in cell:
                            row["n_train"] = {s.name: len(s.y) for s in fed.sites}
                            row["share1"] = {s.name: float(np.mean(s.y == 1)) for s in fed.sites}
                            h = row["holdout"]
                            print(f"{set_name} {part} seed {seed} {method} eps {eps_label(eps)} {row['mode']}: AUROC "
                                  f"{h['auroc']:.3f} acc {h['acc']:.3f} acc@prev {h['acc_prev']:.3f} "
                                  f"p1 {h['mean_p1']:.2f} eps spent {max(row['spent']):.2f} "
                                  f"({row['wall_s']:.0f} s)", flush=True)
                            if args.curves and "curve" in row:
                                print("   rounds: " + " ".join(f"{a:.3f}" for a in row["curve"]), flush=True)
                        rows.extend(cell)
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f} s; settings per method:")
    for (m, e), s in settings.items():
        print(f"  {m} eps {eps_label(e)}: {dataclasses.asdict(s)}")
    summarise(rows)
    if args.benefit:
        benefit_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
