"""Networks are DP-compatible at every supported size; loops learn and stop early."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from opacus.validators import ModuleValidator

from core_models.networks import DPConv2d, SmallCNN, build_model, prepare_for_dp
from core_models.training import ProximalTerm, auroc, evaluate, fit, make_loader, train_epochs


@pytest.mark.parametrize("name,size", [(name, size) for name in ("cnn", "resnet") for size in (28, 64, 224)]
                         + [("resnet18", 64), ("scatter", 28), ("scatter", 64)])
def test_networks_accept_sizes_and_pass_opacus(name, size):
    model = build_model(name, num_classes=3)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 3)


def _private(model, x, y, mode="hooks"):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    module, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=True, grad_sample_mode=mode)
    return module, opt


def _grad_samples(model, x, y, mode="hooks"):
    module, opt = _private(model, x, y, mode)
    torch.nn.functional.cross_entropy(module(x), y).backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    return samples, module, opt


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_dp_fast_path_gives_opacus_per_sample_gradients(stem_stride):
    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 40, 40), torch.tensor([0, 1, 1, 0, 1, 0])
    base = SmallCNN(num_classes=2, stem_stride=stem_stride)
    stock = copy.deepcopy(base)
    for m in stock.modules():
        if type(m) is DPConv2d:
            m.__class__ = torch.nn.Conv2d  # Opacus' own conv grad sampler
    want, _, _ = _grad_samples(stock, x, y)
    for variant in ({}, {"freeze_stem": False}, {"skip_summed_grads": False}):
        model = prepare_for_dp(copy.deepcopy(base), **variant)
        got, _, opt = _grad_samples(model, x, y)
        frozen = variant.get("freeze_stem", True)
        assert set(got) == {n for n in want if not (frozen and n.startswith("features.stem."))}
        for name, g in got.items():
            torch.testing.assert_close(g, want[name], atol=1e-5, rtol=1e-4)
        opt.step()
        for name, p in model.named_parameters():
            changed = not torch.equal(p, base.state_dict()[name])
            assert changed == (name in got), name  # frozen stem untouched, everything else noised+stepped


def test_skip_summed_grads_refuses_to_train_without_opacus_hooks():
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    model = prepare_for_dp(build_model("cnn"))
    with pytest.raises(RuntimeError, match="skip_summed_grads"):
        model(x)
    with torch.no_grad():
        assert model(x).shape == (4, 2)  # evaluation is fine
    with pytest.raises(RuntimeError, match="skip_summed_grads"):
        _grad_samples(copy.deepcopy(model), x, y, mode="functorch")
    prepare_for_dp(model, freeze_stem=False, skip_summed_grads=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_checkpoints_of_the_previous_layout_fail_to_load():
    """The stride-1 stem used the same parameter shapes; its flat layer names keep its checkpoints out."""
    old_names = {"stem.0": "1", "stem.1": "2", "block2.0": "5", "block2.1": "6", "block3.0": "9", "block3.1": "10",
                 "block4.0": "13", "block4.1": "14"}
    state = {}
    for key, value in SmallCNN(stem_stride=1).state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f"features.{new}.", f"features.{old}.")
        state[key] = value
    with pytest.raises(RuntimeError, match="Missing key"):
        build_model("cnn").load_state_dict(state)
    assert build_model("cnn").features.stem[0].stride == (2, 2)
    with pytest.raises(ValueError, match="stem_stride"):
        SmallCNN(stem_stride=4)


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


def test_proximal_term_gives_the_gradient_of_the_fedprox_loss():
    """The term added before the step equals adding mu/2 ||w - w_global||^2 to the loss."""
    x, y = _toy(32)
    torch.manual_seed(0)
    start = build_model("cnn")
    with torch.no_grad():  # move away from the global weights so the term is not zero
        for p in start.parameters():
            p.add_(0.1)
    anchor = build_model("cnn")
    anchor.load_state_dict(start.state_dict())
    with torch.no_grad():
        for p in anchor.parameters():
            p.sub_(0.1)
    mu, lr = 3.0, 0.01
    hooked, manual = copy.deepcopy(start), copy.deepcopy(start)
    opt = torch.optim.SGD(hooked.parameters(), lr=lr)
    term = ProximalTerm(hooked, mu)
    term.pairs = [(p, a.detach().clone()) for (p, _), a in zip(term.pairs, anchor.parameters())]
    term.attach(opt)
    nn.functional.cross_entropy(hooked(torch.tensor(x)), torch.tensor(y)).backward()
    opt.step()
    opt2 = torch.optim.SGD(manual.parameters(), lr=lr)
    prox = sum(((p - a.detach()) ** 2).sum() for p, a in zip(manual.parameters(), anchor.parameters()))
    (nn.functional.cross_entropy(manual(torch.tensor(x)), torch.tensor(y)) + 0.5 * mu * prox).backward()
    opt2.step()
    for a, b in zip(hooked.parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


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


def test_scatter_features_are_fixed_unsent_and_the_rest_trains_under_dp():
    torch.manual_seed(0)
    model = build_model("scatter")
    assert not any("transform" in k or "tensor" in k for k in model.state_dict())  # the filter banks stay local
    assert sum(p.numel() for p in model.parameters()) == 42340
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 32, 32, generator=g), torch.tensor([0, 1, 0, 1, 1, 0])
    first = model.scatter(x)
    assert first.shape == (6, 81, 8, 8) and torch.equal(first, model.scatter(x))  # a fixed transform
    samples, module, opt = _grad_samples(model, x, y)
    assert set(samples) == {n for n, _ in model.named_parameters()}
    assert all(s.shape[0] == 6 for s in samples.values())  # per-sample gradients for every trained layer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 30, 30))


def test_scatter_coefficients_of_seen_images_come_from_a_bounded_cache(monkeypatch):
    """The cache serves exactly what the transform computes, to every ScatterNet of the process, keyed by the
    image (one changed pixel is a new image), and stops keeping entries at its byte limit."""
    from core_models import networks

    cache = networks.CoefficientCache(max_bytes=10 * 81 * 8 * 8 * 4)  # room for 10 images of 32 px
    monkeypatch.setattr(networks, "SCATTER_CACHE", cache)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 32, 32, generator=g)
    first, second = build_model("scatter"), build_model("scatter")
    exact = first._transform(x)(x).flatten(1, 2)
    assert torch.equal(first.scatter(x), exact) and len(cache) == 6
    calls = []
    real = second._transform(x)
    monkeypatch.setattr(second, "_transform", lambda _x: lambda batch: calls.append(len(batch)) or real(batch))
    changed = x.clone()
    changed[2, 0, 5, 5] += 0.01
    assert torch.equal(second.scatter(changed)[[0, 1, 3, 4, 5]], exact[[0, 1, 3, 4, 5]])
    assert calls == [1]  # only the changed image was transformed
    # each image's coefficients are those of the image alone, and a caller changing them changes nothing kept
    alone = real(x[4:5]).flatten(1, 2)[0]
    served = second.scatter(x)
    assert torch.equal(served[4], alone)
    served.zero_()
    assert torch.equal(second.scatter(x)[4], alone)
    # evaluation (and attribution's one-off variants) read the cache but do not fill it
    first.eval()
    first.scatter(torch.rand(3, 1, 32, 32, generator=g))
    assert len(cache) == 7
    first.train()
    more = torch.rand(8, 1, 32, 32, generator=g)
    assert torch.equal(first.scatter(more), first._transform(more)(more).flatten(1, 2))
    assert len(cache) == 10 and cache.bytes == cache.max_bytes  # full: the rest were computed, not kept
    assert first.scatter(torch.rand(0, 1, 32, 32)).shape == (0, 81, 8, 8)  # DP-SGD's empty Poisson batch


def test_scatter_linear_trains_under_dp_sgd_and_normalises_each_order(tmp_path):
    """The DP recipe's model: fixed features, OrderNorm (no parameters), one linear layer; a DP-SGD round moves only
    the linear layer and leaves finite weights; each coefficient block is standardised per image."""
    from client.dp import DPSettings, PatientData, plan_dp, train_dp
    from client.ledger import PrivacyLedger
    from core_models.networks import OrderNorm

    rng = np.random.default_rng(0)
    model = build_model("scatter-linear", 2)
    assert [n for n, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    assert model.head.in_features == 81 * 49
    x = rng.uniform(0, 1, (40, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 2, 40)
    coefficients = model.scatter(torch.as_tensor(x[:4]))
    normed = OrderNorm()(coefficients)
    for lo, hi in OrderNorm.BLOCKS:
        assert torch.allclose(normed[:, lo:hi].mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-4)
        assert torch.allclose(normed[:, lo:hi].std(dim=(1, 2, 3)), torch.ones(4), atol=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_dp(40, 64, 1, 2, 8.0, 1e-3)
    ledger = PrivacyLedger.open(tmp_path, delta=1e-3, fingerprint="t")
    train_dp(model, PatientData(x, y), plan, ledger,
             DPSettings(max_grad_norm=1.0, physical_batch_size=16, optimizer="sgd", lr=0.5),
             sampling_rng=np.random.default_rng(1), noise_generator=torch.Generator().manual_seed(2))
    after = model.state_dict()
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert all(torch.isfinite(v).all() for v in after.values())
    assert ledger.epsilon() > 0
    assert build_model("scatter-linear", 5, in_channels=3).head.in_features == 3 * 81 * 49
