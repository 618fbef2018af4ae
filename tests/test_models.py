"""Networks are DP-compatible at every supported size; loops learn and stop early."""

import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from core_models.networks import build_model
from core_models.training import auroc, evaluate, fit, make_loader, train_epochs


@pytest.mark.parametrize("name", ["cnn", "resnet"])
@pytest.mark.parametrize("size", [28, 64, 224])
def test_networks_accept_sizes_and_pass_opacus(name, size):
    model = build_model(name, num_classes=3)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 3)


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", 1)


def _toy(n=256, size=28, seed=0):
    """A bright square means class 1: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 0.1, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    x[y == 1, :, 8:16, 8:16] += 0.5
    return x, y


def test_training_improves_auroc_and_grad_accumulation_counts_steps():
    torch.manual_seed(0)
    x, y = _toy()
    model = build_model("cnn")
    loader = make_loader(x, y, batch_size=32, shuffle=True)
    before = evaluate(model, make_loader(x, y, 128))
    stats = train_epochs(model, loader, epochs=3, lr=0.05, grad_accumulation=2)
    after = evaluate(model, make_loader(x, y, 128))
    assert stats["steps"] == 3 * 4  # 8 batches per epoch, one step per 2 batches
    assert after["auroc"] > 0.95 > before["auroc"]
    assert after["loss"] < before["loss"]


def test_proximal_term_keeps_weights_near_global():
    x, y = _toy()
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = build_model("cnn")
        start = [p.detach().clone() for p in model.parameters()]
        train_epochs(model, make_loader(x, y, 32, shuffle=True), epochs=2, lr=0.05, proximal_mu=mu)
        drift[mu] = sum(((p.detach() - s) ** 2).sum().item() for p, s in zip(model.parameters(), start))
    assert drift[10.0] < 0.5 * drift[0.0]


def test_fit_early_stops_and_restores_best():
    torch.manual_seed(0)
    x, y = _toy()
    xv, yv = _toy(128, seed=1)
    model = build_model("cnn")
    result = fit(model, make_loader(x, y, 32, shuffle=True), make_loader(xv, yv, 128), max_epochs=30,
                 patience=2, optimizer="adam", lr=1e-3)
    assert result.best_epoch + 2 >= len(result.history)  # stopped <= patience epochs after the best
    assert len(result.history) < 30
    final = evaluate(model, make_loader(xv, yv, 128))["auroc"]
    assert final == pytest.approx(result.best_val_auroc)


def test_auroc_edge_cases():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    assert auroc(np.array([0, 1, 1]), probs) == 1.0
    assert math.isnan(auroc(np.array([1, 1, 1]), probs))
    three = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    assert auroc(np.array([0, 1, 2, 0]), three) == 1.0
