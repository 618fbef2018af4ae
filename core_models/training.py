"""Local train and evaluation loops shared by clients, centralised baselines and tests."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from core_models.networks import get_device


def make_loader(
    images: np.ndarray, labels: np.ndarray, batch_size: int = 32, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over in-memory arrays (images are decoded and cached once per site)."""
    dataset = TensorDataset(torch.tensor(images, dtype=torch.float32), torch.tensor(labels, dtype=torch.long))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def make_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.05, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")


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
    penalty_fn=None,
) -> dict[str, float]:
    """Train in place; return the mean training loss and the number of optimizer steps.

    `proximal_mu > 0` adds FedProx's term mu/2 * ||w - w_global||^2, with w_global the
    weights the model holds on entry (the server's global model).
    `penalty_fn(logits, y, meta) -> tensor` is added to the loss (e.g. the path-specific fairness
    penalty); it gets the batch's logits (one forward pass) and `meta` from a loader whose batches
    are (x, y, meta) (core_models/meta_loader.py).
    """
    if grad_accumulation < 1:
        raise ValueError("grad_accumulation must be >= 1")
    device = device or get_device()
    model.to(device).train()
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    criterion = nn.CrossEntropyLoss()
    total_loss, total_n, steps = 0.0, 0, 0
    opt.zero_grad()
    for epoch in range(epochs):
        batches = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i, (x, y, *meta) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = criterion(logits, y)
            objective = loss
            if global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
                objective = loss + 0.5 * proximal_mu * prox
            if penalty_fn is not None:
                objective = objective + penalty_fn(logits, y, meta[0].to(device) if meta else None)
            (objective / grad_accumulation).backward()
            if (i + 1) % grad_accumulation == 0 or i + 1 == len(loader):
                opt.step()
                opt.zero_grad()
                steps += 1
            total_loss += loss.item() * len(y)
            total_n += len(y)
            batches.set_postfix(loss=f"{loss.item():.3f}")
    return {"train_loss": total_loss / max(total_n, 1), "steps": float(steps)}


@torch.no_grad()
def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device | None = None) -> np.ndarray:
    """Class probabilities, shape (N, num_classes)."""
    device = device or get_device()
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
        val = evaluate(model, val_loader)
        history.append({"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()}})
        score = val["auroc"] if not math.isnan(val["auroc"]) else -val["loss"]
        if score > best_auc:
            best_state, best_auc, best_epoch = copy.deepcopy(model.state_dict()), score, epoch
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch=best_epoch, best_val_auroc=best_auc, history=history)
