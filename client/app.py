"""The equifed ClientApp: runs inside a hospital, trains on local data, replies with
weights and aggregate metrics only (no pixels, no patient IDs, no per-record values)."""

from __future__ import annotations

import functools
import math
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod


from client.audit import audit_mod
from client.dp import os_entropy_generator, plan_dp, train_dp
from client.ledger import BudgetExhausted, PrivacyLedger, dataset_fingerprint, dataset_tag
from client.ledger.accounting import epsilon_of
from client.policy import PolicyRefusal, SitePolicy, statistic_dims
from client.shift_stats import one_per_patient
from client.site import SITE_LOG, STATE_DIR, LocalSite, open_site, resolve_site_path
from client.fairness_stats import fair_meta_rows
from client.producers import produce, request_sections
from client.statistics import Releaser
from core_models.config import FairPenaltyConfig, RunConfig
from core_models.networks import build_model, get_device, with_detector
from core_models.pretext import PretextModel, get_task, pretext_loss_fn
from core_models.pretrained import freeze, frozen_part
from core_models.data import manifest_patients
from core_models.protocol import (ARRAYS, BUDGET_EXHAUSTED, CONFIG, DATASET_TAG, DISCLOSURE, EPSILON, EPSILON_BEFORE,
                                  EVAL_ACCURACY, EVAL_AUROC, EVAL_LOSS, METRICS, NUM_EXAMPLES, POLICY_REFUSED, PRIVACY,
                                  PROXIMAL_MU, REJECTED, SERVER_ROUND, SITE, SITE_NAME, STATISTICS, TRAIN_LOSS, VAL_AUROC,
                                  VAL_LOSS, EvalMetrics, TrainMetrics, disclosure, site_error)
from core_models.training import evaluate, make_loader, train_epochs
from fairness import mitigation

app = ClientApp(mods=[audit_mod])  # audit_mod: the site's own log of what it sends (client/audit.py)

# noise multiplier of the counts a site noises once (patients: FedAvg weights, DP-SGD's q): +-20 patients moves
# q a little at hospital sizes, and at delta 1e-5 each such release costs epsilon ~0.18 (~0.8 at 5)
COUNT_NOISE = 20.0


def central_dp_mod(msg: Message, context: Context, call_next):
    """Flower's fixedclipping_mod, only when the server runs central (site-level) DP:
    the server's DifferentialPrivacyClientSideFixedClipping wrapper sends the clipping norm."""
    config = msg.content.config_records.get(CONFIG)
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and "clipping_norm" in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class SiteError(RuntimeError):
    """What the server learns when a site fails: the kind of failure, never the details."""


def keep_details_local(handler):
    """Error messages can name files or patients; they stay in the site's own log.

    Flower sends an exception's text to the server, so the handler re-raises a message
    carrying only the site's name and the exception type.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            name = context.node_config.get("site") or f"partition {context.node_config.get('partition-id', '?')}"
            log_path = _error_log(context)
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as fh:
                    fh.write(f"--- {handler.__name__}\n{traceback.format_exc()}\n")
            raise SiteError(site_error(name, f"{type(err).__name__} during {handler.__name__}; "
                                             f"details in the site's {SITE_LOG}")) from None

    return wrapper


def _error_log(context: Context) -> Path | None:
    try:
        path = resolve_site_path(dict(context.node_config), dict(context.run_config)) / SITE_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    except (OSError, ValueError):
        return None


class Prepared(NamedTuple):
    """What a handler knows before it reads any patient data, every value of it checked."""

    cfg: RunConfig
    path: Path
    policy: SitePolicy
    name: str  # the site's name in a refusal made before the data are read
    server_round: int
    proximal_mu: float


def _prepare(msg: Message, context: Context) -> Prepared:
    """The run config, the site's folder and policy, and the message's own values, all checked before any data
    are read: whether a request is refused (ConfigError, ValueError, PolicyRefusal) then depends on the request and
    the site's settings only, never on a patient."""
    cfg = RunConfig.from_flower(context.run_config)  # every section's ranges (core_models.config)
    node = dict(context.node_config)
    path = resolve_site_path(node, {"data-root": cfg.server.data_root})
    policy = SitePolicy.load(path, node)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    server_round = _number_in(config, SERVER_ROUND, 0, 0, 10**9)
    proximal_mu = _number_in(config, PROXIMAL_MU, 0.0, 0.0, 1e6)
    if msg.metadata.message_type == MessageType.TRAIN and cfg.fair.lam > 0 and "fair-ratio" in config:
        # the broadcast strata, checked (finite, in range, the layout's length) before any data are read
        mitigation.ConsortiumStrata.from_config(config, cfg.fair.mediator_levels,
                                                mitigation.parse_edges(cfg.fair.covariate_edges))
    return Prepared(cfg, path, policy, str(node.get("site") or path.name), int(server_round), float(proximal_mu))


def _number_in(config, name: str, default: float, low: float, high: float) -> float:
    """A number the server's message carries, finite and in [low, high] (ValueError otherwise)."""
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"message value {name!r} must be a number in [{low:g}, {high:g}], got {value!r}")
    return value


def _site(context: Context, prepared: Prepared) -> LocalSite:
    """The site's data, read once the request has passed every check. A fairness column the run names but the
    manifest lacks is not an error (whether the site holds a column would then leave the site): its rows count
    as excluded (fairness.mitigation.meta_array, a warning in the site's log)."""
    torch.set_num_threads(1)  # several simulated sites share the CPU
    cfg = prepared.cfg
    name = context.node_config.get("site")
    return open_site(prepared.path, image_size=cfg.train.image_size, seed=cfg.train.seed,
                     num_classes=cfg.train.num_classes, name=str(name) if name else None,
                     node_config=dict(context.node_config), channels=cfg.train.in_channels)


def _model(msg: Message, cfg: RunConfig) -> torch.nn.Module:
    """The global model the message carries: the network, or in a pretext run the network with its pretext
    head (PretextModel)."""
    model = with_detector(build_model(cfg.train.model, cfg.train.num_classes, cfg.train.in_channels), cfg.train)
    if cfg.train.pretext:
        model = PretextModel(model, cfg.train.pretext)
    model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
    return model


def _pretext_images(site: LocalSite) -> tuple[np.ndarray, np.ndarray]:
    """(images, patient ids) the pretext phase trains on: the train split and the manifest's unlabelled rows,
    except those of patients in the val or test split (their images stay unseen until they are scored)."""
    train = (site.split == "train").to_numpy()
    held = set(site.data.frame.loc[~train, "patient_id"].astype(str))
    extra = site.data.unlabelled_frame
    keep = ~extra["patient_id"].astype(str).isin(held).to_numpy() if len(extra) else np.zeros(0, dtype=bool)
    images = np.concatenate([site.data.images[train], site.data.unlabelled[keep]])
    patients = np.concatenate([site.data.frame.loc[train, "patient_id"].astype(str).to_numpy(),
                               extra.loc[keep, "patient_id"].astype(str).to_numpy() if len(extra) else []])
    return images, patients.astype(str)


def _train_pretext(msg: Message, context: Context, prepared: Prepared, site: LocalSite) -> Message:
    """A round of self-supervised pretraining: the pretext loss on the site's images (labels unused), under
    DP-SGD when the run asks for DP, charged to the same ledger as label training. The corruptions are drawn from
    OS entropy. The reply has the label round's metrics; the pretext losses stand in for train/val loss."""
    cfg, policy, server_round = prepared.cfg, prepared.policy, prepared.server_round
    train_cfg = cfg.train
    model = _model(msg, cfg)
    if frozen_part(train_cfg.freeze, train_cfg.unfreeze_after, server_round) == "stem":
        if model.stem is None:
            raise ValueError(f"model {train_cfg.model!r} has no stem to freeze; use freeze=none")
        for p in model.stem.parameters():  # (not pretrained.freeze: it would unfreeze the unused classifier head)
            p.requires_grad_(False)
    images, patients = _pretext_images(site)
    if len(images) == 0:
        raise ValueError(f"site {site.name}: no images for the pretext phase")
    zeros = np.zeros(len(images), dtype=np.int64)
    # corruptions: seeded without DP (a run repeats), from OS entropy under DP like every draw of the mechanism
    generator = os_entropy_generator("cpu") if cfg.dp.enabled else torch.Generator().manual_seed(train_cfg.seed + server_round)
    loss_fn = pretext_loss_fn(train_cfg.pretext, generator)
    common = dict(optimizer=train_cfg.optimizer, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                  proximal_mu=prepared.proximal_mu)
    if cfg.dp.enabled:
        ledger = _ledger(site, policy)
        epsilon_before = ledger.epsilon()
        try:
            one_off = _one_off_releases(cfg, policy, ledger)
        except PolicyRefusal as err:
            return _refusal(msg, site, POLICY_REFUSED, err)
        try:
            n_noised = _noised_count(ledger, "pretext", len(set(patients)), train_cfg.seed, policy)
            plan = plan_dp(n_noised, train_cfg.batch_size, train_cfg.local_epochs, cfg.server.num_rounds,
                           cfg.dp.target_epsilon, ledger.delta, one_off=one_off)
            ledger.check_budget([plan.mechanism])
            stats = train_dp(model, images, zeros, plan, ledger, patients=patients, batch_size=train_cfg.batch_size,
                             physical_batch_size=cfg.dp.physical_batch_size, max_grad_norm=cfg.dp.max_grad_norm,
                             server_round=server_round, run_id=str(context.run_id), loss_fn=loss_fn, **common)
        except BudgetExhausted as err:
            return _refusal(msg, site, BUDGET_EXHAUSTED, err)
        reply = _dp_train_reply(site, n_noised, plan, ledger, epsilon_before)
    else:
        loader = make_loader(images, zeros, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed + server_round)
        stats = train_epochs(model, loader, epochs=train_cfg.local_epochs, device=get_device(), loss_fn=loss_fn,
                             **common)
        val = _pretext_loss_on(model, site.part("val")[0], cfg)
        reply = {METRICS: MetricRecord(TrainMetrics(
            train_loss=stats["train_loss"], val_auroc=math.nan, val_loss=val, num_examples=len(images),
            rejected=len(site.data.rejected), steps=stats["steps"]).to_metrics())}
    return _reply(msg, site, {ARRAYS: ArrayRecord(model.state_dict()), **reply})


def _pretext_loss_on(model: torch.nn.Module, images: np.ndarray, cfg: RunConfig) -> float:
    """The mean pretext loss of the model on images (a validation figure for best-by = val-loss). A loss that
    compares the images of a batch is scored in batches of at most the training size (the last may be smaller)."""
    if len(images) == 0:
        return math.nan
    model.eval()
    loss_fn = pretext_loss_fn(cfg.train.pretext, torch.Generator().manual_seed(cfg.train.seed))
    batch = 256 if get_task(cfg.train.pretext).per_sample else cfg.train.batch_size
    total = 0.0
    with torch.no_grad():
        for (x, _y) in make_loader(images, np.zeros(len(images), dtype=np.int64), batch):
            total += float(loss_fn(model, x.to(get_device()), _y)) * len(x)
    return total / len(images)


def _reply(msg: Message, site: LocalSite, content: dict) -> Message:
    return Message(content=RecordDict({**content, SITE: ConfigRecord({SITE_NAME: site.name})}), reply_to=msg)


def _fair_meta(site: LocalSite, fair: FairPenaltyConfig, part: str = "train"):
    """(A, S, C) rows of a split."""
    return fair_meta_rows(site.data.frame[(site.split == part).to_numpy()], fair)


def _fair_penalty(msg: Message, cfg: RunConfig, site: LocalSite, model, seed: int, mu: float = 0.0,
                  offset: bool = True):
    """The path-specific penalty and its metadata when `fair-lambda` > 0 and the server has
    broadcast the consortium's strata, weights and PSE (before round 1 and after every round); else (None, None).
    Under DP-SGD, or with `fair-form = "per-sample"`, the per-sample form (a loss of the training batch, so Opacus
    clips it); otherwise this site's share of the stratified estimate (extra draws from every stratum: far less
    gradient noise), with the site's augmented-Lagrangian multiplier ``mu`` (`fair-dual-lr` > 0; kept in the node's
    state, never sent). With `offset`, `fair-offset` wraps either (or nothing) in the mediator's logit offset
    (MediatorOffset) from the site's own exact training counts; under DP-SGD the caller builds it from noised
    counts instead (`_dp_offset`)."""
    config = msg.content[CONFIG]
    fair = cfg.fair
    n_s, c_edges = fair.mediator_levels, mitigation.parse_edges(fair.covariate_edges)
    wanted = (fair.lam > 0 and "fair-ratio" in config) or (offset and fair.offset)
    if not wanted:  # fairness columns are read only when a fairness feature is on
        return None, None
    meta = _fair_meta(site, fair)
    penalty = None
    if fair.lam > 0 and "fair-ratio" in config:
        consortium = mitigation.ConsortiumStrata.from_config(config, n_s, c_edges)
        if cfg.dp.enabled or fair.form == "per-sample":
            penalty = mitigation.PathSpecificPenalty(consortium.weights, lam=fair.lam, pse=consortium.pse)
        else:
            x, y = site.part(fair.pool_split)
            penalty = mitigation.StratifiedPathPenalty.for_site(
                model, x, _fair_meta(site, fair, fair.pool_split), y, consortium, fair.lam,
                per_cell=fair.per_cell, seed=seed, dual_lr=fair.dual_lr, mu=mu)
    if offset and fair.offset:
        # this site's own logit P(D | S) (local counts, nothing released): the posterior within a site is
        # LLR(lesion) + logit P(D | S, site), so the shared network is left with the lesion evidence alone
        y = site.part("train")[1]
        counts, _ = mitigation.site_release_vectors(meta, np.zeros(len(y)), y, c_edges, n_s)
        penalty = mitigation.MediatorOffset.from_counts(counts, n_s, len(c_edges) + 1, inner=penalty)
    return (penalty, meta) if penalty is not None else (None, None)


def _refusal(msg: Message, site: LocalSite | str, code: int, err: Exception) -> Message:
    """An Error reply the server records under the site's name; the run goes on with the others."""
    what = "budget exhausted" if code == BUDGET_EXHAUSTED else "refused"
    name = site if isinstance(site, str) else site.name
    return Message(Error(code=code, reason=site_error(name, f"{what}: {err}")), reply_to=msg)


def _under_dp(cfg: RunConfig, policy: SitePolicy) -> bool:
    """Replies are noised-or-withheld when the run trains with DP or the site requires DP."""
    return cfg.dp.enabled or policy.require_dp


def _ledger(site: LocalSite, policy: SitePolicy) -> PrivacyLedger:
    """The site's ledger at the site's own delta and budget (never the server's). The delta is sized from every
    patient the manifest names, labelled or not, usable or not, so that no run setting (the number of classes,
    the image size) moves it; the ledger keeps the first one and only ever tightens it."""
    n_patients = manifest_patients(site.path / "manifest.csv", policy.image_limits())
    return PrivacyLedger.open(site.path, delta=policy.delta_for(n_patients), max_epsilon=policy.max_epsilon,
                              fingerprint=dataset_fingerprint(site.path))


def _privacy_record(site: LocalSite, ledger: PrivacyLedger) -> ConfigRecord:
    """Which dataset a reply's spend belongs to, as a keyed tag: the fingerprint itself stays at the site."""
    return ConfigRecord({DATASET_TAG: dataset_tag(site.path, ledger.fingerprint)})


def _noised_patients(ledger: PrivacyLedger, site: LocalSite, part: str, seed: int, policy: SitePolicy) -> float:
    """The split's patient count, noised once per (dataset, split seed) and reused: FedAvg's weight and
    DP-SGD's sample rate come from it, so neither reveals the exact count."""
    n = int(site.data.frame.loc[(site.split == part).to_numpy(), "patient_id"].astype(str).nunique())
    return _noised_count(ledger, part, n, seed, policy)


def _noised_count(ledger: PrivacyLedger, part: str, n: int, seed: int, policy: SitePolicy) -> float:
    """`n` patients of `part`, noised once per (dataset, split seed), charged, and reused (at least 2)."""
    noised = ledger.noised_once(f"{ledger.fingerprint}:seed{seed}:{part}-patients", [float(n)], 1.0,
                                max(COUNT_NOISE, policy.min_release_noise), label=f"{part}-patient-count")
    return max(2.0, float(np.round(noised[0])))


def _dp_train_reply(site: LocalSite, n_noised: float, plan, ledger: PrivacyLedger, epsilon_before: float) -> dict:
    """A DP training reply's metrics and records: the noised patient count, the ledger's epsilons, the plan;
    losses, AUROC and the rejection count withheld (NaN)."""
    spent = ledger.summary()
    metrics = TrainMetrics(train_loss=math.nan, val_auroc=math.nan, val_loss=math.nan, num_examples=n_noised,
                           rejected=math.nan, steps=float(plan.steps_per_round), epsilon_before=epsilon_before,
                           epsilon=ledger.epsilon(), epsilon_train=spent["epsilon_train"],
                           epsilon_release=spent["epsilon_release"], noise_multiplier=plan.noise_multiplier)
    return {METRICS: MetricRecord(metrics.to_metrics()), PRIVACY: _privacy_record(site, ledger),
            DISCLOSURE: ConfigRecord(disclosure([NUM_EXAMPLES], [TRAIN_LOSS, VAL_AUROC, VAL_LOSS, REJECTED]))}


def _one_off_releases(cfg: RunConfig, policy: SitePolicy, ledger: PrivacyLedger) -> list[tuple[float, float, int]]:
    """The noised-once releases a DP run makes besides its training steps, as (sigma, q, steps): the training
    (or pretext) patient count, the test-patient count when the run evaluates, the offset's counts when fair-offset
    is on. The plan's target-epsilon covers them too (one charged in an earlier run is reserved again: spend <=
    target). Raises PolicyRefusal, before anything is released, when they alone would use the target up."""
    n = 1 + (cfg.server.fraction_evaluate > 0) + bool(cfg.fair.offset)
    releases = [(max(COUNT_NOISE, policy.min_release_noise), 1.0, 1)] * n
    spent = epsilon_of(releases, ledger.delta)
    if spent >= cfg.dp.target_epsilon:
        raise PolicyRefusal("target-epsilon", f"{cfg.dp.target_epsilon:g} is used up by this site's noised counts "
                                              f"alone (epsilon {spent:.3f} at its delta {ledger.delta:g}): ask for more")
    return releases


def _dp_offset(fair: FairPenaltyConfig, site: LocalSite, ledger: PrivacyLedger, seed: int, policy: SitePolicy, inner):
    """The mediator's logit offset under DP-SGD: from the training counts noised once (one image per patient,
    sensitivity 1) and charged, so each patient's loss depends on the others only through a DP release."""
    n_s, c_edges = fair.mediator_levels, mitigation.parse_edges(fair.covariate_edges)
    keep = one_per_patient(site.data.frame) & (site.split == "train").to_numpy()
    meta = fair_meta_rows(site.data.frame[keep], fair)
    counts, _ = mitigation.site_release_vectors(meta, np.zeros(int(keep.sum())), site.data.labels[keep], c_edges, n_s)
    columns = "|".join(str(v) for v in (fair.sensitive, fair.mediator, fair.covariate, fair.covariate_edges,
                                        fair.mediator_levels))
    noised = ledger.noised_once(f"{ledger.fingerprint}:seed{seed}:fair-offset:{columns}", counts, 1.0,
                                max(COUNT_NOISE, policy.min_release_noise), label="fair-offset-counts")
    return mitigation.MediatorOffset.from_counts(noised, n_s, len(c_edges) + 1, inner=inner)


@app.train(mods=[central_dp_mod])
@keep_details_local
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's train split; with DP, within the site's budget and policy."""
    prepared = _prepare(msg, context)
    cfg, policy, server_round = prepared.cfg, prepared.policy, prepared.server_round
    train_cfg = cfg.train
    try:
        policy.check_training(cfg.dp.enabled)
        policy.check_request(cfg)
    except PolicyRefusal as err:
        return _refusal(msg, prepared.name, POLICY_REFUSED, err)
    site = _site(context, prepared)
    if train_cfg.pretext:
        return _train_pretext(msg, context, prepared, site)
    model = _model(msg, cfg)
    # the classifier's parts (a detector's own head trains whatever is frozen: on fixed features with "encoder")
    freeze(getattr(model, "classifier", model), frozen_part(train_cfg.freeze, train_cfg.unfreeze_after, server_round))
    seed = train_cfg.seed  # splits and the stratified penalty's draws; never the DP noise
    x, y = site.part("train")
    if len(y) == 0:
        raise ValueError(f"site {site.name}: no training images after the split")
    common = dict(optimizer=train_cfg.optimizer, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                  proximal_mu=prepared.proximal_mu)
    fair_state = context.state.config_records.get("fair-state", ConfigRecord({"mu": 0.0}))
    if cfg.dp.enabled:
        ledger = _ledger(site, policy)
        epsilon_before = ledger.epsilon()
        try:
            one_off = _one_off_releases(cfg, policy, ledger)
        except PolicyRefusal as err:
            return _refusal(msg, site, POLICY_REFUSED, err)
        try:
            n_train = _noised_patients(ledger, site, "train", seed, policy)
            plan = plan_dp(n_train, train_cfg.batch_size, train_cfg.local_epochs, cfg.server.num_rounds,
                           cfg.dp.target_epsilon, ledger.delta, one_off=one_off)
            penalty, meta = _fair_penalty(msg, cfg, site, model, seed + server_round, mu=float(fair_state["mu"]),
                                          offset=False)
            if cfg.fair.offset:
                penalty = _dp_offset(cfg.fair, site, ledger, seed, policy, penalty)
                meta = _fair_meta(site, cfg.fair)
            ledger.check_budget([plan.mechanism])  # after every one-off release: the whole round must fit
            patients = site.data.frame.loc[(site.split == "train").to_numpy(), "patient_id"].astype(str).to_numpy()
            stats = train_dp(model, x, y, plan, ledger, patients=patients, batch_size=train_cfg.batch_size,
                             physical_batch_size=cfg.dp.physical_batch_size, max_grad_norm=cfg.dp.max_grad_norm,
                             server_round=server_round, run_id=str(context.run_id), meta=meta, penalty_fn=penalty,
                             **common)
        except BudgetExhausted as err:  # (mid-round only if another process charged meanwhile: nothing is sent)
            return _refusal(msg, site, BUDGET_EXHAUSTED, err)
        reply = _dp_train_reply(site, n_train, plan, ledger, epsilon_before)
    else:
        penalty, meta = _fair_penalty(msg, cfg, site, model, seed + server_round, mu=float(fair_state["mu"]))
        loss_fn, boxed = None, None
        if train_cfg.detection:  # the loader's metadata carries the boxes (the config rules out the penalty)
            from core_models.detection import box_meta, detection_objective
            per_image, annotated = site.boxes("train")
            meta, loss_fn = box_meta(per_image, annotated), detection_objective()
            boxed = int(np.sum(annotated))  # the server weighs the detection heads by it
        loader = make_loader(x, y, train_cfg.batch_size, shuffle=True, seed=seed + server_round, meta=meta)
        stats = train_epochs(model, loader, epochs=train_cfg.local_epochs, grad_accumulation=train_cfg.grad_accumulation,
                             device=get_device(), penalty_fn=penalty, loss_fn=loss_fn, **common)
        xv, yv = site.part("val")
        val = evaluate(model, make_loader(xv, yv, 256), get_device())
        reply = {METRICS: MetricRecord(TrainMetrics(
            train_loss=stats["train_loss"], val_auroc=val["auroc"], val_loss=val["loss"], num_examples=len(y),
            rejected=len(site.data.rejected), steps=stats["steps"], box_examples=boxed).to_metrics())}
    carried = penalty.state_dict() if penalty is not None else {}
    if "mu" in carried:  # the stratified penalty's multiplier carries over to the next round
        context.state["fair-state"] = ConfigRecord({"mu": float(carried["mu"])})
    return _reply(msg, site, {ARRAYS: ArrayRecord(model.state_dict()), **reply})


@app.evaluate()
@keep_details_local
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the received global model on the site's own test split. Under DP the scores stay at the site
    (the metrics are withheld, NaN) and the weight is the noised patient count: the server's questions about
    the model (a crafted model turns accuracy x n into an exact count of any predicate) get no exact answer."""
    prepared = _prepare(msg, context)
    cfg, policy = prepared.cfg, prepared.policy
    try:
        policy.check_request(cfg)
    except PolicyRefusal as err:
        return _refusal(msg, prepared.name, POLICY_REFUSED, err)
    site = _site(context, prepared)
    if _under_dp(cfg, policy):
        try:
            n_test = _noised_patients(_ledger(site, policy), site, "test", cfg.train.seed, policy)
        except BudgetExhausted as err:
            return _refusal(msg, site, BUDGET_EXHAUSTED, err)
        metrics = EvalMetrics(auroc=math.nan, accuracy=math.nan, loss=math.nan, num_examples=n_test)
        return _reply(msg, site, {METRICS: MetricRecord(metrics.to_metrics()),
                                  DISCLOSURE: ConfigRecord(disclosure([NUM_EXAMPLES],
                                                                      [EVAL_AUROC, EVAL_ACCURACY, EVAL_LOSS]))})
    model = _model(msg, cfg)
    x, y = site.part("test")
    if cfg.train.pretext:  # no classifier yet: the pretext loss on the test images
        metrics = EvalMetrics(auroc=math.nan, accuracy=math.nan, loss=_pretext_loss_on(model, x, cfg),
                              num_examples=len(y))
        return _reply(msg, site, {METRICS: MetricRecord(metrics.to_metrics())})
    result = evaluate(model, make_loader(x, y, 256), get_device())
    metrics = EvalMetrics(auroc=result["auroc"], accuracy=result["accuracy"], loss=result["loss"], num_examples=len(y),
                          map50=_map50(model, site, x) if cfg.train.detection else None)
    return _reply(msg, site, {METRICS: MetricRecord(metrics.to_metrics())})


def _map50(model, site: LocalSite, x: np.ndarray) -> float:
    """Average precision at IoU 0.5 of the global detector on the annotated test images (NaN without any)."""
    from core_models.detection import score_annotated
    return score_annotated(model, x, *site.boxes("test"), device=get_device())[0]


@app.query()
@keep_details_local
def statistics(msg: Message, context: Context) -> Message:
    """Release the statistics the server asks for (config `statistics`, comma-separated), each noised and
    charged to the site's ledger, if the site's policy agrees to release them at the requested noise; a site out
    of budget releases nothing."""
    prepared = _prepare(msg, context)
    cfg, policy, server_round = prepared.cfg, prepared.policy, prepared.server_round
    request = dict(msg.content[CONFIG])
    kinds = [k.strip() for k in str(request[STATISTICS]).split(",") if k.strip()]
    noise = cfg.release.noise
    try:
        policy.check_release(kinds, noise)
        policy.check_request(cfg)
        policy.check_dims(statistic_dims(request_sections(kinds, request), cfg.train.num_classes))  # each setting read and checked
    except PolicyRefusal as err:
        return _refusal(msg, prepared.name, POLICY_REFUSED, err)
    site = _site(context, prepared)
    model = _model(msg, cfg) if ARRAYS in msg.content.array_records else None
    model = getattr(model, "classifier", model)  # a detector's classifier: its scores and embedding
    ledger = _ledger(site, policy)
    releaser = Releaser(ledger, noise_multiplier=noise, min_count=cfg.release.min_count,
                        round=server_round, run_id=str(context.run_id))
    epsilon_before = ledger.epsilon()
    try:
        released = produce(kinds, site, model, request, releaser)
    except BudgetExhausted as err:
        return _refusal(msg, site, BUDGET_EXHAUSTED, err)
    content: dict = {kind: MetricRecord(values) for kind, values in released.items()}
    content[PRIVACY] = _privacy_record(site, ledger)
    content[METRICS] = MetricRecord({EPSILON_BEFORE: epsilon_before, EPSILON: ledger.epsilon()})
    return _reply(msg, site, content)
