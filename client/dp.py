"""Local DP-SGD with Opacus, the patient as the privacy unit, charged step by step to the site's ledger.

The noise multiplier is sized once for the whole planned training (all rounds), from the target (epsilon,
delta): sizing it per round would let every round spend the full budget. Each round wraps a fresh plain model
(Opacus refuses to wrap twice) and the weights sent back are the plain model's (no `_module.` prefixes).

Privacy unit: each logical step includes every *patient* independently with probability q (Poisson
subsampling, as the RDP analysis assumes) and takes one of that patient's images, drawn uniformly. Per-sample
clipping then bounds each patient's contribution to a step by `max_grad_norm`, however many images the patient
has, so the ledger's epsilon is per patient. (Clipping each patient's summed gradient over all their images
would use more images per step but needs per-patient gradient sums that Opacus' hooks do not give.)

Randomness: the Poisson draws and the Gaussian noise come from generators seeded from OS entropy (os.urandom)
on every call. Nothing in the run config (the server's `seed`) reaches them, so the server cannot regenerate
and subtract the noise. Opacus' `secure_mode` would do the same with torchcsprng, which does not install with
torch 2.x. On CUDA the noise generator is a CUDA generator on the parameters' own card (Opacus draws the noise
there, with the generator it is given, and cannot take one from another device), seeded from OS entropy alike.

Non-finite per-sample gradients: the server crafts the model, so it can make one sample's gradient inf or NaN
(a logit that overflows only on a target image). Opacus' clip factor `C / (norm + 1e-6)` is then NaN for that
sample and the NaN goes through the sum and the noise into the weights: an exact membership test. Before
clipping, `NonfiniteGuard` replaces the per-sample gradient of such a sample by zero in every parameter (a zero
gradient is within the clip norm, so the sensitivity argument holds: the sample simply adds nothing to that step)
and counts them; the count stays in the site's log and `train_dp`'s stats, never in a reply.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

import core_models.grad_samplers  # noqa: F401  (DPConv2d's per-sample gradient, registered with Opacus)
from client.ledger import PrivacyLedger, os_entropy_rng
from client.ledger.accounting import epsilon_of
from core_models.devices import resolve_device
from core_models.networks import prepare_for_dp
from core_models.training import LossFn, Penalty, local_optimizer, tensor_dataset, train_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPPlan:
    """What one round of DP-SGD will cost, fixed for the whole run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    expected_batch_size: float  # q x (noised) patient count: the divisor of the noised gradient sum

    @property
    def mechanism(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def plan_dp(
    n_patients: float, batch_size: int, local_epochs: int, rounds: int, target_epsilon: float, delta: float,
    one_off: Sequence[tuple[float, float, int]] = (),
) -> DPPlan:
    """Noise multiplier that spends `target_epsilon` over `rounds` x `local_epochs` epochs, together with the
    `one_off` mechanisms the run charges besides training ((sigma, q, steps) each: the noised patient counts), so
    that the run's whole spend stays within `target_epsilon` at `delta`.

    `n_patients` is the site's *noised* training-patient count (released once): q = batch / n and
    the step count follow from it, so neither reveals the exact count. With Poisson sampling at
    rate q, one epoch is about 1/q logical steps.
    """
    n = float(n_patients)
    if not n >= 2:
        raise ValueError(f"DP-SGD needs at least 2 training patients, got {n:g}")
    sample_rate = min(1.0, batch_size / n)
    steps_per_round = local_epochs * max(1, math.ceil(1 / sample_rate))
    steps = rounds * steps_per_round
    one_off = [tuple(m) for m in one_off]
    if not one_off:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant="rdp")
    else:
        sigma = _noise_within(target_epsilon, delta, sample_rate, steps, one_off)
    return DPPlan(noise_multiplier=float(sigma), sample_rate=sample_rate, steps_per_round=steps_per_round,
                  expected_batch_size=sample_rate * n)


def _noise_within(target: float, delta: float, q: float, steps: int, one_off: list) -> float:
    """The smallest noise multiplier (to 0.1 %) whose training, composed with `one_off`, spends <= `target`."""
    spent = epsilon_of(one_off, delta)
    if spent >= target:
        raise ValueError(f"target-epsilon {target:g} is used up by the run's one-off releases alone "
                         f"(epsilon {spent:.3f} at delta {delta:g}): raise it")

    def within(sigma: float) -> bool:
        return epsilon_of(one_off + [(sigma, q, steps)], delta) <= target

    lo, hi = 0.0, 1.0
    while not within(hi):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches target-epsilon {target:g}")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return hi


class PatientPoissonSampler:
    """`steps` batches of image indices: each patient in with probability `sample_rate`, one image each."""

    def __init__(self, patients, sample_rate: float, steps: int, rng: np.random.Generator):
        _, inverse = np.unique(np.asarray(patients).astype(str), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        self.images_of = np.split(order, bounds)  # the image indices of each patient
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.rng = rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            chosen = np.flatnonzero(self.rng.random(len(self.images_of)) < self.sample_rate)
            yield [int(self.images_of[k][self.rng.integers(len(self.images_of[k]))]) for k in chosen]


def os_entropy_generator(device) -> torch.Generator:
    """A torch generator for the DP noise on `device` (Opacus draws the noise where the parameters are), seeded
    from the OS."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


def _finite_rows(g: torch.Tensor) -> torch.Tensor:
    """(B,) mask of the samples whose per-sample gradient `g` (B, ...) is finite everywhere."""
    finite = torch.isfinite(g)
    return finite.flatten(1).all(1) if finite.dim() > 1 else finite


def _unmark(grad_sample) -> None:
    """Undo Opacus' `_mark_as_processed` on a `grad_sample` (a tensor or a list of them), to clip it again."""
    for t in grad_sample if isinstance(grad_sample, list) else [grad_sample]:
        if hasattr(t, "_processed"):
            del t._processed


class NonfiniteGuard:
    """Wraps a DPOptimizer's `clip_and_accumulate` so that a sample whose per-sample gradient is non-finite in ANY
    parameter adds a zero per-sample gradient in EVERY parameter (within the clip norm), and counts it (`count`).

    Fast path: Opacus clips and sums the physical batch as usual, into a fresh sum, and the guard checks that
    sum (parameter-sized, not batch x parameter-sized) before adding it to the logical batch's. A non-finite
    per-sample gradient always makes that sum non-finite: its clip factor `C / (norm + 1e-6)` is NaN (NaN entry)
    or 0 (inf entry, and 0 x inf is NaN), and it multiplies the sample's gradient in every parameter; clipped
    finite gradients cannot overflow. Only then (a crafted model or broadcast) does the guard find the samples
    (one vectorised `isfinite` per parameter), zero their per-sample gradients and let Opacus clip the batch
    again. Works on each physical batch of BatchMemoryManager, with gradients accumulated over several backward
    passes (`grad_sample` a list, checked chunk by chunk) and with empty batches."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.count = 0
        self._clip_and_accumulate = optimizer.clip_and_accumulate
        optimizer.clip_and_accumulate = self.clip_and_accumulate

    def clip_and_accumulate(self):
        params = self.optimizer.params
        earlier = [p.summed_grad for p in params]  # the logical batch's sum so far (None at its first chunk)
        for p in params:
            p.summed_grad = None
        self._clip_and_accumulate()
        if not self._finite([p.summed_grad for p in params]):
            for p in params:
                _unmark(p.grad_sample)
                p.summed_grad = None
            self.scrub()
            self._clip_and_accumulate()
        for p, before in zip(params, earlier):
            if before is not None:  # what Opacus' own `p.summed_grad += grad` does
                p.summed_grad = before.add_(p.summed_grad)

    @staticmethod
    def _finite(sums) -> bool:
        sums = [g for g in sums if g is not None]
        return not sums or bool(torch.isfinite(torch.stack([g.sum() for g in sums])).all())

    def scrub(self) -> int:
        """Replace the per-sample gradients of every non-finite sample by zeros, in every parameter; returns how
        many samples."""
        params = [p for p in self.optimizer.params if getattr(p, "grad_sample", None) is not None]
        chunked = [isinstance(p.grad_sample, list) for p in params]
        chunks = [p.grad_sample if lst else [p.grad_sample] for p, lst in zip(params, chunked)]
        if not chunks or len({len(c) for c in chunks}) != 1:
            return 0  # nothing to check, or an inconsistent accumulation that Opacus itself refuses
        found = 0
        for j in range(len(chunks[0])):
            ok = None
            for c in chunks:
                rows = _finite_rows(c[j])
                ok = rows if ok is None else ok & rows.to(ok.device)
            if ok is None or bool(ok.all()):
                continue
            found += int((~ok).sum())
            for p, lst, c in zip(params, chunked, chunks):
                g = c[j]
                keep = ok.to(g.device).view(-1, *([1] * (g.dim() - 1)))
                cleaned = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
                if lst:
                    p.grad_sample[j] = cleaned
                else:
                    p.grad_sample = cleaned
        self.count += found
        return found


def patient_loader(images: np.ndarray, labels: np.ndarray, patients, plan: DPPlan, rng: np.random.Generator,
                   meta: np.ndarray | None = None) -> DataLoader:
    """The loader DP-SGD draws from: patient-level Poisson batches; an empty batch keeps the tensors' shapes."""
    dataset = tensor_dataset(images, labels, meta)
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *t.shape) for t in first],
                                      dtypes=[t.dtype for t in first])
    sampler = PatientPoissonSampler(patients, plan.sample_rate, plan.steps_per_round, rng)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


@dataclass(frozen=True)
class PatientData:
    """What DP-SGD draws from: images, labels, each image's patient (the privacy unit; default: every image its own
    patient) and the metadata rows a penalty reads beside the images."""

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray | None = None
    meta: np.ndarray | None = None

    def patient_ids(self) -> np.ndarray:
        patients = np.arange(len(self.labels)) if self.patients is None else np.asarray(self.patients)
        if len(patients) != len(self.labels):
            raise ValueError(f"{len(patients)} patient ids for {len(self.labels)} images")
        return patients


@dataclass(frozen=True)
class DPSettings:
    """How a site takes its DP-SGD steps, besides the plan: the clip norm, the physical chunk (memory), the optimiser
    and FedProx's mu."""

    max_grad_norm: float
    physical_batch_size: int
    optimizer: str = "adam"
    lr: float = 0.002
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    @classmethod
    def of_run(cls, cfg, proximal_mu: float = 0.0) -> DPSettings:
        """From the run config (core_models.config.RunConfig) and the round's mu."""
        return cls(max_grad_norm=cfg.dp.max_grad_norm, physical_batch_size=cfg.dp.physical_batch_size,
                   optimizer=cfg.train.optimizer, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                   proximal_mu=proximal_mu)


def train_dp(
    model: nn.Module,
    data: PatientData,
    plan: DPPlan,
    ledger: PrivacyLedger,
    settings: DPSettings,
    *,
    penalty_fn: Penalty | None = None,
    loss_fn: LossFn | None = None,
    server_round: int | None = None,
    run_id: str | None = None,
    sampling_rng: np.random.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Train `model` in place with DP-SGD for `plan.steps_per_round` logical steps, each charged to `ledger` (tagged
    with the round and run).

    Logical batches are processed in physical chunks of `settings.physical_batch_size` (BatchMemoryManager): noise
    and one ledger step per logical batch, so memory follows the physical size and privacy the logical one.
    FedProx's term is added to the noised gradient (core_models.training.ProximalTerm: post-processing, no privacy
    cost). `penalty_fn` (with `data.meta` rows next to the images) is a Penalty: a mean of per-sample terms with
    public coefficients (e.g. the fairness penalty with the server's broadcast PSE), so per-sample clipping still
    bounds each patient's influence. `loss_fn` replaces the cross-entropy (a per-sample self-supervised pretext
    loss; labels unused).
    `sampling_rng` / `noise_generator` default to OS entropy; tests that must be reproducible pass their own (the
    generator on `device`). `device` (default: "auto", core_models.devices) is where the steps run.
    Returns the mean training loss (withheld from DP replies; inf or NaN under a crafted model, never an error),
    the step count and `nonfinite_samples`: how many drawn samples had a non-finite per-sample gradient and added a
    zero gradient instead (NonfiniteGuard; also a warning in the site's log, never in a reply).
    """
    device = device or resolve_device()
    if noise_generator is not None and noise_generator.device.type != device.type:
        raise ValueError(f"the noise generator is on {noise_generator.device}, the training on {device}: Opacus "
                         f"draws the noise where the parameters are")
    model.to(device).train()
    # Frozen stem + no summed conv gradients: 1.25x a plain step instead of 1.7x
    # (benchmarks/bench_dp.py). The frozen stem keeps the global model's weights.
    prepare_for_dp(model)
    opt, counter = local_optimizer(model, settings.optimizer, settings.lr, settings.weight_decay,
                                   settings.proximal_mu)
    loader = patient_loader(data.images, data.labels, data.patient_ids(), plan, sampling_rng or os_entropy_rng(),
                            data.meta)
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_opt, private_loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=False,  # the loader already samples patients by Poisson draws
        noise_generator=noise_generator or os_entropy_generator(device),
    )
    private_opt.expected_batch_size = plan.expected_batch_size
    guard = NonfiniteGuard(private_opt)  # a crafted model's inf/NaN per-sample gradient adds nothing, not NaN
    # The ledger, not the per-round engine, is the accountant of record. Opacus calls the
    # hook once per noised (logical) step, never on the physical chunks in between.
    private_opt.attach_step_hook(ledger.optimizer_hook(plan.noise_multiplier, plan.sample_rate, round=server_round,
                                                       run_id=run_id))
    with BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=settings.physical_batch_size,
                            optimizer=private_opt) as batches:
        total_loss, total_n = train_steps(private_model, batches, private_opt, device, penalty_fn, loss_fn=loss_fn)
    if guard.count:
        log.warning("DP-SGD: %d sample(s) had a non-finite per-sample gradient (inf or NaN, e.g. from a crafted "
                    "global model); each was replaced by a zero gradient before clipping", guard.count)
    # the loss is withheld from DP replies; a non-finite one (same crafted model) is kept as it is, never raised on
    train_loss = float(total_loss) / max(total_n, 1)
    return {"train_loss": train_loss, "steps": float(counter.steps), "nonfinite_samples": float(guard.count)}
