"""Local DP-SGD with Opacus, charged step by step to the site's privacy ledger.

The noise multiplier is sized once for the whole planned training (all rounds), from the
target (epsilon, delta): sizing it per round would let every round spend the full
budget. Each round wraps a fresh plain model (Opacus refuses to wrap twice) and the
weights sent back are the plain model's (no `_module.` prefixes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn

from client.ledger import PrivacyLedger
from core_models.meta_loader import make_meta_loader
from core_models.networks import get_device, prepare_for_dp
from core_models.training import make_loader, make_optimizer


@dataclass(frozen=True)
class DPPlan:
    """What one round of DP-SGD will cost, fixed for the whole run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int

    @property
    def mechanism(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def plan_dp(
    n_train: int, batch_size: int, local_epochs: int, rounds: int, target_epsilon: float, delta: float
) -> DPPlan:
    """Noise multiplier that spends `target_epsilon` over `rounds` x `local_epochs` epochs.

    With Poisson sampling at rate q = batch/n, one epoch is about 1/q logical steps.
    """
    if n_train < 2:
        raise ValueError(f"DP-SGD needs at least 2 training images, got {n_train}")
    sample_rate = min(1.0, batch_size / n_train)
    steps_per_round = local_epochs * max(1, math.ceil(1 / sample_rate))
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=rounds * steps_per_round,
        accountant="rdp",
    )
    return DPPlan(noise_multiplier=float(sigma), sample_rate=sample_rate, steps_per_round=steps_per_round)


def train_dp(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    plan: DPPlan,
    ledger: PrivacyLedger,
    *,
    batch_size: int,
    physical_batch_size: int,
    max_grad_norm: float,
    optimizer: str = "adam",
    lr: float = 0.002,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
    server_round: int | None = None,
    run_id: str | None = None,
    meta: np.ndarray | None = None,
    penalty_fn=None,
) -> dict[str, float]:
    """Train `model` in place with DP-SGD for `plan.steps_per_round` logical steps.

    Logical batches of `batch_size` are processed in physical chunks of
    `physical_batch_size` (BatchMemoryManager): noise and one ledger step per logical
    batch, so memory follows the physical size and privacy the logical one.
    FedProx's proximal pull is applied after each noised step as a separate update: it
    uses only the server's weights, so it is post-processing and costs no privacy.
    `penalty_fn(logits, y, meta)` (with `meta` rows next to the images) is added to the loss; it
    must be a mean of per-sample terms with public coefficients (e.g. the fairness penalty with the
    server's broadcast PSE), so per-sample clipping still bounds each patient's influence.
    """
    device = get_device()
    model.to(device).train()
    # Frozen stem + no summed conv gradients: 1.25x a plain step instead of 1.7x
    # (benchmarks/bench_dp.py). The frozen stem keeps the global model's weights.
    prepare_for_dp(model)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    torch.manual_seed(seed)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    if meta is not None:
        loader = make_meta_loader(images, labels, meta, batch_size=batch_size, shuffle=True, seed=seed)
    else:
        loader = make_loader(images, labels, batch_size=batch_size, shuffle=True, seed=seed)
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_opt, private_loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
    )
    # The ledger, not the per-round engine, is the accountant of record. Opacus calls the
    # hook once per noised (logical) step, never on the physical chunks in between.
    charge = ledger.optimizer_hook(plan.noise_multiplier, plan.sample_rate, round=server_round, run_id=run_id)
    noised = [0]

    def on_noised_step(dp_optimizer) -> None:
        charge(dp_optimizer)
        noised[0] += 1

    private_opt.attach_step_hook(on_noised_step)
    criterion = nn.CrossEntropyLoss()
    total_loss, total_n = 0.0, 0
    while noised[0] < plan.steps_per_round:
        with BatchMemoryManager(
            data_loader=private_loader, max_physical_batch_size=physical_batch_size, optimizer=private_opt
        ) as batches:
            for x, y, *m in batches:
                if len(y) == 0:
                    continue
                x, y = x.to(device), y.to(device)
                logits = private_model(x)
                loss = criterion(logits, y)
                objective = loss if penalty_fn is None else loss + penalty_fn(logits, y, m[0].to(device))
                objective.backward()
                before = noised[0]
                private_opt.step()
                private_opt.zero_grad()
                if noised[0] > before:
                    if global_params is not None:
                        with torch.no_grad():
                            for p, g in zip(model.parameters(), global_params):
                                p.sub_(lr * proximal_mu * (p - g))
                total_loss += loss.item() * len(y)
                total_n += len(y)
                if noised[0] >= plan.steps_per_round:
                    break
    return {"train_loss": total_loss / max(total_n, 1), "steps": float(noised[0])}
