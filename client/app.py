"""The equifed ClientApp: runs inside a hospital, trains on local data, replies with
weights and aggregate metrics only (no pixels, no patient IDs, no per-record values)."""

from __future__ import annotations

import functools
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import STATE_DIR, LocalSite, open_site, resolve_site_path
from core_models.networks import build_model, get_device
from core_models.training import evaluate, make_loader, train_epochs

app = ClientApp()


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


@app.train()
@keep_details_local
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's train split for `local-epochs`."""
    cfg = context.run_config
    site = _site(context)
    model = _model(msg, context)
    seed = int(cfg["seed"]) + int(msg.content["config"].get("server-round", 0))
    x, y = site.part("train")
    if len(y) == 0:
        raise ValueError(f"site {site.name}: no training images after the split")
    stats = train_epochs(
        model,
        make_loader(x, y, int(cfg["batch-size"]), shuffle=True, seed=seed),
        epochs=int(cfg["local-epochs"]),
        optimizer=str(cfg["optimizer"]),
        lr=float(cfg["learning-rate"]),
        weight_decay=float(cfg["weight-decay"]),
        grad_accumulation=int(cfg["grad-accumulation"]),
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
        device=get_device(),
    )
    xv, yv = site.part("val")
    val = evaluate(model, make_loader(xv, yv, 256), get_device())
    metrics = MetricRecord(
        {
            "train-loss": stats["train_loss"],
            "val-auroc": val["auroc"],
            "val-loss": val["loss"],
            "num-examples": len(y),
            "rejected": len(site.data.rejected),
        }
    )
    return _reply(msg, site, {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})


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
