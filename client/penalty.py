"""The fairness objective a site trains with (run config fair-*): the path-specific penalty from the consortium's
broadcast strata, and the mediator's logit offset; the stratified penalty's multiplier kept in the node's state."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context

from client.fairness_stats import fair_meta_rows
from client.session import SiteSession
from client.shift_stats import one_per_patient
from client.site import LocalSite
from core_models.config import FairPenaltyConfig
from fairness import mitigation

FAIR_STATE = "fair-state"  # the node's own state record (never sent): the stratified penalty's multiplier
MU = "mu"


def fair_meta(site: LocalSite, fair: FairPenaltyConfig, part: str = "train") -> np.ndarray:
    """(A, S, C) rows of a split."""
    return fair_meta_rows(site.data.frame[(site.split == part).to_numpy()], fair)


def kept_mu(context: Context) -> float:
    """The stratified penalty's multiplier this site carried over from its last round (0 at first)."""
    return float(context.state.config_records.get(FAIR_STATE, ConfigRecord({MU: 0.0}))[MU])


def keep_mu(context: Context, penalty) -> None:
    """Carry the stratified penalty's multiplier over to the next round (penalties without one carry nothing)."""
    carried = penalty.state_dict() if penalty is not None else {}
    if MU in carried:
        context.state[FAIR_STATE] = ConfigRecord({MU: float(carried[MU])})


def site_penalty(session: SiteSession, model, seed: int, offset: bool = True):
    """The path-specific penalty and its metadata when `fair-lambda` > 0 and the server has broadcast the
    consortium's strata, weights and PSE (before round 1 and after every round); else (None, None).
    Under DP-SGD, or with `fair-form = "per-sample"`, the per-sample form (a loss of the training batch, so Opacus
    clips it); otherwise this site's share of the stratified estimate (extra draws from every stratum: far less
    gradient noise), with the site's augmented-Lagrangian multiplier (`fair-dual-lr` > 0; kept in the node's state,
    never sent). With `offset`, `fair-offset` wraps either (or nothing) in the mediator's logit offset
    (MediatorOffset) from the site's own exact training counts; under DP-SGD `dp_offset` builds it from noised
    counts instead."""
    cfg, site, fair = session.cfg, session.site, session.cfg.fair
    n_s, c_edges = fair.mediator_levels, mitigation.parse_edges(fair.covariate_edges)
    penalised = fair.lam > 0 and session.round.has_strata
    if not penalised and not (offset and fair.offset):  # fairness columns are read only when a feature is on
        return None, None
    meta = fair_meta(site, fair)
    penalty = None
    if penalised:
        consortium = session.consortium()
        if cfg.dp.enabled or fair.form == "per-sample":
            penalty = mitigation.PathSpecificPenalty(consortium.weights, lam=fair.lam, pse=consortium.pse)
        else:
            x, y = site.part(fair.pool_split)
            penalty = mitigation.StratifiedPathPenalty.for_site(
                model, x, fair_meta(site, fair, fair.pool_split), y, consortium, fair.lam, per_cell=fair.per_cell,
                seed=seed, dual_lr=fair.dual_lr, mu=kept_mu(session.context))
    if offset and fair.offset:
        # this site's own logit P(D | S) (local counts, nothing released): the posterior within a site is
        # LLR(lesion) + logit P(D | S, site), so the shared network is left with the lesion evidence alone
        y = site.part("train")[1]
        counts, _ = mitigation.site_release_vectors(meta, np.zeros(len(y)), y, c_edges, n_s)
        penalty = mitigation.MediatorOffset.from_counts(counts, n_s, len(c_edges) + 1, inner=penalty)
    return (penalty, meta) if penalty is not None else (None, None)


def dp_objective(session: SiteSession, model, seed: int):
    """The penalty and metadata of a DP round: the per-sample penalty, and with `fair-offset` the mediator's offset
    from the training counts noised once (one image per patient, sensitivity 1) and charged, so each patient's loss
    depends on the others only through a DP release."""
    penalty, meta = site_penalty(session, model, seed, offset=False)
    fair = session.cfg.fair
    if not fair.offset:
        return penalty, meta
    site, ledger = session.site, session.ledger
    n_s, c_edges = fair.mediator_levels, mitigation.parse_edges(fair.covariate_edges)
    keep = one_per_patient(site.data.frame) & (site.split == "train").to_numpy()
    counts, _ = mitigation.site_release_vectors(fair_meta_rows(site.data.frame[keep], fair),
                                                np.zeros(int(keep.sum())), site.data.labels[keep], c_edges, n_s)
    columns = "|".join(str(v) for v in (fair.sensitive, fair.mediator, fair.covariate, fair.covariate_edges,
                                        fair.mediator_levels))
    noised = ledger.noised_once(f"{ledger.fingerprint}:seed{session.cfg.train.seed}:fair-offset:{columns}", counts,
                                1.0, session.count_noise, label="fair-offset-counts")
    offset = mitigation.MediatorOffset.from_counts(noised, n_s, len(c_edges) + 1, inner=penalty)
    return offset, fair_meta(site, fair)
