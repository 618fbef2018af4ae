"""Removing the social-pathway effect, side by side, with the truth from counterfactual re-renders.

    nice .venv/bin/python benchmarks/bench_mitigation.py [--scenario simulations/scenarios/social_marker_32.toml]
        [--seeds 0,1,2,3,4] [--epochs 10] [--lams 30,100] [--mode stratified-sd] [--lams-per-sample 10]
        [--no-cam] [--markdown table.md] [--figure benchmarks/mitigation_gradcam.png]

Data: a 32 px scenario (default simulations/scenarios/social_shortcut_32.toml: 4 hospitals x 500 patients, corner
marker AND blur/noise/contrast on legacy scanners; social_marker_32.toml: marker only; social_scanner_32.toml: scanner
noise/blur/contrast only), rendered in memory with the generator; 80/20 train/val from the sites (pooled:
centralised training), the scenario's 1000-patient holdout as the test set.

Truth: for the test set's reference-group (A = a0) patients, every method scores (i) the factual render, (ii) the
same patient rendered with S set to its value under a1 (same seeds: the social path switched), (iii) the same patient
with D set to its value under a1, S kept (the biological path switched). TRUE social PSE = mean (ii) - (i), TRUE
permissible PSE = mean (iii) - (i). "est. social PSE" is the weighting estimate from observational test data.

Methods (same data, same seed, same network and schedule):
* unmitigated; "drop A" (A is not an input of an image model: the same model; the A-probe AUROC on its embeddings
  shows the network recovers A from the image anyway);
* path-specific penalty at several lambda (fairness/mitigation.py: 2*lam*PSE_running*PSE_estimate, running PSE = a
  bias-corrected moving average of earlier steps' estimates); the estimate is StratifiedPathPenalty's (``--mode
  stratified-sd``: 32 reference-group rows from each (scanner, label) stratum per step, own forward pass) or the
  per-sample minibatch form used under DP-SGD and in federation (``--lams-per-sample``);
* post-processing: a logit shift per S level that equalises the mean score within label strata of the validation
  set (ScoreShiftCorrection); also on top of each penalised model ("+ post-processing"), fitted on the rows the
  penalty never drew when ``--calibration-split`` holds part of the validation split out of its pool;
* with ``--dp-eps``: DP-SGD (client.dp.train_dp) unmitigated, with the per-sample penalty, the offset and
  post-processing, and a DP-trained S-blind reference;
* fairlearn ThresholdOptimizer (equalized odds) on the float64 scores, fitted on the validation set (expected
  decision = its randomised thresholds' probability);
* fairlearn CorrelationRemover and ExponentiatedGradient (demographic parity) on the frozen penultimate embeddings
  of the unmitigated model, logistic head;
* S-blind reference: the same network trained and scored on renders with the social mechanism off (the A -> S edge
  cut, ``simulations.scenario.without_social_path``: same patients, each site's share of legacy scans kept, the
  scanner independent of the group): the best a model without the social path can do; and that network scored on
  the real renders (its own social PSE).

Image evidence (fairness/attribution.py; ``--attribution gradcam`` or ``occlusion``, pixel resolution) on test images
that carry the marker, for the unmitigated and the penalised model: share of the class-1 attribution mass in the
marker region (for Grad-CAM grown by the CAM stride) against its area, the parameter-randomisation check (Adebayo
et al. 2018: the rank correlation between the trained and re-initialised models' maps must be low) and the
deletion curve's area (Petsiuk et al. 2018: below random order if the map points at pixels the score depends on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from core_models.networks import SmallCNN, build_model
from core_models.training import make_loader, train_epochs
from fairness.attribution import attribution_maps, image_evidence
from fairness.mitigation import (DensityRatio, MediatorOffset, PathSpecificPenalty, ScoreShiftCorrection,
                                 StratifiedPathPenalty, cell_index, consortium_strata, pct, site_release_vectors,
                                 stratum_index)
from simulations.generator import MAX_PIXEL, marker_mask, render, sample_holdout_truth, sample_truth, to_uint12
from simulations.scenario import load_scenario, without_social_path

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "simulations" / "scenarios" / "social_shortcut_32.toml"


# ------------------------------------------------------------------------------------------------ data

def _render(rows: pd.DataFrame, s=None, d=None) -> np.ndarray:
    """Images (N, 1, H, W) float32 on the 12-bit storage grid, optionally with S and/or D overridden."""
    out = []
    for i, row in enumerate(rows.to_dict("records")):
        if d is not None:
            row = {**row, "D": int(d[i])}
        out.append(to_uint12(render(row, s=None if s is None else int(s[i]))) / MAX_PIXEL)
    return np.stack(out)[:, None].astype(np.float32)


def load_data(scenario_path: Path = SCENARIO, n_per_site: int | None = None, n_holdout: int | None = None,
              seed: int = 0, fresh_consortium: bool = False) -> dict:
    """Train/val (from the sites, split by ``seed``) and test (holdout) sets, with truth rows and counterfactuals.
    ``fresh_consortium``: the patients (sites and holdout) are drawn anew for each seed (scenario seed + seed), so
    the seed spread includes the sampling of the consortium, not only the split, initialisation and batch order."""
    sc = load_scenario(scenario_path)
    if fresh_consortium:
        sc = dataclasses.replace(sc, seed=sc.seed + seed)
    truth = pd.concat([sample_truth(s, sc.seed, n_per_site, image_size=sc.image_size) for s in sc.sites],
                      ignore_index=True)
    test = sample_holdout_truth(sc, n_holdout)
    rng = np.random.default_rng(seed)
    is_val = rng.random(len(truth)) < 0.2
    parts = {"train": truth[~is_val].reset_index(drop=True), "val": truth[is_val].reset_index(drop=True),
             "test": test.reset_index(drop=True)}
    data = {}
    for name, rows in parts.items():
        data[name] = {"rows": rows, "x": _render(rows), "y": rows["D"].to_numpy().astype(np.int64),
                      "meta": rows[["A", "S", "C"]].to_numpy().astype(np.float64)}
    t = parts["test"]
    a0 = t[t["A"] == 0].reset_index(drop=True)
    d_a1 = (a0["U_D"].to_numpy() < a0["p_D_a1"].to_numpy()).astype(int)  # D with A -> D switched, S kept
    data["cf"] = {
        "rows": a0,
        "x": _render(a0), "s": a0["S"].to_numpy(),
        "x_social": _render(a0, s=a0["S_a1"].to_numpy()), "s_social": a0["S_a1"].to_numpy(),
        "x_perm": _render(a0, d=d_a1),
    }
    data["blind"] = {name: _render(parts[name], s=s_blind(parts[name], sc)) for name in ("train", "test")}
    return data


def s_blind(rows: pd.DataFrame, scenario) -> np.ndarray:
    """S in the S-blind world: the same patients (own U_S) with the A -> S edge cut (``without_social_path``), so
    each site keeps its share of legacy scans but the scanner no longer depends on the group."""
    rate = {site.name: site.p_s_a0 for site in without_social_path(scenario).sites}
    site = rows["source_site"] if "source_site" in rows else rows["site"]
    return (rows["U_S"].to_numpy() < site.map(rate).to_numpy()).astype(int)


# ------------------------------------------------------------------------------------------------ models

def train_cnn(data: dict, epochs: int, seed: int, lam: float = 0.0, x_train: np.ndarray | None = None,
              lr: float = 0.002, batch_size: int = 32, mode: str = "stratified-sd",
              per_cell: int = 32, ramp_steps: int = 0, factorise: bool = True,
              dual_lr: float = 0.0, offset: bool = False, pool: dict | None = None,
              network: str = "cnn") -> tuple[torch.nn.Module, dict]:
    """A ``network`` (core_models.networks.build_model: SmallCNN by default) on the pooled training set; ``lam > 0``
    adds the path-specific penalty, ``mode`` "stratified"
    (StratifiedPathPenalty: per_cell reference-group rows from every scanner cell per step), "stratified-sd" (strata
    by scanner and label), "pooled-sd*" (strata over both groups) or "per-sample"
    (PathSpecificPenalty on the training minibatch, the DP-SGD/federated form); ``offset`` trains with the
    mediator's fixed logit offset (MediatorOffset, dropped at inference), with or without the penalty. ``pool``
    (x, y, meta of part of the validation split) replaces the validation split as the "pooled-sd-val" pool."""
    torch.manual_seed(seed)
    model = build_model(network)
    tr = data["train"]
    x = tr["x"] if x_train is None else x_train
    va = data["val"]
    meta = np.concatenate([tr["meta"], va["meta"]])
    y_all = np.concatenate([tr["y"], va["y"]])
    counts, _ = site_release_vectors(meta, np.zeros(len(meta)), y_all)  # what the sites release, un-noised
    penalty = None
    if lam > 0:
        weights = DensityRatio.fit(tr["meta"][:, 0], tr["meta"][:, 1])
        if mode in ("stratified", "stratified-sd"):
            a0 = tr["meta"][:, 0] == 0
            cells = cell_index(tr["meta"][a0, 1], None, (), 2)
            strata = cells * 2 + tr["y"][a0] if mode == "stratified-sd" else cells
            penalty = StratifiedPathPenalty(model, x[a0], strata, weights.ratio[cells], lam=lam, per_cell=per_cell,
                                            seed=seed, ramp_steps=ramp_steps)
        elif mode in ("pooled-sd", "pooled-sd-val", "pooled-sd-all"):
            # strata (S, D) over both groups, weights from the training + validation counts (consortium_strata);
            # drawn from the training rows, the validation rows (never fitted by the cross-entropy) or both
            w = consortium_strata([counts], [np.zeros_like(counts)], factorise_label=factorise).w
            vp = va if pool is None else pool
            pools = {"pooled-sd-val": (vp["x"], vp["meta"], vp["y"]),
                     "pooled-sd-all": (np.concatenate([x, va["x"]]), meta, y_all)}
            px, pm, py = pools.get(mode, (x, tr["meta"], tr["y"]))
            penalty = StratifiedPathPenalty(model, px, stratum_index(pm, py), np.zeros(len(py)), lam=lam,
                                            per_cell=per_cell, seed=seed, ramp_steps=ramp_steps, weights_by_stratum=w,
                                            dual_lr=dual_lr)
        else:
            penalty = PathSpecificPenalty(weights, lam=lam)
    hook = MediatorOffset.from_counts(counts, inner=penalty) if offset else penalty
    if hook is not None:
        loader = make_loader(x, tr["y"], batch_size, shuffle=True, seed=seed, meta=tr["meta"])
        train_epochs(model, loader, epochs=epochs, optimizer="adam", lr=lr, device=torch.device("cpu"),
                     penalty_fn=hook)
    else:
        loader = make_loader(x, tr["y"], batch_size, shuffle=True, seed=seed)
        train_epochs(model, loader, epochs=epochs, optimizer="adam", lr=lr, device=torch.device("cpu"))
    info = {} if penalty is None else {"running_pse_last": penalty.running,
                                       "mu_last": getattr(penalty, "mu", float("nan"))}
    return model.eval(), info


def train_dp_cnn(data: dict, epochs: int, seed: int, lam: float, epsilon: float, workdir: Path,
                 release_noise: float = 5.0, batch_size: int = 64, optimizer: str = "sgd",
                 lr: float = 0.1, offset: bool = False) -> tuple[SmallCNN, dict]:
    """DP-SGD (client.dp.train_dp: Opacus, frozen stem, clip 1) for ``epochs`` one-epoch rounds planned to spend
    ``epsilon``. With ``lam > 0``: the per-sample penalty (the only form that is a per-sample loss), its PSE factor
    and density ratios re-estimated after every round from the site's released statistics (counts once,
    reference-group score sums every round, Gaussian noise ``release_noise``), charged to the same ledger as the
    DP-SGD steps, as a site does for the server; ``epsilon`` in the result is the ledger's total. SGD (momentum)
    lr 0.1, logical batch 64: the DP settings benchmarks/RESULTS.md found best (Adam lr 0.002 does not learn here)."""
    from client.dp import DPSettings, PatientData, plan_dp, train_dp
    from client.ledger import PrivacyLedger
    from client.statistics import Releaser
    from fairness.mitigation import consortium_pse

    tr = data["train"]
    workdir.mkdir(parents=True, exist_ok=True)
    ledger = PrivacyLedger.open(workdir, delta=1e-5, fingerprint=f"bench-{seed}-{lam}")
    plan = plan_dp(len(tr["y"]), batch_size, 1, epochs, epsilon, 1e-5)
    releaser = Releaser(ledger, noise_multiplier=release_noise, rng=np.random.default_rng(seed))
    torch.manual_seed(seed)
    state = SmallCNN().state_dict()
    counts, penalty, pses = None, None, []
    if offset:  # the mediator offset needs the label counts before round 1: released (noised, charged) first
        c, _ = site_release_vectors(tr["meta"], np.zeros(len(tr["y"])), tr["y"])
        counts = np.asarray(releaser.release_counts("fair-pse-counts", c, 1.0))
    for r in range(epochs):
        hook = MediatorOffset.from_counts(counts, inner=penalty) if offset else penalty
        model = SmallCNN()
        model.load_state_dict(state)  # a fresh module per round, as a client gets the global weights
        train_dp(model, PatientData(tr["x"], tr["y"], meta=tr["meta"] if hook else None), plan, ledger,
                 DPSettings(max_grad_norm=1.0, physical_batch_size=64, optimizer=optimizer, lr=lr),
                 server_round=r + 1, sampling_rng=np.random.default_rng(seed * 1000 + r), penalty_fn=hook)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if lam > 0 and r + 1 < epochs:
            model = SmallCNN()
            model.load_state_dict(state)
            c, s = site_release_vectors(tr["meta"], cnn_scores(model.eval(), tr["x"]), tr["y"])
            if counts is None:
                counts = np.asarray(releaser.release_counts("fair-pse-counts", c, 1.0))
            sums = np.asarray(releaser.release("fair-pse-sums", s, 1.0))
            weights, pse = consortium_pse([counts], [sums])
            pses.append(pse)
            penalty = PathSpecificPenalty(weights, lam=lam, pse=pse)
    model = SmallCNN()
    model.load_state_dict(state)
    return model.eval(), {"epsilon": ledger.epsilon(), "released_pse_last": pses[-1] if pses else float("nan")}


def fit_post_processing(model, split: dict) -> ScoreShiftCorrection:
    """The S-specific logit shift that zeroes the pooled-strata PSE of ``model``'s scores on ``split``."""
    return ScoreShiftCorrection().fit(cnn_scores(model, split["x"]), split["meta"][:, 0], split["meta"][:, 1],
                                      split["y"])


@torch.no_grad()
def cnn_scores(model, x: np.ndarray) -> np.ndarray:
    return torch.cat([torch.softmax(model(torch.from_numpy(x[i:i + 512])), 1)[:, 1]
                      for i in range(0, len(x), 512)]).numpy().astype(np.float64)


@torch.no_grad()
def cnn_embed(model, x: np.ndarray) -> np.ndarray:
    return torch.cat([model.embed(torch.from_numpy(x[i:i + 512])) for i in range(0, len(x), 512)]).numpy()


class ScoreAsProba(BaseEstimator, ClassifierMixin):
    """A prefit 'classifier' whose input is the network's score: lets ThresholdOptimizer post-process it."""

    def fit(self, x, y):
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, x):
        s = np.asarray(x, dtype=np.float64)[:, 0]
        return np.stack([1 - s, s], axis=1)

    def predict(self, x):
        return (np.asarray(x)[:, 0] > 0.5).astype(int)


# ------------------------------------------------------------------------------------------------ evaluation

def evaluate(score_fn, data: dict) -> dict:
    """AUROC, worst-group AUROC, equalized-odds gap (at 0.5) on the test set; TRUE social and permissible PSE from
    the re-renders; the weighting estimate of the social PSE from the observational test data.
    ``score_fn(x, s, a) -> scores``: s and a are the metadata a deployed model could read."""
    te, cf = data["test"], data["cf"]
    a, s, y = te["meta"][:, 0], te["meta"][:, 1], te["y"]
    p = score_fn(te["x"], s, a)
    a0 = np.zeros(len(cf["rows"]))
    f = score_fn(cf["x"], cf["s"], a0)
    social = float(np.mean(score_fn(cf["x_social"], cf["s_social"], a0) - f))
    perm = float(np.mean(score_fn(cf["x_perm"], cf["s"], a0) - f))
    weights = DensityRatio.fit(a, s)
    yhat = p > 0.5
    rates = [(yhat[(a == g) & (y == 1)].mean(), yhat[(a == g) & (y == 0)].mean()) for g in (0, 1)]
    return {
        "auroc": float(roc_auc_score(y, p)),
        "worst_group_auroc": float(min(roc_auc_score(y[a == g], p[a == g]) for g in (0, 1))),
        "eo_gap": float(max(abs(rates[0][0] - rates[1][0]), abs(rates[0][1] - rates[1][1]))),
        "true_social_pse": social,
        "true_permissible_pse": perm,
        "est_social_pse": weights.pse(a, s, None, p),
        # what group-parity methods equalise: the groups' mean score gap (the a1 - a0 disease rate gap is real)
        "group_gap": float(p[a == 1].mean() - p[a == 0].mean()),
    }


def blind_aurocs(p_blind: np.ndarray, data: dict) -> dict:
    """AUROC and worst-group AUROC of scores on the S-blind test renders (the S-blind reference's row)."""
    y, a = data["test"]["y"], data["test"]["meta"][:, 0]
    return {"auroc": float(roc_auc_score(y, p_blind)),
            "worst_group_auroc": float(min(roc_auc_score(y[a == g], p_blind[a == g]) for g in (0, 1)))}


# ------------------------------------------------------------------------------------------------ run

def run(data: dict, seed: int, epochs: int, lams: list[float], figure: Path | None = None, mode: str = "stratified-sd",
        per_cell: int = 32, lams_per_sample: tuple[float, ...] = (), cam: bool = True,
        dp_eps: float = 0.0, dp_lam: float = 10.0, dp_only: bool = False, ramp_steps: int = 0,
        penalty_epochs: int = 0, factorise: bool = True, dual_lr: float = 0.0, offset: bool = False,
        attribution: str = "gradcam", calibration_split: float = 0.0) -> list[dict]:
    rows = []
    va = data["val"]
    pool, calibration = None, va
    if calibration_split > 0:  # the penalty's pool and the post-processing's calibration rows never overlap
        held = np.random.default_rng(seed + 7).random(len(va["y"])) >= 1.0 - calibration_split
        pool = {k: va[k][~held] for k in ("x", "y", "meta")}
        calibration = {k: va[k][held] for k in ("x", "y", "meta")}
    t0 = time.perf_counter()

    def add(method: str, fn, **extra):
        rows.append({"seed": seed, "method": method, **evaluate(fn, data), **extra})

    base, _ = train_cnn(data, epochs, seed)
    add("unmitigated", lambda x, s, a: cnn_scores(base, x), seconds=round(time.perf_counter() - t0, 1))

    if dp_eps > 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            penalised = [(dp_lam, False)] if dp_lam > 0 else []
            configs = [(0.0, False)] + penalised + ([(0.0, True)] + [(lam, True) for lam, _ in penalised]) * offset
            for lam, off in configs:
                model, info = train_dp_cnn(data, epochs, seed, lam, dp_eps, Path(tmp) / f"l{lam:g}{off}", offset=off)
                name = "DP-SGD" + (f" + per-sample penalty lam={lam:g}" if lam else "" if off else " unmitigated")
                name += " + mediator offset" if off else ""
                add(f"{name} (eps target {dp_eps:g})", lambda x, s, a, m=model: cnn_scores(m, x), **info)
                if lam == 0:  # post-processing on top: fitted on the validation split (kept at the site, not released)
                    post = fit_post_processing(model, data["val"])
                    add(f"{name} + post-processing (eps target {dp_eps:g})",
                        lambda x, s, a, m=model, p=post: p.transform(cnn_scores(m, x), s), **info)
            blind_data = {**data, "train": {**data["train"], "x": data["blind"]["train"]}}
            model, info = train_dp_cnn(blind_data, epochs, seed, 0.0, dp_eps, Path(tmp) / "blind")
            rows.append({"seed": seed, "method": f"DP-SGD S-blind reference (eps target {dp_eps:g})",
                         **blind_aurocs(cnn_scores(model, data["blind"]["test"]), data), **info})
        if dp_only:
            return rows

    # "drop A": an image model never takes A as an input, so dropping it changes nothing; A is in the image
    emb_tr, emb_te = cnn_embed(base, data["train"]["x"]), cnn_embed(base, data["test"]["x"])
    probe = LogisticRegression(max_iter=2000).fit(emb_tr, data["train"]["meta"][:, 0])
    a_probe = float(roc_auc_score(data["test"]["meta"][:, 0], probe.predict_proba(emb_te)[:, 1]))
    add("drop A (no-op: A not an input)", lambda x, s, a: cnn_scores(base, x), a_probe_auroc=a_probe)

    if offset:
        model, _ = train_cnn(data, epochs, seed, offset=True)
        add("mediator offset (no penalty)", lambda x, s, a, m=model: cnn_scores(m, x))
    penalised = {}
    for lam in lams:
        t = time.perf_counter()
        model, info = train_cnn(data, penalty_epochs or epochs, seed, lam=lam, mode=mode, per_cell=per_cell,
                                ramp_steps=ramp_steps, factorise=factorise, dual_lr=dual_lr, offset=offset,
                                pool=pool)
        penalised[lam] = model
        label = mode + (f", ramp {ramp_steps}" if ramp_steps else "") + (f", per-cell {per_cell}" if per_cell != 32
                                                                           else "")
        label += f", {penalty_epochs} epochs" if penalty_epochs else ""
        label += f", dual {dual_lr:g}" if dual_lr else ""
        label += ", p(d|a0,s)" if mode.startswith("pooled") and not factorise else ""
        label += f", pool = {100 * (1 - calibration_split):.0f} % of val" if calibration_split else ""
        label = ("mediator offset + " if offset else "") + label
        add(f"path-specific penalty ({label}) lam={lam:g}", lambda x, s, a, m=model: cnn_scores(m, x),
            seconds=round(time.perf_counter() - t, 1), running_pse_last=info["running_pse_last"],
            mu_last=info["mu_last"])
        post_fit = fit_post_processing(model, calibration)  # the residual, removed after training
        where = f" on the other {100 * calibration_split:.0f} %" if calibration_split else ""
        add(f"path-specific penalty ({label}) lam={lam:g} + post-processing{where}",
            lambda x, s, a, m=model, p=post_fit: p.transform(cnn_scores(m, x), s), delta=float(post_fit.delta[1]))
    for lam in lams_per_sample:
        model, info = train_cnn(data, epochs, seed, lam=lam, mode="per-sample")
        add(f"path-specific penalty (per-sample) lam={lam:g}", lambda x, s, a, m=model: cnn_scores(m, x),
            running_pse_last=info["running_pse_last"])

    val_scores = cnn_scores(base, va["x"])
    post = fit_post_processing(base, va)
    add("post-processing (logit shift by S)", lambda x, s, a: post.transform(cnn_scores(base, x), s),
        delta=float(post.delta[1]))

    from fairlearn.postprocessing import ThresholdOptimizer

    to = ThresholdOptimizer(estimator=ScoreAsProba().fit(None, None), constraints="equalized_odds", prefit=True,
                            predict_method="predict_proba")
    to.fit(val_scores[:, None].astype(np.float64), va["y"], sensitive_features=va["meta"][:, 0].astype(int))
    add("fairlearn ThresholdOptimizer (equalized odds)",
        lambda x, s, a: to._pmf_predict(cnn_scores(base, x)[:, None], sensitive_features=a.astype(int))[:, 1])

    from fairlearn.preprocessing import CorrelationRemover

    a_tr = data["train"]["meta"][:, 0]
    cr = CorrelationRemover(sensitive_feature_ids=[0]).fit(np.column_stack([a_tr, emb_tr]))
    head = LogisticRegression(max_iter=2000).fit(cr.transform(np.column_stack([a_tr, emb_tr])), data["train"]["y"])
    add("fairlearn CorrelationRemover (embeddings)",
        lambda x, s, a: head.predict_proba(cr.transform(np.column_stack([a, cnn_embed(base, x)])))[:, 1])

    from fairlearn.reductions import DemographicParity, ExponentiatedGradient

    eg = ExponentiatedGradient(LogisticRegression(max_iter=2000), DemographicParity(), max_iter=30)
    eg.fit(emb_tr, data["train"]["y"], sensitive_features=a_tr.astype(int))
    add("fairlearn ExponentiatedGradient DP (embeddings)",
        lambda x, s, a: eg._pmf_predict(cnn_embed(base, x))[:, 1])

    blind, _ = train_cnn(data, epochs, seed, x_train=data["blind"]["train"])
    te = data["test"]
    rows.append({"seed": seed, "method": "S-blind reference (social mechanism off)",
                 **blind_aurocs(cnn_scores(blind, data["blind"]["test"]), data)})
    # the same lesion-only network scored on the real (socially affected) renders: its own social PSE is what the
    # S -> X edge does to a model that never learnt the shortcut (an unseen marker, blur on the lesion)
    add("S-blind network scored on real renders", lambda x, s, a: cnn_scores(blind, x))
    if not cam:
        return rows

    # Grad-CAM evidence (fairness.attribution) on test images that carry the marker: share of the attribution in
    # the marker corner vs its area, parameter-randomisation check, deletion curve against random order
    marked = te["x"][te["meta"][:, 1] == 1][:200 if attribution == "gradcam" else 64]
    mask = marker_mask(marked.shape[-1])
    lam_cam = max(lams) if lams else None
    cam_models = {"unmitigated": (base, rows[0])}
    if lam_cam is not None:
        cam_models["penalised"] = (penalised[lam_cam], next(
            r for r in rows if r["method"].startswith("path-specific penalty (") and r["method"].endswith(
                f" lam={lam_cam:g}") and "per-sample" not in r["method"]))
    maps = {}
    for name, (model, row) in cam_models.items():
        ev = image_evidence(model, marked, mask, seed=seed, method=attribution,
                            n_draws=10 if attribution == "gradcam" else 3)
        maps[name] = attribution_maps(model, marked[:4], attribution)
        row.update(cam_region_share=ev["region_share_mean"], cam_area_share=ev["region_area_share"],
                   cam_randomisation_rho=ev["randomisation_spearman"],
                   cam_deletion_auc=ev["deletion_auc_attribution"], cam_deletion_auc_random=ev["deletion_auc_random"])
    if figure is not None and lam_cam is not None:
        _figure(figure, marked, maps["unmitigated"], maps["penalised"], cam_models["unmitigated"][1]["cam_region_share"],
                cam_models["penalised"][1]["cam_region_share"], lam_cam)
    return rows


def _figure(path: Path, x, maps0, maps1, share0, share1, lam) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 4
    fig, ax = plt.subplots(3, k, figsize=(2.2 * k, 6.6))
    for j in range(k):
        ax[0, j].imshow(x[j, 0], cmap="gray", vmin=0, vmax=1)
        ax[1, j].imshow(x[j, 0], cmap="gray", vmin=0, vmax=1)
        ax[1, j].imshow(maps0[j], cmap="jet", alpha=0.5)
        ax[2, j].imshow(x[j, 0], cmap="gray", vmin=0, vmax=1)
        ax[2, j].imshow(maps1[j], cmap="jet", alpha=0.5)
        for i in range(3):
            ax[i, j].axis("off")
    ax[0, 0].set_title("image (marker top-left)", fontsize=8, loc="left")
    def fmt(v):
        return "n/a (all-zero maps)" if v is None else f"{v:.2f}"

    ax[1, 0].set_title(f"unmitigated: corner-region share {fmt(share0)}", fontsize=8, loc="left")
    ax[2, 0].set_title(f"penalty lam={lam:g}: corner-region share {fmt(share1)}", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    agg = df.groupby("method", sort=False).mean(numeric_only=True).drop(columns=["seed"])
    base = agg.loc["unmitigated"]
    agg["social_removed_%"] = [100 - pct(v, base["true_social_pse"]) for v in agg["true_social_pse"]]
    agg["permissible_kept_%"] = [pct(v, base["true_permissible_pse"]) for v in agg["true_permissible_pse"]]
    return agg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lams", default="3,10,30")
    parser.add_argument("--figure", default=str(ROOT / "benchmarks" / "mitigation_gradcam.png"))
    parser.add_argument("--json", default="")
    parser.add_argument("--scenario", default=str(SCENARIO))
    parser.add_argument("--n-per-site", type=int, default=0, help="patients per site (0: the scenario's n)")
    parser.add_argument("--fresh-consortium", action="store_true",
                        help="draw the patients anew for every seed (scenario seed + seed)")
    parser.add_argument("--mode", default="stratified-sd",
                        choices=["stratified-sd", "pooled-sd", "pooled-sd-val", "pooled-sd-all",
                                 "stratified", "per-sample"])
    parser.add_argument("--per-cell", type=int, default=32)
    parser.add_argument("--ramp-steps", type=int, default=0, help="stratified penalty: lambda ramps up over N steps")
    parser.add_argument("--dual-lr", type=float, default=0.0, help="pooled modes: augmented-Lagrangian multiplier step")
    parser.add_argument("--no-factorise", action="store_true", help="pooled modes: weights with p(d | a0, s)")
    parser.add_argument("--offset", action="store_true",
                        help="a 'mediator offset' row, and the penalised rows with the offset (MediatorOffset)")
    parser.add_argument("--calibration-split", type=float, default=0.0,
                        help="hold this share of the validation split out of the penalty's pool; the 'penalty + "
                             "post-processing' rows fit the correction on it (0: both use the whole split)")
    parser.add_argument("--penalty-epochs", type=int, default=0, help="epochs of the penalised runs (0: --epochs)")
    parser.add_argument("--lams-per-sample", default="", help="extra rows: the per-sample (DP/federated) form")
    parser.add_argument("--no-cam", action="store_true")
    parser.add_argument("--attribution", default="gradcam", choices=["gradcam", "occlusion"],
                        help="image evidence: Grad-CAM (2x2 at 32 px) or occlusion at pixel resolution (64 images)")
    parser.add_argument("--markdown", default="", help="write the seed-mean (sd) table here")
    parser.add_argument("--dp-eps", type=float, default=0.0, help="add DP-SGD rows at this epsilon")
    parser.add_argument("--dp-lam", type=float, default=10.0)
    parser.add_argument("--dp-only", action="store_true", help="only the unmitigated and DP-SGD rows")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="only print the tables of earlier runs' --json files, merged (e.g. two halves of the seeds)")
    args = parser.parse_args(argv)
    if args.merge:
        rows = sum((json.loads(Path(f).read_text()) for f in args.merge), [])
        print(markdown_table(rows) + "\n" + target_table(rows))
        return
    torch.set_num_threads(1)
    lams = [float(x) for x in args.lams.split(",") if x.strip()]
    rows = []
    t0 = time.perf_counter()
    for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
        data = load_data(Path(args.scenario), n_per_site=args.n_per_site or None, seed=seed,
                         fresh_consortium=args.fresh_consortium)
        rows += run(data, seed, args.epochs, lams, Path(args.figure) if (args.figure and i == 0) else None,
                    mode=args.mode, per_cell=args.per_cell, cam=not args.no_cam, dp_eps=args.dp_eps,
                    dp_lam=args.dp_lam, dp_only=args.dp_only, ramp_steps=args.ramp_steps,
                    penalty_epochs=args.penalty_epochs, factorise=not args.no_factorise, dual_lr=args.dual_lr,
                    offset=args.offset, attribution=args.attribution, calibration_split=args.calibration_split,
                    lams_per_sample=tuple(float(x) for x in args.lams_per_sample.split(",") if x.strip()))
    agg = summarise(rows)
    cols = ["auroc", "worst_group_auroc", "eo_gap", "true_social_pse", "true_permissible_pse", "est_social_pse",
            "group_gap", "social_removed_%", "permissible_kept_%", "cam_region_share", "cam_area_share",
            "cam_deletion_auc", "cam_deletion_auc_random"]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(agg[[c for c in cols if c in agg]].to_string())
        extra = agg[[c for c in ("a_probe_auroc", "cam_randomisation_rho", "delta", "running_pse_last", "mu_last")
                     if c in agg]].dropna(how="all")
        print(extra.to_string())
    print(f"seeds {args.seeds}, epochs {args.epochs}, wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows) + "\n" + target_table(rows))


def target_table(rows: list[dict]) -> str:
    """Against the targets, per method: removed and kept as ratios of the seed means (the per-seed ratios carry
    the noise of a small denominator; above 100 % the effect is reversed, so the target reads |100 - removed| <= 10),
    AUROC minus the S-blind reference's (same seeds), and the median per-seed
    |residual social PSE| as a share of that seed's unmitigated effect. DP-SGD rows are compared with the DP-SGD
    unmitigated and DP-SGD S-blind networks."""
    df = pd.DataFrame(rows)
    dp_base = df["method"].str.startswith("DP-SGD unmitigated (")
    base_of = {0: df[df["method"] == "unmitigated"].set_index("seed"), 1: df[dp_base].set_index("seed")}
    refs = df[df["method"].str.contains("S-blind reference")]
    blind_of = {dp: refs[refs["method"].str.startswith("DP-SGD") == dp].set_index("seed")["auroc"] for dp in (0, 1)}
    out = ["| method | seeds | removed (90-110 %) | kept (>= 90 %) | AUROC - S-blind (>= -0.01) | median per-seed residual |",
           "|---|---|---|---|---|---|"]
    for method, g in df.groupby("method", sort=False):
        if "true_social_pse" not in g or g["true_social_pse"].isna().all():
            continue
        dp = int(method.startswith("DP-SGD"))  # DP rows against the DP-trained unmitigated and S-blind networks
        g, b, blind = g.set_index("seed"), base_of[dp].loc[g["seed"]], blind_of[dp]
        removed = 100 * (1 - g["true_social_pse"].mean() / b["true_social_pse"].mean())
        kept = 100 * g["true_permissible_pse"].mean() / b["true_permissible_pse"].mean()
        seeds = [i for i in g.index if i in blind.index]
        d_auc = f"{(g.loc[seeds, 'auroc'] - blind.loc[seeds]).mean():+.3f}" if seeds else ""
        residual = 100 * (g["true_social_pse"].abs() / b["true_social_pse"].to_numpy()).median()
        out.append(f"| {method} | {len(g)} | {removed:.1f} % | {kept:.1f} % | {d_auc} | {residual:.0f} % |")
    return "\n".join(out) + "\n"


def markdown_table(rows: list[dict]) -> str:
    """Seed means with the seed standard deviation in brackets; removed/kept are computed per seed against that
    seed's unmitigated model (DP-SGD rows: the DP-SGD unmitigated one), then averaged."""
    df = pd.DataFrame(rows)
    dp = df["method"].str.startswith("DP-SGD")  # DP rows per seed against the DP-SGD unmitigated network
    for rows_of, name in ((~dp, "unmitigated"), (dp, None)):
        pick = df["method"] == name if name else df["method"].str.startswith("DP-SGD unmitigated (")
        base = df[pick].set_index("seed")
        if base.empty:
            continue
        seeds = df.loc[rows_of, "seed"]
        df.loc[rows_of, "social_removed_%"] = 100 - 100 * df.loc[rows_of, "true_social_pse"] / seeds.map(
            base["true_social_pse"])
        df.loc[rows_of, "permissible_kept_%"] = 100 * df.loc[rows_of, "true_permissible_pse"] / seeds.map(
            base["true_permissible_pse"])
    cols = ["auroc", "worst_group_auroc", "eo_gap", "true_social_pse", "true_permissible_pse", "est_social_pse",
            "group_gap", "social_removed_%", "permissible_kept_%", "epsilon"]
    out = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, g in df.groupby("method", sort=False):
        cells = []
        for c in cols:
            v = g[c].dropna() if c in g else pd.Series(dtype=float)
            fmt = "{:.0f}" if c.endswith("%") else "{:+.3f}" if "pse" in c else "{:.3f}"
            cells.append("" if v.empty else f"{fmt.format(v.mean())} ({fmt.format(v.std(ddof=1)).lstrip('+')})"
                         if len(v) > 1 else fmt.format(v.mean()))
        out.append(f"| {method} | {len(g)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
