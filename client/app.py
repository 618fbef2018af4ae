"""The equifed ClientApp: runs inside a hospital, trains on local data, replies with
weights and aggregate metrics only (no pixels, no patient IDs, no per-record values)."""

from __future__ import annotations

import functools
import math
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod


from client.dp import plan_dp, train_dp
from client.ledger import BudgetExhausted, PrivacyLedger, dataset_fingerprint
from client.site import STATE_DIR, LocalSite, open_site, resolve_site_path, site_max_epsilon
from client.statistics import Releaser, produce
from core_models.networks import build_model, get_device
from core_models.training import evaluate, make_loader, train_epochs

app = ClientApp()

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
                         run_id=str(context.run_id), **common)
        privacy = {"fingerprint": ledger.fingerprint}
        spent = ledger.summary()
        epsilon, noise = ledger.epsilon(), plan.noise_multiplier
        epsilon_train, epsilon_release = spent["epsilon_train"], spent["epsilon_release"]
    else:
        stats = train_epochs(model, make_loader(x, y, int(cfg["batch-size"]), shuffle=True, seed=seed),
                             epochs=int(cfg["local-epochs"]), grad_accumulation=int(cfg["grad-accumulation"]),
                             device=get_device(), **common)
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
