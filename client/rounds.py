"""What a site does with a train request: a round of label training or of self-supervised pretraining, plain or
under DP-SGD (the DP block, once: the noised patient count, the plan within the site's budget, the steps charged
to its ledger), and the reply's figures."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from client.dp import DPSettings, PatientData, plan_dp, train_dp
from client.penalty import dp_objective, keep_mu, site_penalty
from client.session import SiteSession
from client.site import LocalSite
from core_models.config import RunConfig
from core_models.pretext import get_task, pretext_loss_fn
from core_models.pretrained import freeze, frozen_part
from core_models.protocol import SiteReply, TrainMetrics
from core_models.training import evaluate, make_loader, train_epochs

# (penalty, metadata rows) of a DP round, built once the plan is known and before the budget is checked: building it
# may charge the ledger (the offset's noised counts)
Objective = Callable[[], tuple]


def label_round(session: SiteSession, model: torch.nn.Module) -> SiteReply:
    """Train the global model on the site's train split."""
    cfg, site, server_round = session.cfg, session.site, session.round.server_round
    # the classifier's parts (a detector's own head trains whatever is frozen: on fixed features with "encoder")
    freeze(getattr(model, "classifier", model), frozen_part(cfg.train.freeze, cfg.train.unfreeze_after, server_round))
    seed = cfg.train.seed + server_round  # the loader's shuffle and the stratified penalty's draws; never DP noise
    x, y = site.part("train")
    if len(y) == 0:
        raise ValueError(f"site {site.name}: no training images after the split")
    if cfg.dp.enabled:
        patients = site.data.frame.loc[(site.split == "train").to_numpy(), "patient_id"].astype(str).to_numpy()
        return private_round(session, model, PatientData(x, y, patients), "train",
                             objective=lambda: dp_objective(session, model, seed))
    penalty, meta = site_penalty(session, model, seed)
    loss_fn, boxed = None, None
    if cfg.train.detection:  # the loader's metadata carries the boxes (the config rules out the penalty)
        from core_models.detection import box_meta, detection_objective
        per_image, annotated = site.boxes("train")
        meta, loss_fn = box_meta(per_image, annotated), detection_objective()
        boxed = int(np.sum(annotated))  # the server weighs the detection heads by it
    stats = plain_epochs(session, model, make_loader(x, y, cfg.train.batch_size, shuffle=True, seed=seed, meta=meta),
                         penalty_fn=penalty, loss_fn=loss_fn, grad_accumulation=cfg.train.grad_accumulation)
    keep_mu(session.context, penalty)  # (under DP the penalty has no multiplier to carry)
    val = evaluate(model, make_loader(*site.part("val"), 256), session.device)
    return SiteReply.trained(site.name, TrainMetrics(
        train_loss=stats["train_loss"], val_auroc=val["auroc"], val_loss=val["loss"], num_examples=len(y),
        rejected=len(site.data.rejected), steps=stats["steps"], box_examples=boxed))


def pretext_round(session: SiteSession, model: torch.nn.Module) -> SiteReply:
    """A round of self-supervised pretraining: the pretext loss on the site's images (labels unused), under DP-SGD
    when the run asks for DP, charged to the same ledger as label training. The reply has the label round's
    metrics; the pretext losses stand in for train/val loss."""
    cfg, site, train = session.cfg, session.site, session.cfg.train
    if frozen_part(train.freeze, train.unfreeze_after, session.round.server_round) == "stem":
        if model.stem is None:
            raise ValueError(f"model {train.model!r} has no stem to freeze; use freeze=none")
        for p in model.stem.parameters():  # (not pretrained.freeze: it would unfreeze the unused classifier head)
            p.requires_grad_(False)
    images, patients = pretext_images(site)
    if len(images) == 0:
        raise ValueError(f"site {site.name}: no images for the pretext phase")
    zeros = np.zeros(len(images), dtype=np.int64)
    loss_fn = pretext_loss_fn(train.pretext, session.draws())
    if cfg.dp.enabled:
        return private_round(session, model, PatientData(images, zeros, patients), "pretext", loss_fn=loss_fn)
    loader = make_loader(images, zeros, train.batch_size, shuffle=True, seed=train.seed + session.round.server_round)
    stats = plain_epochs(session, model, loader, loss_fn=loss_fn)
    return SiteReply.trained(site.name, TrainMetrics(
        train_loss=stats["train_loss"], val_auroc=math.nan,
        val_loss=pretext_loss_on(model, site.part("val")[0], cfg, session.device),
        num_examples=len(images), rejected=len(site.data.rejected), steps=stats["steps"]))


def plain_epochs(session: SiteSession, model: torch.nn.Module, loader, **objective) -> dict:
    """The round's local epochs without DP, on the site's device."""
    train = session.cfg.train
    return train_epochs(model, loader, epochs=train.local_epochs, optimizer=train.optimizer, lr=train.learning_rate,
                        weight_decay=train.weight_decay, proximal_mu=session.round.proximal_mu, device=session.device,
                        **objective)


def private_round(session: SiteSession, model: torch.nn.Module, data: PatientData, part: str,
                  objective: Objective | None = None, loss_fn=None) -> SiteReply:
    """A round under DP-SGD within the site's budget and policy: the one-off releases checked against the target
    (PolicyRefusal before anything is released), the patient count of `part` noised once, the plan, the objective,
    then the whole round checked against the budget (BudgetExhausted: nothing is sent) and trained. The reply has
    the noised count, the ledger's epsilons and the plan; losses, AUROC and the rejection count withheld (NaN)."""
    cfg, ledger = session.cfg, session.ledger
    epsilon_before = ledger.epsilon()
    one_off = session.one_off_releases()
    n_noised = session.noised_count(part, len(set(data.patient_ids().tolist())))
    plan = plan_dp(n_noised, cfg.train.batch_size, cfg.train.local_epochs, cfg.server.num_rounds,
                   cfg.dp.target_epsilon, ledger.delta, one_off=one_off)
    penalty, meta = objective() if objective is not None else (None, None)
    ledger.check_budget([plan.mechanism])  # after every one-off release: the whole round must fit
    train_dp(model, PatientData(data.images, data.labels, data.patients, meta), plan, ledger,
             DPSettings.of_run(cfg, session.round.proximal_mu), penalty_fn=penalty, loss_fn=loss_fn,
             server_round=session.round.server_round, run_id=session.run_id, device=session.device)
    spent = ledger.summary()
    return SiteReply.trained(session.site.name, TrainMetrics(
        train_loss=math.nan, val_auroc=math.nan, val_loss=math.nan, num_examples=n_noised, rejected=math.nan,
        steps=float(plan.steps_per_round), epsilon_before=epsilon_before, epsilon=ledger.epsilon(),
        epsilon_train=spent["epsilon_train"], epsilon_release=spent["epsilon_release"],
        noise_multiplier=plan.noise_multiplier), dataset_tag=session.dataset_tag())


def pretext_images(site: LocalSite) -> tuple[np.ndarray, np.ndarray]:
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


def pretext_loss_on(model: torch.nn.Module, images: np.ndarray, cfg: RunConfig,
                    device: torch.device | None = None) -> float:
    """The mean pretext loss of the model on images (a validation figure for best-by = val-loss), on `device`
    (default: where the model is). A loss that compares the images of a batch is scored in batches of at most the
    training size (the last may be smaller)."""
    if len(images) == 0:
        return math.nan
    device = device or next(model.parameters()).device
    model.to(device).eval()
    loss_fn = pretext_loss_fn(cfg.train.pretext, torch.Generator().manual_seed(cfg.train.seed))
    batch = 256 if get_task(cfg.train.pretext).per_sample else cfg.train.batch_size
    total = 0.0
    with torch.no_grad():
        for (x, _y) in make_loader(images, np.zeros(len(images), dtype=np.int64), batch):
            total += float(loss_fn(model, x.to(device), _y)) * len(x)
    return total / len(images)
