"""What a hospital gains by joining: each site's model trained alone and one trained on the pooled sites, beside
the federated model, on the holdout and on each site's own rows.

Simulation only: pooling the sites' training rows is allowed there, never in a deployment. Everything runs in
this process with the project's own training (`core_models.training.train_epochs`; under DP
`client.dp.plan_dp` + `client.dp.train_dp`, charging a `client.ledger.PrivacyLedger` of its own in a scratch
folder, its patient counts noised once as the client noises them: the sites' real ledgers are never touched). Each
round trains a fresh module from the last state, as a site trains a fresh copy of the global model, so local-only
and centralised training see the same rounds x local epochs, optimiser steps and DP plan as a site in the run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from client.dp import DPPlan, DPSettings, PatientData, plan_dp, train_dp
from client.ledger import PrivacyLedger
from client.policy import default_delta
from client.session import COUNT_NOISE  # the std of the patient counts a site noises once
from core_models.calibration import probability_metrics
from core_models.config import RunConfig
from core_models.pretrained import freeze, frozen_part
from core_models.training import auroc, make_loader, predict_proba, train_epochs

CLIP_ONLY = 0.0  # epsilon 0: DP-SGD's clipping and sampling without noise (an ablation, no guarantee)
MODES = ("local", "central")  # what --baselines may ask for
BASELINES_CSV = "baselines.csv"

Factory = Callable[[], nn.Module]  # a fresh module of the run's network
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Training:
    """How every round of a baseline trains (the run-config keys in brackets)."""

    rounds: int                     # num-server-rounds
    local_epochs: int               # local-epochs
    lr: float                       # learning-rate
    optimizer: str                  # optimizer
    batch_size: int                 # batch-size (the logical, privacy batch under DP)
    weight_decay: float = 1e-4      # weight-decay
    epsilon: float = math.inf       # target-epsilon under dp = true; inf: no DP
    max_grad_norm: float = 1.0      # max-grad-norm
    physical_batch_size: int = 64   # physical-batch-size (memory only)
    freeze: str = "none"            # freeze
    unfreeze_after: int = 0         # unfreeze-after

    @classmethod
    def of(cls, cfg: RunConfig) -> Training:
        """The run's own settings (its "auto" keys resolved)."""
        t = cfg.train
        return cls(rounds=cfg.server.num_rounds, local_epochs=t.local_epochs, lr=t.learning_rate,
                   optimizer=t.optimizer, batch_size=t.batch_size, weight_decay=t.weight_decay,
                   epsilon=cfg.dp.target_epsilon if cfg.dp.enabled else math.inf,
                   max_grad_norm=cfg.dp.max_grad_norm, physical_batch_size=cfg.dp.physical_batch_size,
                   freeze=t.freeze, unfreeze_after=t.unfreeze_after)

    @property
    def dp(self) -> bool:
        return not math.isinf(self.epsilon)


@dataclass(frozen=True, eq=False)
class SiteRows:
    """A site's images: its training rows and its own test rows (a site's view of how a model serves it)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    x_own: np.ndarray
    y_own: np.ndarray
    n_manifest: int                         # patients its manifest names: what the site's delta is sized from
    patients: np.ndarray | None = None      # each training row's patient id (None: one image a patient)
    own_split: str = "test"                 # which split the own rows are


class _NoLedger:
    """The ledger of a clip-only run: nothing to charge (no noise, no guarantee)."""

    delta = 0.0

    def optimizer_hook(self, *args, **kwargs):
        return lambda optimizer: None

    def check_budget(self, mechanisms) -> None:
        pass

    def epsilon(self) -> float:
        return math.inf


class DPSite:
    """A scratch ledger in `folder` (at the site's default delta), the noised training- and test-patient counts
    charged to it, and the DP plan, as `client.app.train` builds them. `rng` draws the counts' noise (None: OS
    entropy; a benchmark that must repeat passes its own)."""

    def __init__(self, folder: Path, name: str, n_train: int, n_own: int, n_manifest: int, training: Training,
                 rng: np.random.Generator | None = None):
        if training.epsilon == CLIP_ONLY:
            self.ledger, self.n_noised = _NoLedger(), float(n_train)
            q = min(1.0, training.batch_size / n_train)
            self.plan = DPPlan(noise_multiplier=0.0, sample_rate=q, expected_batch_size=q * n_train,
                               steps_per_round=training.local_epochs * max(1, math.ceil(1 / q)))
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.ledger = PrivacyLedger.open(folder, delta=default_delta(n_manifest), fingerprint=f"baseline-{name}")
        release = (COUNT_NOISE, 1.0, 1)
        noised = self.ledger.noised_once("train-patients", [float(n_train)], 1.0, COUNT_NOISE,
                                         label="train-patient-count", rng=rng)
        self.ledger.noised_once("test-patients", [float(n_own)], 1.0, COUNT_NOISE, label="test-patient-count",
                                rng=rng)
        self.n_noised = max(2.0, float(np.round(noised[0])))
        self.plan = plan_dp(self.n_noised, training.batch_size, training.local_epochs, training.rounds,
                            training.epsilon, self.ledger.delta, one_off=[release, release])

    def spent(self) -> float:
        return self.ledger.epsilon()


def train_round(model: nn.Module, x: np.ndarray, y: np.ndarray, training: Training, dp: DPSite | None, rnd: int,
                seed: int, patients: np.ndarray | None = None, noise_seed: int | None = None) -> None:
    """One round of a site's local training on `model`, in place. Shuffling follows `seed`; under DP the Poisson
    draws and the noise come from OS entropy, or from `noise_seed` (benchmarks and tests that must repeat)."""
    freeze(model, frozen_part(training.freeze, training.unfreeze_after, rnd))
    if dp is None:
        loader = make_loader(x, y, training.batch_size, shuffle=True, seed=seed * 1000 + rnd)
        train_epochs(model, loader, epochs=training.local_epochs, optimizer=training.optimizer, lr=training.lr,
                     weight_decay=training.weight_decay, device=torch.device("cpu"))
        return
    dp.ledger.check_budget([dp.plan.mechanism])
    seeded = noise_seed is not None
    draws = dict(server_round=rnd, sampling_rng=np.random.default_rng([noise_seed, rnd, 17]) if seeded else None,
                 noise_generator=torch.Generator().manual_seed(noise_seed * 7919 + rnd) if seeded else None)
    settings = DPSettings(max_grad_norm=training.max_grad_norm, physical_batch_size=training.physical_batch_size,
                          optimizer=training.optimizer, lr=training.lr, weight_decay=training.weight_decay)
    train_dp(model, PatientData(x, y, patients), dp.plan, dp.ledger, settings, **draws)


def fresh(make: Factory, state: State) -> nn.Module:
    """A new module holding `state` (Opacus wraps a module once: every round trains a fresh one, as sites do)."""
    model = make()
    model.load_state_dict(state)
    return model


def snapshot(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def average(states: list[State], weights: list[float]) -> State:
    """FedAvg: the weighted mean of the floating-point tensors (the others from the first state)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        if torch.is_floating_point(first):
            out[key] = sum(float(wi) * st[key].float() for wi, st in zip(w, states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def _count_rng(noise_seed: int | None, stream: int) -> np.random.Generator | None:
    return None if noise_seed is None else np.random.default_rng([noise_seed, stream])


def run_alone(make: Factory, initial: State, x: np.ndarray, y: np.ndarray, n_own: int, n_manifest: int,
              training: Training, folder: Path, seed: int, patients: np.ndarray | None = None,
              noise_seed: int | None = None) -> dict:
    """One site alone (or the pooled rows): rounds x local epochs from `initial`, a fresh module each round.
    Under DP every draw (counts, sampling, noise) comes from OS entropy, or from `noise_seed` when given.
    Returns the final state, the epsilon its scratch ledger holds (inf without DP) and the noise multiplier."""
    dp = (DPSite(folder, folder.name, len(y), n_own, n_manifest, training, _count_rng(noise_seed, 98))
          if training.dp else None)
    state = initial
    for rnd in range(1, training.rounds + 1):
        model = fresh(make, state)
        train_round(model, x, y, training, dp, rnd, seed, patients, noise_seed)
        state = snapshot(model)
    return {"state": state, "spent": dp.spent() if dp else math.inf,
            "sigma": dp.plan.noise_multiplier if dp else 0.0}


def run_federated(make: Factory, initial: State, sites: list[SiteRows], training: Training, work: Path, seed: int,
                  *, server_step: Callable[[State, State], State] | None = None, keep_last: int = 1,
                  holdout: tuple[np.ndarray, np.ndarray] | None = None, noise_seed: int | None = None) -> dict:
    """FedAvg over `sites` in this process (no Flower): each round every site trains a fresh copy of the global
    model, and the states are averaged weighted by the (noised, under DP) training-patient counts;
    `server_step(current, averaged)` may move the global model from there (a server optimiser: post-processing).
    Returns the mean of the last `keep_last` global states, each round's holdout AUROC (with `holdout`), each
    site's epsilon and the noise multiplier. Draws under DP: as run_alone's, site j's from noise_seed x 100 + j."""
    count_rng = _count_rng(noise_seed, 99)
    dps = [DPSite(work / site.name, site.name, len(site.y), len(site.y_own), site.n_manifest, training, count_rng)
           if training.dp else None for site in sites]
    weights = [len(site.y) if dp is None else dp.n_noised for site, dp in zip(sites, dps)]
    state, history, curve = initial, [], []
    for rnd in range(1, training.rounds + 1):
        states = []
        for j, (site, dp) in enumerate(zip(sites, dps)):
            model = fresh(make, state)
            train_round(model, site.x, site.y, training, dp, rnd, seed * 100 + j, site.patients,
                        None if noise_seed is None else noise_seed * 100 + j)
            states.append(snapshot(model))
        averaged = average(states, weights)
        state = server_step(state, averaged) if server_step else averaged
        history = (history + [state])[-keep_last:]
        if holdout is not None:
            curve.append(scores(fresh(make, state), *holdout)["auroc"])
    final = average(history, [1.0] * len(history)) if len(history) > 1 else state
    return {"state": final, "curve": curve, "spent": [dp.spent() if dp else math.inf for dp in dps],
            "sigma": dps[0].plan.noise_multiplier if dps and dps[0] else 0.0}


def scores(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUROC (macro one-vs-rest for more classes), accuracy of the argmax, ECE and Brier score: the metrics of
    metrics.csv (core_models.training, core_models.calibration)."""
    if len(y) == 0:
        return {"n": 0, "auroc": math.nan, "accuracy": math.nan, "ece": math.nan, "brier": math.nan}
    probs = predict_proba(model, make_loader(x, y, 256), torch.device("cpu"))
    return {"n": int(len(y)), "auroc": auroc(y, probs), "accuracy": float(np.mean(probs.argmax(1) == y)),
            **probability_metrics(probs, y)}


# ----------------------------------------------------------------------------------------------------------------
# equifed-simulate --baselines


def check_request(modes: list[str], cfg: RunConfig) -> None:
    """--baselines' modes and what the run trains, checked before the run starts (ValueError says why)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--baselines takes a comma-separated list of {list(MODES)}, got {','.join(modes)!r}")
    clash = [name for name, on in (("pretext", bool(cfg.train.pretext)), ("detection", cfg.train.detection),
                                   ("fair-lambda", cfg.fair.lam > 0), ("fair-offset", cfg.fair.offset)) if on]
    if clash:
        raise ValueError(f"--baselines trains plain classifiers the way a site does without extra objectives: not "
                         f"with {', '.join(clash)}")


def load_rows(site_dirs: list[Path], holdout: Path, cfg: RunConfig) -> tuple[list[SiteRows], tuple]:
    """Each site's rows as its client splits them (client.site.open_site, the run's seed): training rows, and its
    own test rows (its val rows when the manifest fixes a split without test rows, e.g. equifed-partition's);
    and the holdout's (images, labels)."""
    from client.site import open_site
    from core_models.data import load_site

    t = cfg.train
    sites = []
    for path in site_dirs:
        site = open_site(path, image_size=t.image_size, seed=t.seed, num_classes=t.num_classes,
                         channels=t.in_channels, volume=t.volume_settings())
        own = "test" if site.count("test") else "val"
        x, y = site.part("train")
        x_own, y_own = site.part(own)
        train_rows = (site.split == "train").to_numpy()
        sites.append(SiteRows(name=path.name, x=x, y=y, x_own=x_own, y_own=y_own,
                              n_manifest=int(site.data.frame["patient_id"].nunique()),
                              patients=site.data.frame.loc[train_rows, "patient_id"].astype(str).to_numpy(),
                              own_split=own))
    data = load_site(holdout, **t.load_options())
    return sites, (data.images, data.labels)


def baselines_table(cfg: RunConfig, sites: list[SiteRows], holdout: tuple, make: Factory, initial: State,
                    federated: State | None, modes: list[str], work: Path, federated_epsilon: float = math.nan,
                    noise_seed: int | None = None) -> pd.DataFrame:
    """One row per (model, scored_on): the federated model (`federated`: the run's final state), the centralised
    one and each site's local-only one, each scored on the holdout and on every site's own rows."""
    training = Training.of(cfg)
    models: list[tuple[str, State, int, float]] = []
    if federated is not None:
        models.append(("federated", federated, sum(len(s.y) for s in sites), federated_epsilon))
    if "central" in modes:
        x = np.concatenate([s.x for s in sites])
        y = np.concatenate([s.y for s in sites])
        patients = np.concatenate([[f"{s.name}:{p}" for p in (range(len(s.y)) if s.patients is None else s.patients)]
                                   for s in sites])  # two sites' "P001" are two patients
        res = run_alone(make, initial, x, y, sum(len(s.y_own) for s in sites), sum(s.n_manifest for s in sites),
                        training, work / "central", cfg.train.seed, patients, noise_seed)
        models.append(("central", res["state"], len(y), res["spent"]))
    if "local" in modes:
        for j, site in enumerate(sites):
            res = run_alone(make, initial, site.x, site.y, len(site.y_own), site.n_manifest, training,
                            work / site.name, cfg.train.seed * 100 + j, site.patients,
                            None if noise_seed is None else noise_seed * 100 + j)
            models.append((site.name, res["state"], len(site.y), res["spent"]))
    rows = []
    for name, state, n_train, spent in models:
        model = fresh(make, state)
        targets = [("holdout", "holdout", *holdout)] + [(s.name, s.own_split, s.x_own, s.y_own) for s in sites]
        for scored_on, split, x, y in targets:
            rows.append({"model": name, "n_train": n_train, "epsilon": spent, "scored_on": scored_on,
                         "split": split, **scores(model, x, y)})
    return pd.DataFrame(rows)


def benefit_lines(table: pd.DataFrame) -> list[str]:
    """The benefit of joining, per site: its local-only model vs the federated one (AUROC; accuracy), on the
    holdout and on its own rows; the centralised model's holdout figures beside them."""
    def cell(model: str, on: str) -> str:
        row = table[(table["model"] == model) & (table["scored_on"] == on)]
        if row.empty:
            return "-"
        r = row.iloc[0]
        auroc = "-" if math.isnan(r["auroc"]) else f"{r['auroc']:.3f}"  # "-": rows of one class only
        return f"{auroc} ({r['accuracy']:.3f})"

    sites = [m for m in table["model"].unique() if m not in ("federated", "central")]
    has_fed = "federated" in set(table["model"])
    lines = ["benefit of joining: AUROC (accuracy) of each site's local-only model and of the federated one "
             "(AUROC -: the rows hold one class)",
             f"  {'site':<14} {'n train':>7}  {'holdout: alone':>15}  {'federated':>15}  {'own rows: alone':>15}  "
             f"{'federated':>15}"]
    for site in sites:
        n = int(table.loc[table["model"] == site, "n_train"].iloc[0])
        lines.append(f"  {site:<14} {n:>7}  {cell(site, 'holdout'):>15}  {cell('federated', 'holdout'):>15}  "
                     f"{cell(site, site):>15}  {cell('federated', site):>15}")
    if "central" in set(table["model"]):
        n = int(table.loc[table["model"] == "central", "n_train"].iloc[0])
        lines.append(f"  {'central':<14} {n:>7}  {cell('central', 'holdout'):>15}  (all sites pooled: simulation only)")
    if has_fed and sites:
        holdout = table[table["scored_on"] == "holdout"].set_index("model")
        fed = holdout.loc["federated", "auroc"]
        worse = [f"{s} ({holdout.loc[s, 'auroc']:.3f})" for s in sites if holdout.loc[s, "auroc"] >= fed]
        if not worse:
            lines.append("  the federated model beats every site's local-only model on the holdout")
        else:
            dp = bool(np.isfinite(holdout["epsilon"].astype(float)).any())
            lines.append(f"  on the holdout the federated model ({fed:.3f}) does not beat the local-only model of "
                         f"{', '.join(worse)}: one run of each" + (", each with its own DP noise (over seeds the "
                         "holdout AUROC of one setting spreads by 0.01-0.03)" if dp else "")
                         + "; repeat over seeds before concluding (benchmarks/bench_real.py --benefit)")
    return lines


def run_baselines(cfg: RunConfig, site_dirs: list[Path], holdout: Path, modes: list[str], out: Path,
                  federated: State | None, federated_epsilon: float = math.nan) -> pd.DataFrame:
    """Train and score the baselines of a finished simulation; write `out`/baselines.csv."""
    import tempfile

    from server.app import initial_model

    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)  # the server's round-0 model: the same fresh weights or checkpoint
    initial = snapshot(initial_model(cfg))
    t = cfg.train

    def make() -> nn.Module:
        from core_models.networks import build_model
        return build_model(t.model, t.num_classes, t.in_channels, t.dims)

    sites, held = load_rows(site_dirs, holdout, cfg)
    with tempfile.TemporaryDirectory(prefix="equifed-baselines-") as tmp, warnings.catch_warnings():
        for message in ("Secure RNG turned off", "Optimal order is the", "Full backward hook is firing"):
            warnings.filterwarnings("ignore", message=message)  # Opacus' notes, once per round and model
        table = baselines_table(cfg, sites, held, make, initial, federated, modes, Path(tmp),
                                federated_epsilon=federated_epsilon)
    table.to_csv(out / BASELINES_CSV, index=False)
    return table
