"""Self-supervised pretext tasks (core_models.pretext): they learn, each sample's loss is its own (DP-SGD), the
encoder's weights carry over to the label phase, and a seeded generator fixes every corruption."""

import math
import tomllib

import numpy as np
import pytest
import torch

from core_models.config import APP_PYPROJECT, ConfigError, TrainingConfig, check_overrides
from core_models.networks import build_model, prepare_for_dp
from core_models.pretext import (
    PRETEXT_TASKS,
    ContrastiveTask,
    PretextModel,
    PretextOutput,
    augment,
    embed,
    encoder_state,
    mask_patches,
    per_sample_losses,
    pretext_loss,
    pretext_loss_fn,
    rotate,
    train_pretext,
)
from core_models.pretrained import head_of
from core_models.training import local_optimizer, make_loader, train_steps

CPU = torch.device("cpu")
PER_SAMPLE_TASKS = sorted(name for name, task in PRETEXT_TASKS.items() if task.per_sample)


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, 1, size, size) in [0, 1]: noise, a top-to-bottom brightness ramp (an orientation, as scans have) and a
    bright square at a random place."""
    rng = np.random.default_rng(seed)
    img = 0.2 * rng.random((n, 1, size, size)) + np.linspace(0.5, 0.0, size)[None, None, :, None]
    side = size // 4
    for i in range(n):
        r, c = rng.integers(0, size - side, 2)
        img[i, 0, r:r + side, c:c + side] += 0.5
    return np.clip(img, 0, 1).astype(np.float32)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,size", [("cnn", 28), ("cnn", 32), ("cnn", 64), ("resnet", 64)])
@pytest.mark.parametrize("task", sorted(PRETEXT_TASKS))
def test_tasks_fit_every_network_and_size(name, size, task):
    torch.manual_seed(0)
    network = build_model(name, 2)
    model = PretextModel(network, task)
    x = torch.tensor(synthetic_images(3, size))
    out = model(x, seeded(0))
    expected = {"rotation": (3, 4), "inpainting": (3, 1, size, size), "contrastive": (6, 64)}[task]
    assert tuple(out.prediction.shape) == expected
    loss = pretext_loss(task, model, x, seeded(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in head_of(network).parameters())  # the label head takes no part
    with torch.no_grad():  # the encoder is exactly what the network's head sees
        assert torch.allclose(head_of(network)(embed(network, x)), network(x), atol=1e-6)


def test_rotation_pretext_learns():
    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), "rotation")
    stats = train_pretext(model, synthetic_images(256, seed=0), "rotation", epochs=4, batch_size=32, lr=3e-3,
                          device=CPU, generator=seeded(0))
    assert stats["steps"] == 4 * 8
    assert stats["loss_last"] < 0.5 * math.log(4)  # 0.01-0.16 measured on six seeds
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor(synthetic_images(256, seed=100)), seeded(99))
    accuracy = (out.prediction.argmax(1) == out.target).float().mean().item()
    assert accuracy > 0.8  # 1.0 measured on six seeds; chance is 0.25


def test_inpainting_pretext_learns():
    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), "inpainting")
    stats = train_pretext(model, synthetic_images(256, seed=1), "inpainting", epochs=3, batch_size=32, lr=3e-3,
                          device=CPU, generator=seeded(1))
    assert stats["loss_last"] < 0.8 * stats["loss_first"]  # 0.16-0.34 x measured on six seeds


def test_inpainting_loss_counts_hidden_pixels_only():
    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), "inpainting")
    x = torch.tensor(synthetic_images(4, seed=2))
    with torch.no_grad():
        out = model(x, seeded(3))
    assert torch.equal(out.target, x)
    assert torch.all(out.mask.mean(dim=(1, 2, 3)) == 0.25)  # 16 of 64 patches, 4x4 px each at 32 px
    base = per_sample_losses("inpainting", out)
    hidden = out.mask[0, 0].bool()
    direct = ((out.prediction[0, 0] - x[0, 0]) ** 2)[hidden].mean()
    assert torch.allclose(base[0], direct)

    r, c = (~hidden).nonzero()[0].tolist()
    visible_changed = out.target.clone()
    visible_changed[0, 0, r, c] += 0.7
    assert torch.equal(per_sample_losses("inpainting", out._replace(target=visible_changed)), base)

    r, c = hidden.nonzero()[0].tolist()
    hidden_changed = out.target.clone()
    hidden_changed[0, 0, r, c] += 0.7
    changed = per_sample_losses("inpainting", out._replace(target=hidden_changed))
    assert changed[0] != base[0] and torch.equal(changed[1:], base[1:])


def _private(model, images, noise_seed=1):
    from opacus import PrivacyEngine

    prepare_for_dp(model)  # as client/dp.py trains: frozen stem, DPConv2d without summed gradients
    opt, counter = local_optimizer(model, "adam", 1e-3, weight_decay=0.0, proximal_mu=0.0)
    loader = make_loader(images, np.zeros(len(images), dtype=np.int64), batch_size=len(images))
    private_model, private_opt, private_loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode="hooks", noise_generator=seeded(noise_seed))
    return private_model, private_opt, private_loader, counter


@pytest.mark.parametrize("task", PER_SAMPLE_TASKS)
def test_dp_sgd_per_sample_gradients_are_per_sample(task):
    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), task)
    images = synthetic_images(6, seed=4)
    private_model, private_opt, _, _ = _private(model, images)
    j = 2
    x = torch.tensor(images)
    x_other = x.clone()
    x_other[j] = torch.tensor(synthetic_images(1, seed=5))[0]

    def grad_samples(batch):
        private_opt.zero_grad()
        pretext_loss(task, private_model, batch, seeded(7)).backward()  # same corruption draws for both
        return {n: p.grad_sample.clone() for n, p in private_model.named_parameters() if p.requires_grad}

    a, b = grad_samples(x), grad_samples(x_other)
    assert a and all(g.shape[0] == len(images) for g in a.values())
    others = [i for i in range(len(images)) if i != j]
    for name in a:
        assert torch.allclose(a[name][others], b[name][others], rtol=1e-5, atol=1e-7), name
    assert any(not torch.allclose(a[name][j], b[name][j]) for name in a)

    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    private_opt.step()  # clip, noise, update
    assert all(not torch.equal(p, q) for p, q in zip(trainable, before))


@pytest.mark.parametrize("task", PER_SAMPLE_TASKS)
def test_pretext_loss_in_the_training_loop_under_batch_memory_manager(task):
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), task)
    private_model, private_opt, private_loader, counter = _private(model, synthetic_images(8, seed=6))
    with BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=4, optimizer=private_opt) as batches:
        loss, n = train_steps(private_model, batches, private_opt, CPU,
                              loss_fn=pretext_loss_fn(task, seeded(8)))
    assert n == 8 and math.isfinite(loss)
    assert counter.steps == 1  # two physical chunks, one noised logical step


@pytest.mark.parametrize("task", sorted(PRETEXT_TASKS))
def test_empty_batch_gives_zero_loss(task):
    model = PretextModel(build_model("cnn", 2), task)
    loss = pretext_loss(task, model, torch.zeros(0, 1, 32, 32), seeded(0))
    loss.backward()
    assert loss.item() == 0.0


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_encoder_state_loads_into_a_fresh_network(name):
    torch.manual_seed(0)
    size = 32 if name == "cnn" else 64
    network = build_model(name, 2)
    head_before = {k: v.clone() for k, v in head_of(network).state_dict().items()}
    model = PretextModel(network, "rotation")
    train_pretext(model, synthetic_images(16, size, seed=9), "rotation", epochs=1, batch_size=8, lr=3e-3,
                  device=CPU, generator=seeded(9))
    state = encoder_state(model)
    fresh = build_model(name, 2)
    fresh.load_state_dict(state, strict=True)
    assert set(state) == set(fresh.state_dict())
    for k, v in head_of(fresh).state_dict().items():
        assert torch.equal(v, head_before[k])  # the label head is returned as it was
    x = torch.tensor(synthetic_images(4, size, seed=10))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(embed(fresh, x), model.embed(x))
        if name == "cnn":
            assert torch.equal(fresh.embed(x), model.embed(x))
    key = next(iter(state))
    state[key].add_(1.0)  # a copy: editing it leaves the model alone
    assert not torch.equal(state[key], model.network.state_dict()[key])


def test_the_config_knows_every_task_and_which_ones_dp_cannot_train():
    assert set(TrainingConfig.PRETEXTS) == {"", *PRETEXT_TASKS}
    assert set(TrainingConfig.BATCH_COUPLED_PRETEXTS) == {n for n, t in PRETEXT_TASKS.items() if not t.per_sample}
    assert PER_SAMPLE_TASKS == ["inpainting", "rotation"]


def test_contrastive_loss_is_nt_xent_and_couples_the_batch():
    """The loss by hand for two images: view a of image 0 against its partner and the two views of image 1."""
    task = ContrastiveTask(temperature=0.5)
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, -0.8]]), dim=1)
    partner = torch.tensor([2, 3, 0, 1])
    out = task.per_sample_loss(PretextOutput(z, partner, None))

    def view_loss(i):
        logits = torch.tensor([float(z[i] @ z[j]) / 0.5 for j in range(4) if j != i])
        positive = [j for j in range(4) if j != i].index(int(partner[i]))
        return float(torch.logsumexp(logits, 0) - logits[positive])

    assert out.shape == (2,)
    assert out[0].item() == pytest.approx((view_loss(0) + view_loss(2)) / 2, abs=1e-6)
    assert out[1].item() == pytest.approx((view_loss(1) + view_loss(3)) / 2, abs=1e-6)
    moved = z.clone()
    moved[1] = torch.nn.functional.normalize(torch.tensor([1.0, 0.1]), dim=0)  # image 1 only
    assert task.per_sample_loss(PretextOutput(moved, partner, None))[0] != out[0]  # image 0's loss moves too


def test_contrastive_pretext_learns_to_match_an_images_two_views():
    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), "contrastive")
    stats = train_pretext(model, synthetic_images(128, seed=20), "contrastive", epochs=6, batch_size=32, lr=3e-3,
                          device=CPU, generator=seeded(20))
    assert stats["loss_last"] < 0.8 * stats["loss_first"]  # 0.67 x here, 0.70-0.77 x on three other seeds
    model.eval()
    x = torch.tensor(synthetic_images(64, seed=21))
    with torch.no_grad():
        z = model(x, seeded(22)).prediction
    nearest = (z[:64] @ z[64:].T).argmax(1)
    assert (nearest == torch.arange(64)).float().mean().item() > 0.08  # 0.13-0.22 on four seeds; chance 1 / 64


def test_contrastive_views_are_stacked_as_their_partners_say():
    task = ContrastiveTask()
    x = torch.tensor(synthetic_images(5, seed=27))
    views, partner, mask = task.corrupt(x, seeded(28))
    assert mask is None and views.shape == (10, 1, 32, 32)
    assert torch.equal(partner[partner], torch.arange(10)) and torch.equal(partner[:5], torch.arange(5, 10))
    g = seeded(28)
    first, second = augment(x, g), augment(x, g)  # the same draws, in the same order
    assert torch.equal(views[:5], first) and torch.equal(views[5:], second)


def test_augment_without_randomness_is_the_image_or_its_mirror():
    x = torch.tensor(synthetic_images(16, seed=29))
    view = augment(x, seeded(30), zoom=(1.0, 1.0), turn=0.0, shift=0.0, exposure=(1.0, 1.0), gamma=(1.0, 1.0),
                   noise=0.0)
    same = [bool(torch.allclose(view[i], x[i], atol=1e-5)) for i in range(16)]
    mirrored = [bool(torch.allclose(view[i], x[i].flip(-1), atol=1e-5)) for i in range(16)]
    assert all(a != b for a, b in zip(same, mirrored))  # exactly one of the two, for every image
    assert any(same) and any(mirrored)
    with pytest.raises(ValueError, match="square images"):
        augment(torch.zeros(2, 1, 32, 16), seeded(0))
    for bad in ({"gamma": (0.0, 1.0)}, {"zoom": (0.5, 1.2)}, {"exposure": (0.0, 1.0)}, {"noise": -0.1},
                {"zoom": (0.9, 0.8)}):
        with pytest.raises(ValueError, match="ranges must be low <= high"):
            augment(x, seeded(0), **bad)


def test_contrastive_task_has_no_per_sample_gradient_and_is_refused_under_dp_sgd():
    """The attack: Opacus would clip each view as if it were a patient, while one image moves every other image's
    gradient. `pretext_loss` refuses the wrapped model."""
    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), "contrastive")
    images = synthetic_images(6, seed=31)
    private_model, private_opt, _, _ = _private(model, images)
    with pytest.raises(ValueError, match="cannot be trained under DP-SGD"):
        pretext_loss("contrastive", private_model, torch.tensor(images), seeded(7))

    def grad_samples(batch):  # the loss computed by hand, past the refusal
        private_opt.zero_grad()
        ContrastiveTask().per_sample_loss(private_model(batch, seeded(7))).mean().backward()
        return {n: p.grad_sample.clone() for n, p in private_model.named_parameters() if p.requires_grad}

    x = torch.tensor(images)
    x_other = x.clone()
    x_other[2] = torch.tensor(synthetic_images(1, seed=32))[0]
    a, b = grad_samples(x), grad_samples(x_other)
    assert all(g.shape[0] == 2 * len(images) for g in a.values())  # a row per view, not per image
    untouched = [i for i in range(2 * len(images)) if i not in (2, 2 + len(images))]
    assert any(not torch.allclose(a[n][untouched], b[n][untouched]) for n in a)  # image 2 moved the others


def test_a_contrastive_run_needs_two_images_a_batch():
    defaults = tomllib.loads(APP_PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    with pytest.raises(ConfigError, match="'batch-size' must be >= 2"):
        check_overrides({"pretext": "contrastive", "batch-size": 1}, defaults)
    check_overrides({"pretext": "contrastive", "batch-size": 2}, defaults)


def test_augment_draws_per_image_from_the_generator():
    x = torch.tensor(synthetic_images(8, seed=23))
    a, b = augment(x, seeded(24)), augment(x, seeded(24))
    assert torch.equal(a, b) and not torch.equal(a, augment(x, seeded(25)))
    assert a.shape == x.shape and not torch.equal(a, x)
    assert torch.equal(augment(x[:0], seeded(24)), x[:0])  # an empty Poisson draw
    same = augment(torch.cat([x[:1], x[:1]]), seeded(26))
    assert not torch.equal(same[0], same[1])  # each image draws its own view


def test_same_seed_same_corruption():
    x = torch.tensor(synthetic_images(16, seed=11))
    r1, k1 = rotate(x, seeded(12))
    r2, k2 = rotate(x, seeded(12))
    assert torch.equal(r1, r2) and torch.equal(k1, k2)
    assert not torch.equal(k1, rotate(x, seeded(13))[1])
    for i in range(len(x)):
        assert torch.equal(r1[i], torch.rot90(x[i], int(k1[i]), dims=(-2, -1)))

    m1, mask1 = mask_patches(x, seeded(12))
    m2, mask2 = mask_patches(x, seeded(12))
    assert torch.equal(m1, m2) and torch.equal(mask1, mask2)
    assert not torch.equal(mask1, mask_patches(x, seeded(13))[1])
    mean = x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    assert torch.equal(m1[mask1.bool()], mean[mask1.bool()]) and torch.equal(m1[~mask1.bool()], x[~mask1.bool()])

    torch.manual_seed(0)
    model = PretextModel(build_model("cnn", 2), "inpainting").eval()
    with torch.no_grad():
        assert torch.equal(model(x, seeded(14)).prediction, model(x, seeded(14)).prediction)


def test_unknown_or_mismatched_task_is_refused():
    with pytest.raises(ValueError, match="unknown pretext task"):
        PretextModel(build_model("cnn", 2), "jigsaw")
    model = PretextModel(build_model("cnn", 2), "rotation")
    with pytest.raises(ValueError, match="built for the 'rotation' task"):
        pretext_loss("inpainting", model, torch.zeros(2, 1, 32, 32), seeded(0))
