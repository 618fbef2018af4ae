"""The equifed ClientApp: runs inside a hospital, trains on local data, replies with
weights and aggregate metrics only (no pixels, no patient IDs, no per-record values).

Each handler reads the request once (client/session.py: every value checked before any data are read), does its
job and answers with a typed reply (core_models/protocol.py); a refusal by the site's policy or budget is an Error
reply the server records, any other failure a SiteError that names only its kind."""

from __future__ import annotations

import functools
import math
import traceback
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import secagg
from client.audit import audit_mod
from client.ledger import BudgetExhausted
from client.policy import PolicyRefusal, statistic_dims
from client.producers import produce, request_sections
from client.rounds import label_round, pretext_round, pretext_loss_on
from client.session import SiteSession
from client.site import SITE_LOG, resolve_site_path
from client.statistics import Releaser, fairness_noise, keep_for_sum, secure_share
from core_models import wire
from core_models.protocol import (BUDGET_EXHAUSTED, SECURE_SITES, STAT_FAIRNESS, EvalMetrics, SiteReply,
                                  StatisticsRequest, site_error)
from core_models.secagg import ACTION as SECAGG_ACTION, SecAggError
from core_models.training import evaluate, make_loader

__all__ = ["BUDGET_EXHAUSTED", "SiteError", "app", "evaluate_global", "secure_sum", "statistics", "train"]

app = ClientApp(mods=[audit_mod])  # audit_mod: the site's own log of what it sends (client/audit.py)

REFUSALS = (PolicyRefusal, BudgetExhausted)  # answered as an Error reply with the site's name and its code


def central_dp_mod(msg: Message, context: Context, call_next):
    """Flower's fixedclipping_mod, only when the server runs central (site-level) DP:
    the server's DifferentialPrivacyClientSideFixedClipping wrapper sends the clipping norm."""
    config = wire.records_of(msg).config()
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in config:
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


@app.train(mods=[central_dp_mod])
@keep_details_local
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's train split (or its pretext task); with DP, within the site's budget
    and policy. In a secure round the model stays here until the secure sum (`secure_sum`)."""
    session = SiteSession(msg, context)
    try:
        session.policy.check_training(session.cfg.dp.enabled)
        session.policy.check_aggregation(session.round.secure_sites, session.cfg.server.secagg)
        session.policy.check_request(session.cfg)
        session.open_data()  # now that the request passed every check
        model = session.global_model()
        report = (pretext_round if session.cfg.train.pretext else label_round)(session, model)
    except REFUSALS as err:  # (mid-round only if another process charged meanwhile: nothing is sent)
        return session.refusal(err)
    if session.round.secure_sites:
        return session.keep_for_sum(report, model)
    return session.reply(report, model)


@app.train(SECAGG_ACTION)
@keep_details_local
def secure_sum(msg: Message, context: Context) -> Message:
    """One stage of the secure sum of this round's trained models (core_models/secagg.py): the site's keys,
    shares and model stay in its Context state; a stage its policy (secagg-min-sites) or the protocol's rules
    forbid is refused with the reason."""
    session = SiteSession(msg, context)
    try:
        record = secagg.answer(context.state, context.node_id, session.round.server_round,
                               session.policy.secagg_min_sites, wire.secagg_record(msg))
    except SecAggError as err:
        return session.refusal(err)
    return wire.secagg_reply(msg, record)


@app.evaluate()
@keep_details_local
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the received global model on the site's own test split. Under DP the scores stay at the site
    (the metrics are withheld, NaN) and the weight is the noised patient count: the server's questions about
    the model (a crafted model turns accuracy x n into an exact count of any predicate) get no exact answer."""
    session = SiteSession(msg, context)
    try:
        session.policy.check_request(session.cfg)
        return session.reply(_scores(session))
    except REFUSALS as err:
        return session.refusal(err)


def _scores(session: SiteSession) -> SiteReply:
    cfg, site = session.cfg, session.site
    if session.under_dp:
        metrics = EvalMetrics(auroc=math.nan, accuracy=math.nan, loss=math.nan,
                              num_examples=session.noised_patients("test"))
        return SiteReply.evaluated(site.name, metrics, private=True)
    model = session.global_model()
    x, y = site.part("test")
    if cfg.train.pretext:  # no classifier yet: the pretext loss on the test images
        return SiteReply.evaluated(site.name, EvalMetrics(auroc=math.nan, accuracy=math.nan,
                                                          loss=pretext_loss_on(model, x, cfg, session.device),
                                                          num_examples=len(y)))
    result = evaluate(model, make_loader(x, y, 256), session.device)
    return SiteReply.evaluated(site.name, EvalMetrics(
        auroc=result["auroc"], accuracy=result["accuracy"], loss=result["loss"], num_examples=len(y),
        map50=_map50(model, session, x) if cfg.train.detection else None))


def _map50(model, session: SiteSession, x) -> float:
    """Average precision at IoU 0.5 of the global detector on the annotated test images (NaN without any)."""
    from core_models.detection import score_annotated
    return score_annotated(model, x, *session.site.boxes("test"), device=session.device)[0]


@app.query()
@keep_details_local
def statistics(msg: Message, context: Context) -> Message:
    """Release the statistics the server asks for, each noised and charged to the site's ledger, if the site's
    policy agrees to release them at the requested noise; a site out of budget releases nothing. With a secure
    sum (request entry secagg-sites) the fairness cells wait in the Context for the sum (`secure_sum`)."""
    session = SiteSession(msg, context)
    request = StatisticsRequest.from_config(wire.records_of(msg).config())
    cfg, policy = session.cfg, session.policy
    secure_sites = int(request.settings.get(SECURE_SITES, 0) or 0)
    try:
        if secure_sites:
            policy.check_aggregation(secure_sites)
        policy.check_release(list(request.kinds), cfg.release.noise)
        if STAT_FAIRNESS in request.kinds:
            policy.check_release([STAT_FAIRNESS], fairness_noise(cfg))
        policy.check_request(cfg)
        sections = request_sections(list(request.kinds), request.to_config())  # each setting read and checked
        policy.check_dims(statistic_dims(sections, cfg.train.num_classes))
        return session.reply(_release(session, request, secure_sites))
    except REFUSALS as err:
        return session.refusal(err)


def _release(session: SiteSession, request: StatisticsRequest, secure_sites: int = 0) -> SiteReply:
    site = session.site
    model = session.global_model()
    model = getattr(model, "classifier", model)  # a detector's classifier
    if model is not None:
        model.to(session.device)  # scored where the site trains (client/shift_stats.model_outputs follows it)
    ledger = session.ledger
    common = dict(min_count=session.cfg.release.min_count, round=session.round.server_round, run_id=session.run_id)
    releaser = Releaser(ledger, noise_multiplier=session.cfg.release.noise, **common)
    epsilon_before = ledger.epsilon()
    kinds = list(request.kinds)
    summed = secure_sites and STAT_FAIRNESS in kinds
    plain = [k for k in kinds if k != STAT_FAIRNESS]
    released = produce(plain, site, model, request.to_config(), releaser)
    if STAT_FAIRNESS in kinds and not summed:
        cells = Releaser(ledger, noise_multiplier=fairness_noise(session.cfg), **common)
        released.update(produce([STAT_FAIRNESS], site, model, request.to_config(), cells))
    if summed:
        share, charged = secure_share(fairness_noise(session.cfg), secure_sites)
        sharer = Releaser(ledger, noise_multiplier=share, charged_multiplier=charged, **common)
        record = produce([STAT_FAIRNESS], site, model, request.to_config(), sharer)[STAT_FAIRNESS]
        released[STAT_FAIRNESS] = keep_for_sum(session.context.state, session.round.server_round, record,
                                               secure_sites)
    return SiteReply.released(site.name, released, session.dataset_tag(), epsilon_before, ledger.epsilon())
