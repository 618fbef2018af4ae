"""The equifed ClientApp: runs inside a hospital, trains on local data, replies with
weights and aggregate metrics only (no pixels, no patient IDs, no per-record values)."""

from __future__ import annotations

import functools
import math
import traceback
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod


from client.audit import audit_mod
from client.dp import plan_dp, train_dp
from client.ledger import BudgetExhausted, PrivacyLedger, dataset_fingerprint
from client.site import STATE_DIR, LocalSite, open_site, resolve_site_path, site_max_epsilon
from client.statistics import Releaser, produce, producer
import client.shift_stats  # noqa: F401  (registers the "shift" producer)
import client.fairness_stats  # noqa: F401  (registers the "fairness" producer)
from core_models.meta_loader import make_meta_loader
from core_models.networks import build_model, get_device
from core_models.training import evaluate, make_loader, predict_proba, train_epochs
from fairness import mitigation

app = ClientApp(mods=[audit_mod])  # audit_mod: the site's own log of what it sends (client/audit.py)

BUDGET_EXHAUSTED = 4001  # Error code in replies from a site that refuses to train


def central_dp_mod(msg: Message, context: Context, call_next):
    """Flower's fixedclipping_mod, only when the server runs central (site-level) DP:
    the server's DifferentialPrivacyClientSideFixedClipping wrapper sends the clipping norm."""
    config = msg.content.config_records.get("config")
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
            raise SiteError(f"site {name}: {type(err).__name__} during {handler.__name__}; "
                            f"details in the site's {STATE_DIR}/client_errors.log") from None

    return wrapper


def _error_log(context: Context) -> Path | None:
    try:
        state = resolve_site_path(dict(context.node_config), dict(context.run_config)) / STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        return state / "client_errors.log"
    except (OSError, ValueError):
        return None


def _site(context: Context) -> LocalSite:
    torch.set_num_threads(1)  # several simulated sites share the CPU
    cfg = context.run_config
    path = resolve_site_path(dict(context.node_config), dict(cfg))
    name = context.node_config.get("site")
    return open_site(
        path,
        image_size=int(cfg["image-size"]),
        seed=int(cfg["seed"]),
        num_classes=int(cfg["num-classes"]),
        name=str(name) if name else None,
    )


def _model(msg: Message, context: Context) -> torch.nn.Module:
    model = build_model(str(context.run_config["model"]), int(context.run_config["num-classes"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _reply(msg: Message, site: LocalSite, content: dict) -> Message:
    return Message(content=RecordDict({**content, "site": ConfigRecord({"name": site.name})}), reply_to=msg)


def _fair_meta(site: LocalSite, cfg, part: str = "train"):
    """(A, S, C) rows of a split, from the columns named by run config `fair-*`."""
    frame = site.data.frame[(site.split == part).to_numpy()]
    return mitigation.meta_array(frame, str(cfg.get("fair-sensitive", "group")),
                                 str(cfg.get("fair-mediator", "scanner_legacy")), str(cfg.get("fair-covariate", "")),
                                 int(cfg.get("fair-reference", 0)))


def _fair_penalty(msg: Message, cfg, site: LocalSite, model, seed: int, mu: float = 0.0):
    """The path-specific penalty and its metadata when `fair-lambda` > 0 and the server has
    broadcast the consortium's strata, weights and PSE (before round 1 and after every round); else (None, None).
    Under DP-SGD, or with `fair-form = "per-sample"`, the per-sample form (a loss of the training batch, so Opacus
    clips it); otherwise this site's share of the stratified estimate (extra draws from every stratum: far less
    gradient noise), with the site's augmented-Lagrangian multiplier ``mu`` (`fair-dual-lr` > 0; kept in the node's
    state, never sent). `fair-offset` wraps either (or nothing) in the mediator's logit offset (MediatorOffset)
    from the site's own training counts."""
    config = msg.content["config"]
    lam = float(cfg.get("fair-lambda", 0.0))
    n_s, c_edges = int(cfg.get("fair-mediator-levels", 2)), mitigation.parse_edges(cfg.get("fair-covariate-edges", ""))
    meta = _fair_meta(site, cfg)
    penalty = None
    if lam > 0 and "fair-ratio" in config:
        consortium = mitigation.ConsortiumStrata.from_config(config, n_s, c_edges)
        if bool(cfg.get("dp", False)) or str(cfg.get("fair-form", "stratified")) == "per-sample":
            penalty = mitigation.PathSpecificPenalty(consortium.weights, lam=lam, pse=consortium.pse)
        else:
            split = str(cfg.get("fair-pool-split", "val"))
            x, y = site.part(split)
            penalty = mitigation.StratifiedPathPenalty.for_site(
                model, x, _fair_meta(site, cfg, split), y, consortium, lam,
                per_cell=int(cfg.get("fair-per-cell", 32)), seed=seed, dual_lr=float(cfg.get("fair-dual-lr", 0.0)),
                mu=mu)
    if bool(cfg.get("fair-offset", False)):
        # this site's own logit P(D | S) (local counts, nothing released): the posterior within a site is
        # LLR(lesion) + logit P(D | S, site), so the shared network is left with the lesion evidence alone
        y = site.part("train")[1]
        counts, _ = mitigation.site_release_vectors(meta, np.zeros(len(y)), y, c_edges, n_s)
        penalty = mitigation.MediatorOffset.from_counts(counts, n_s, len(c_edges) + 1, inner=penalty)
    return (penalty, meta) if penalty is not None else (None, None)


@producer("fair-pse")
def _fair_pse_statistics(site: LocalSite, model, request: dict, releaser: Releaser) -> dict:
    """Counts of (A, stratum = S, C-bin, D) and the global model's score sums over the same cells, on the split
    the penalty draws from (`fair-pool-split`), each noised (sensitivity 1: one patient is in one cell, score in
    [0, 1]) and charged."""
    split = str(request.get("fair-pool-split", "val"))
    x, y = site.part(split)
    scores = predict_proba(model, make_loader(x, y, 256), get_device())[:, 1]
    counts, sums = mitigation.site_release_vectors(
        _fair_meta(site, request, split), scores, y, mitigation.parse_edges(request.get("fair-covariate-edges", "")),
        int(request.get("fair-mediator-levels", 2)))
    out = {"sums": releaser.release("fair-pse-sums", sums, 1.0)}
    if bool(request.get("fair-counts", True)):  # the counts do not change: the server asks for them once
        out["counts"] = releaser.release_counts("fair-pse-counts", counts, 1.0)
    return out


@app.train(mods=[central_dp_mod])
@keep_details_local
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's train split; with DP, within the site's budget."""
    cfg = context.run_config
    site = _site(context)
    model = _model(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    seed = int(cfg["seed"]) + server_round
    x, y = site.part("train")
    if len(y) == 0:
        raise ValueError(f"site {site.name}: no training images after the split")
    common = dict(optimizer=str(cfg["optimizer"]), lr=float(cfg["learning-rate"]),
                  weight_decay=float(cfg["weight-decay"]),
                  proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)))
    privacy: dict = {}
    fair_state = context.state.config_records.get("fair-state", ConfigRecord({"mu": 0.0}))
    penalty, meta = _fair_penalty(msg, cfg, site, model, seed, mu=float(fair_state["mu"]))
    if bool(cfg.get("dp", False)):
        ledger = PrivacyLedger.open(site.path, delta=float(cfg["target-delta"]),
                                    max_epsilon=site_max_epsilon(site.path, dict(context.node_config)),
                                    fingerprint=dataset_fingerprint(site.path))
        plan = plan_dp(len(y), int(cfg["batch-size"]), int(cfg["local-epochs"]), int(cfg["num-server-rounds"]),
                       float(cfg["target-epsilon"]), float(cfg["target-delta"]))
        epsilon_before = ledger.epsilon()
        try:
            ledger.check_budget([plan.mechanism])
        except BudgetExhausted as err:
            return Message(Error(code=BUDGET_EXHAUSTED, reason=f"site {site.name}: budget exhausted: {err}"),
                           reply_to=msg)
        stats = train_dp(model, x, y, plan, ledger, batch_size=int(cfg["batch-size"]),
                         physical_batch_size=int(cfg["physical-batch-size"]),
                         max_grad_norm=float(cfg["max-grad-norm"]), seed=seed, server_round=server_round,
                         run_id=str(context.run_id), meta=meta, penalty_fn=penalty, **common)
        privacy = {"fingerprint": ledger.fingerprint}
        spent = ledger.summary()
        epsilon, noise = ledger.epsilon(), plan.noise_multiplier
        epsilon_train, epsilon_release = spent["epsilon_train"], spent["epsilon_release"]
    else:
        loader = (make_loader(x, y, int(cfg["batch-size"]), shuffle=True, seed=seed) if penalty is None else
                  make_meta_loader(x, y, meta, int(cfg["batch-size"]), shuffle=True, seed=seed))
        stats = train_epochs(model, loader, epochs=int(cfg["local-epochs"]),
                             grad_accumulation=int(cfg["grad-accumulation"]), device=get_device(),
                             penalty_fn=penalty, **common)
        epsilon_before = epsilon = epsilon_train = epsilon_release = math.inf
        noise = 0.0
    xv, yv = site.part("val")
    val = evaluate(model, make_loader(xv, yv, 256), get_device())
    metrics = MetricRecord(
        {
            "train-loss": stats["train_loss"],
            "val-auroc": val["auroc"],
            "val-loss": val["loss"],
            "num-examples": len(y),
            "rejected": len(site.data.rejected),
            "steps": stats["steps"],
            "epsilon-before": epsilon_before,
            "epsilon": epsilon,
            "epsilon-train": epsilon_train,
            "epsilon-release": epsilon_release,
            "noise-multiplier": noise,
        }
    )
    stratified = getattr(penalty, "inner", penalty)
    if isinstance(stratified, mitigation.StratifiedPathPenalty):  # the multiplier carries over to the next round
        context.state["fair-state"] = ConfigRecord({"mu": float(stratified.mu)})
    content = {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}
    if privacy:
        content["privacy"] = ConfigRecord(privacy)
    return _reply(msg, site, content)


@app.evaluate()
@keep_details_local
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the received global model on the site's own test split."""
    site = _site(context)
    model = _model(msg, context)
    x, y = site.part("test")
    result = evaluate(model, make_loader(x, y, 256), get_device())
    metrics = MetricRecord(
        {
            "eval-auroc": result["auroc"],
            "eval-accuracy": result["accuracy"],
            "eval-loss": result["loss"],
            "num-examples": len(y),
        }
    )
    return _reply(msg, site, {"metrics": metrics})


@app.query()
@keep_details_local
def statistics(msg: Message, context: Context) -> Message:
    """Release the statistics the server asks for (config `statistics`, comma-separated),
    each noised and charged to the site's ledger; a site out of budget releases nothing."""
    cfg = context.run_config
    site = _site(context)
    model = _model(msg, context) if "arrays" in msg.content.array_records else None
    request = dict(msg.content["config"])
    server_round = int(request.get("server-round", 0))
    ledger = PrivacyLedger.open(site.path, delta=float(cfg["target-delta"]),
                                max_epsilon=site_max_epsilon(site.path, dict(context.node_config)),
                                fingerprint=dataset_fingerprint(site.path))
    releaser = Releaser(ledger, noise_multiplier=float(cfg["release-noise"]),
                        min_count=int(cfg["release-min-count"]), round=server_round, run_id=str(context.run_id))
    kinds = [k.strip() for k in str(request["statistics"]).split(",") if k.strip()]
    epsilon_before = ledger.epsilon()
    try:
        released = produce(kinds, site, model, request, releaser)
    except BudgetExhausted as err:
        return Message(Error(code=BUDGET_EXHAUSTED, reason=f"site {site.name}: budget exhausted: {err}"),
                       reply_to=msg)
    content: dict = {kind: MetricRecord(values) for kind, values in released.items()}
    content["privacy"] = ConfigRecord({"fingerprint": ledger.fingerprint})
    content["metrics"] = MetricRecord({"epsilon-before": epsilon_before, "epsilon": ledger.epsilon()})
    return _reply(msg, site, content)
