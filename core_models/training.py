"""Local train and evaluation loops shared by clients, centralised baselines and tests.

Each loop runs on the `device` it is given (default "auto": core_models.devices), moves every batch there once and
brings what numpy reads (probabilities, losses) back to the CPU."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from core_models.devices import resolve_device

# (forward, images, labels[, meta]) -> a mean of per-image losses: what train_steps minimises in place of
# cross-entropy (meta: the loader's metadata rows, when it has them); under DP-SGD each must be per-sample
LossFn = Callable[..., torch.Tensor]


def tensor_dataset(images: np.ndarray, labels: np.ndarray, meta: np.ndarray | None = None) -> TensorDataset:
    """Images float32, labels int64 and, when given, per-row metadata float32 (one row per image)."""
    tensors = [torch.tensor(images, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)]
    if meta is not None:
        if len(meta) != len(labels):
            raise ValueError(f"{len(meta)} metadata rows for {len(labels)} images")
        tensors.append(torch.tensor(np.asarray(meta, dtype=np.float32)))
    return TensorDataset(*tensors)


def make_loader(
    images: np.ndarray, labels: np.ndarray, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
    meta: np.ndarray | None = None,
) -> DataLoader:
    """A DataLoader over in-memory arrays (images are decoded and cached once per site).

    With `meta` (e.g. each row's sensitive attribute and mediator, for the path-specific penalty) the
    batches are (x, y, meta) in the same row order as without it (same sampler, same generator).
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(tensor_dataset(images, labels, meta), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)


def make_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.05, weight_decay: float = 0.0):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")


class Penalty(Protocol):
    """A term added to the training loss from the batch's logits, labels and metadata rows (None when the
    loader carries none). Under DP-SGD it must be a mean of per-sample terms with public coefficients, so
    per-sample clipping still bounds each patient's influence. `state_dict()` is what carries over to the
    next round (e.g. a multiplier), empty when nothing does."""

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, float]: ...


class ProximalTerm:
    """FedProx's term mu/2 * ||w - w_global||^2, w_global the weights the model holds when it is attached.

    Its gradient mu * (w - w_global) is added to each parameter's gradient just before every optimizer step,
    the same update as adding the term to the loss. Under DP-SGD that is after clipping and noise: the term
    uses only the server's weights, so it is post-processing and costs no privacy (a loss term would be lost,
    since Opacus builds the step from per-sample gradients of the data)."""

    def __init__(self, model: nn.Module, mu: float):
        self.mu = float(mu)
        self.pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(self._add_gradient)

    @torch.no_grad()
    def _add_gradient(self, optimizer, args, kwargs) -> None:
        for p, anchor in self.pairs:
            if p.grad is not None:
                p.grad.add_(p - anchor, alpha=self.mu)


class StepCounter:
    """Counts the optimizer's real steps (under DP-SGD: the noised logical steps, not the physical chunks)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.steps = 0
        optimizer.register_step_post_hook(self._count)

    def _count(self, optimizer, args, kwargs) -> None:
        self.steps += 1


def local_optimizer(model: nn.Module, optimizer: str, lr: float, weight_decay: float, proximal_mu: float):
    """The optimizer a site trains with, FedProx's term attached when `proximal_mu > 0`, and its step counter."""
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    if proximal_mu > 0:
        ProximalTerm(model, proximal_mu).attach(opt)
    return opt, StepCounter(opt)


def train_steps(forward: nn.Module, batches, optimizer, device: torch.device, penalty_fn: Penalty | None = None,
                accumulation: int = 1, loss_fn: LossFn | None = None) -> tuple[float, int]:
    """The one local training loop (plain and DP-SGD): cross-entropy plus the penalty, backward, and an optimizer
    step every `accumulation` batches and after the last. Returns the summed training loss and the image count.

    `loss_fn(forward, x, y[, meta])` replaces the cross-entropy (and the penalty) with another mean of per-image
    losses (per-sample under DP-SGD), e.g. a self-supervised pretext loss that ignores `y`, or classification
    plus detection (the boxes in `meta`).
    Under DP-SGD `forward` is Opacus' GradSampleModule and `optimizer` its DPOptimizer, which clips, noises and
    skips the step between the physical chunks of one logical batch; an empty Poisson draw is still a step
    (noise only)."""
    optimizer.zero_grad()
    criterion = nn.CrossEntropyLoss()
    last = len(batches) if accumulation > 1 else None
    total_loss, total_n = 0.0, 0
    for i, (x, y, *meta) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        if loss_fn is not None:
            loss = objective = loss_fn(forward, x, y, *(m.to(device) for m in meta))
        else:
            logits = forward(x)
            if len(y) == 0:
                loss = objective = logits.sum() * 0.0
            else:
                loss = criterion(logits, y)
                objective = loss if penalty_fn is None else loss + penalty_fn(logits, y,
                                                                              meta[0].to(device) if meta else None)
        (objective / accumulation).backward()
        if accumulation == 1 or (i + 1) % accumulation == 0 or i + 1 == last:
            optimizer.step()
            optimizer.zero_grad()
        total_loss += loss.item() * len(y)
        total_n += len(y)
    return total_loss, total_n


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    epochs: int = 1,
    optimizer: str = "sgd",
    lr: float = 0.05,
    weight_decay: float = 0.0,
    grad_accumulation: int = 1,
    proximal_mu: float = 0.0,
    device: torch.device | None = None,
    progress: bool = False,
    penalty_fn: Penalty | None = None,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """Train in place; return the mean training loss and the number of optimizer steps (`loss_fn`: see
    train_steps).

    `proximal_mu > 0` adds FedProx's term (ProximalTerm) towards the weights the model holds on entry (the
    server's global model). `penalty_fn` (a Penalty) gets each batch's logits and, from a loader made with
    `meta`, its metadata rows.
    """
    if grad_accumulation < 1:
        raise ValueError("grad_accumulation must be >= 1")
    device = device or resolve_device()
    model.to(device).train()
    opt, counter = local_optimizer(model, optimizer, lr, weight_decay, proximal_mu)
    total_loss, total_n = 0.0, 0
    for epoch in range(epochs):
        batches = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        loss, n = train_steps(model, batches, opt, device, penalty_fn, grad_accumulation, loss_fn)
        total_loss, total_n = total_loss + loss, total_n + n
    return {"train_loss": total_loss / max(total_n, 1), "steps": float(counter.steps)}


@torch.no_grad()
def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device | None = None) -> np.ndarray:
    """Class probabilities, shape (N, num_classes)."""
    device = device or resolve_device()
    model.to(device).eval()
    return torch.cat([torch.softmax(model(x.to(device)), 1).cpu() for x, _ in loader]).numpy()


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC on p(class 1), macro one-vs-rest for more classes; NaN if one class only."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < probs.shape[1]:
        # roc_auc_score's multi-class path needs every class present.
        scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(labels, probs, multi_class="ovr"))


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | None = None) -> dict[str, float]:
    """Loss, accuracy and AUROC of `model` on `loader`."""
    labels = torch.cat([y for _, y in loader]).numpy()
    probs = predict_proba(model, loader, device)
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))))
    return {
        "loss": loss,
        "accuracy": float(np.mean(probs.argmax(1) == labels)),
        "auroc": auroc(labels, probs),
    }


@dataclass
class FitResult:
    best_epoch: int
    best_val_auroc: float
    history: list[dict[str, float]]


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    max_epochs: int = 20,
    patience: int = 3,
    progress: bool = False,
    **train_kwargs,
) -> FitResult:
    """Centralised training with early stopping on validation AUROC; restores the best weights."""
    best_state, best_auc, best_epoch, history = None, -math.inf, 0, []
    for epoch in range(1, max_epochs + 1):
        stats = train_epochs(model, train_loader, epochs=1, progress=progress, **train_kwargs)
        val = evaluate(model, val_loader, train_kwargs.get("device"))
        history.append({"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()}})
        score = val["auroc"] if not math.isnan(val["auroc"]) else -val["loss"]
        if score > best_auc:
            best_state, best_auc, best_epoch = copy.deepcopy(model.state_dict()), score, epoch
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch=best_epoch, best_val_auroc=best_auc, history=history)
