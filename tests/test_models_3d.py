"""3-D networks for volumes (N, C, D, H, W): shapes, Opacus validity, per-sample gradients and the DP-SGD step as a
site takes it, gradient accumulation, model cards and checkpoints that keep their dims, and the refusals (2-D
checkpoint into a 3-D run, scattering or detection in 3-D)."""

import copy

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import DPSettings, PatientData, plan_dp, train_dp
from client.ledger import PrivacyLedger
from core_models.model_card import load_state_dict_file, model_dims, read_card, state_dims, write_card
from core_models.model_factory import ModelSpec
from core_models.networks import DPConv3d, build_model, input_channels, input_dims, prepare_for_dp
from core_models.pretrained import CheckpointFormatError, freeze, load_pretrained
from core_models.training import train_steps


def _volumes(n, side=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, side, side, side, generator=g), torch.arange(n) % 2


@pytest.mark.parametrize("name,channels,shape", [("cnn", 1, (16, 16, 16)), ("cnn", 3, (16, 24, 20)),
                                                  ("resnet", 1, (16, 16, 16)), ("resnet", 3, (12, 16, 8)),
                                                  ("resnet18", 1, (16, 16, 16))])
def test_3d_networks_take_volumes_and_pass_opacus(name, channels, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, in_channels=channels, dims=3)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(type(m) is DPConv3d for m in convs)  # the grouped per-sample gradients, every layer
    assert (input_dims(model), input_channels(model)) == (3, channels)
    x = torch.rand(2, channels, *shape, generator=torch.Generator().manual_seed(1))
    assert model(x).shape == (2, 3)
    with pytest.raises(RuntimeError):
        model(x[:, :, 0])  # a 2-D batch is not a volume
    assert input_dims(build_model(name, 3, channels)) == 2


@pytest.mark.parametrize("name", ["scatter", "scatter-linear"])
def test_scattering_networks_are_2d_only(name):
    with pytest.raises(ValueError, match="2-D only"):
        build_model(name, 2, dims=3)
    with pytest.raises(ValueError, match="2-D only"):
        ModelSpec(model=name, dims=3).network()
    assert input_dims(build_model(name, 2)) == 2


def test_bad_dims_and_2d_only_parts_are_refused():
    for dims in (1, 4, True):
        with pytest.raises(ValueError, match="dims must be 2"):
            build_model("cnn", 2, dims=dims)
    with pytest.raises(ValueError, match="lesion detection is 2-D only"):
        ModelSpec(dims=3, detection=True)
    with pytest.raises(ValueError, match="'rotation' is 2-D only"):
        ModelSpec(dims=3, pretext="rotation")
    spec = ModelSpec(model="resnet", num_classes=4, dims=3)
    assert spec.build().__class__ is spec.network().__class__  # no detector, no pretext head: the network
    assert input_dims(spec.network()) == 3


def _stock(model):
    """The same network with plain nn.Conv3d layers: Opacus' own conv grad sampler (unfold3d + einsum)."""
    stock = copy.deepcopy(model)
    for m in stock.modules():
        if type(m) is DPConv3d:
            m.__class__ = nn.Conv3d
    return stock


def _grad_samples(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    module, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    nn.functional.cross_entropy(module(x), y).backward()
    return {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_dp_path_gives_opacus_per_sample_gradients_in_3d(name):
    torch.manual_seed(0)
    x, y = _volumes(3)
    base = build_model(name, 2, dims=3)
    want = _grad_samples(_stock(base), x, y)
    got = _grad_samples(prepare_for_dp(copy.deepcopy(base)), x, y)  # grouped sampler, no summed grads
    frozen = {n for n, p in base.named_parameters() if any(p is q for q in base.stem.parameters())}
    assert frozen and set(got) == set(want) - frozen  # the full-resolution stem stays as it was
    for n, g in got.items():
        assert g.shape == (3, *dict(base.named_parameters())[n].shape)
        torch.testing.assert_close(g, want[n], atol=1e-5, rtol=1e-4)
    # every sample's gradient is its own: samples 0 and 1 differ, and sample 0's equals a batch of it alone
    weight = next(n for n in got if n.endswith("weight") and got[n].dim() == 6)
    assert not torch.allclose(got[weight][0], got[weight][1])
    alone = _grad_samples(prepare_for_dp(copy.deepcopy(base)), x[:1], y[:1])
    torch.testing.assert_close(alone[weight][0], got[weight][0], atol=1e-5, rtol=1e-4)


def test_dp_step_in_physical_batches_equals_per_sample_clipping_by_hand():
    """Logical batch 4 in physical batches of 2 (BatchMemoryManager, the loop train_dp runs), noise 0: the update
    is minus the mean of the per-sample gradients clipped to C, each computed by autograd on its volume alone."""
    torch.manual_seed(0)
    x, y = _volumes(4)
    base = prepare_for_dp(build_model("cnn", 2, dims=3), skip_summed_grads=False)
    trained = [n for n, p in base.named_parameters() if p.requires_grad]
    per_sample = []
    for i in range(4):
        base.zero_grad()
        nn.functional.cross_entropy(base(x[i:i + 1]), y[i:i + 1]).backward()
        per_sample.append(torch.cat([dict(base.named_parameters())[n].grad.flatten() for n in trained]))
    norms = torch.stack([g.norm() for g in per_sample])
    clip = float(norms.sort().values[1:3].mean())  # between the norms: two samples clipped, two not
    want = torch.stack([g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in per_sample]).mean(0)

    model = prepare_for_dp(copy.deepcopy(base))
    before = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in trained])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    module, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
        noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as batches:
        train_steps(module, batches, opt, torch.device("cpu"))
    after = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in trained])
    torch.testing.assert_close(before - after, want, atol=1e-5, rtol=1e-3)  # float32 sums in another order: ~1e-6
    stem = [n for n, _ in model.named_parameters() if n not in trained]
    assert stem and all(torch.equal(model.state_dict()[n], base.state_dict()[n]) for n in stem)


def test_train_dp_takes_charged_steps_on_volumes(tmp_path):
    """client.dp.train_dp unchanged on 5-D input: patient Poisson batches, physical batches of 2, the ledger."""
    x, y = _volumes(6)
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.csv").write_text("patient_id,image_path,label\n")
    ledger = PrivacyLedger.open(site, delta=1e-5, max_epsilon=100, fingerprint="volumes")
    plan = plan_dp(6, batch_size=4, local_epochs=1, rounds=1, target_epsilon=8, delta=1e-5)
    torch.manual_seed(0)
    model = build_model("cnn", 2, dims=3)
    before = copy.deepcopy(model.state_dict())
    stats = train_dp(model, PatientData(x.numpy(), y.numpy()), plan, ledger,
                     DPSettings(max_grad_norm=1.0, physical_batch_size=2),
                     sampling_rng=np.random.default_rng(0), noise_generator=torch.Generator().manual_seed(0))
    assert stats["steps"] == plan.steps_per_round == 2
    assert sum(e["steps"] for e in ledger.entries if e["kind"] == "train") == 2
    after = model.state_dict()
    assert set(after) == set(before)  # the plain network's names, no Opacus prefix
    for k in after:
        assert torch.equal(after[k], before[k]) == k.startswith("features.stem."), k


def test_gradient_accumulation_over_volume_pairs_equals_the_logical_batch():
    torch.manual_seed(0)
    x, y = _volumes(4)
    one = build_model("resnet", 2, dims=3)
    two, init = copy.deepcopy(one), copy.deepcopy(one.state_dict())
    cpu = torch.device("cpu")
    train_steps(one, [(x, y)], torch.optim.SGD(one.parameters(), lr=0.1), cpu)
    opt = torch.optim.SGD(two.parameters(), lr=0.1)
    train_steps(two, [(x[:2], y[:2]), (x[2:], y[2:])], opt, cpu, accumulation=2)
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    for k in ("1.conv1.weight", "1.layer4.0.conv2.weight", "1.fc.weight"):  # a step was taken, first to last
        assert not torch.equal(two.state_dict()[k], init[k]), k


def test_3d_checkpoint_round_trip_keeps_its_dims(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", 2, dims=3).eval()
    path = tmp_path / "final_model.pt"
    torch.save(model.state_dict(), path)
    write_card(path, "cnn", 2, 32, dims=3, volume_window="soft-tissue", volume_spacing=2.0)
    card = read_card(path)
    assert card == {"model": "cnn", "num_classes": 2, "image_size": 32, "detector": False, "dims": 3,
                    "volume_window": "soft-tissue", "volume_spacing": 2.0}  # how scoring reads new studies
    state = load_state_dict_file(path)
    assert state_dims(state) == model_dims(path, state, card) == 3
    spec = ModelSpec(model=card["model"], num_classes=card["num_classes"], dims=model_dims(path, state, card))
    again = spec.network().eval()
    again.load_state_dict(state)
    x, _ = _volumes(2)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # a round checkpoint holds the state dict under "model": its weights still say 3-D
    torch.save({"format": 2, "round": 3, "model": model.state_dict()}, tmp_path / "round_003.pt")
    assert state_dims(load_state_dict_file(tmp_path / "round_003.pt")) == 3
    # a 2-D model's card has no dims key; weights without a card are read by their rank
    write_card(tmp_path / "flat.pt", "cnn", 2, 32)
    assert "dims" not in read_card(tmp_path / "flat.pt")
    assert model_dims(tmp_path / "flat.pt", build_model("cnn").state_dict(), read_card(tmp_path / "flat.pt")) == 2
    assert model_dims(tmp_path / "x.pt", state, None) == 3
    with pytest.raises(ValueError, match="says dims = 3 but its convolution weights are 2-D"):
        model_dims(path, build_model("cnn").state_dict(), card)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model("cnn").load_state_dict(state)  # a 2-D network never takes 3-D weights


def test_pretrained_checkpoint_of_other_dims_is_refused(tmp_path):
    torch.manual_seed(0)
    flat, volume = tmp_path / "flat.pt", tmp_path / "volume.pt"
    torch.save(build_model("cnn").state_dict(), flat)
    torch.save(build_model("cnn", dims=3).state_dict(), volume)
    with pytest.raises(CheckpointFormatError, match=r"holds a 2-D network \(images\) but this run trains a 3-D "
                                                    r"network \(volumes\) \(dims = 3\)"):
        load_pretrained(build_model("cnn", dims=3), flat)
    with pytest.raises(CheckpointFormatError, match="holds a 3-D network"):
        load_pretrained(build_model("cnn"), volume)
    target = build_model("cnn", dims=3)
    report = load_pretrained(target, volume)
    assert not report.skipped and len(report.loaded) == len(target.state_dict())
    # an RGB 3-D checkpoint into a grey 3-D network: the first convolution summed over its channels
    rgb = build_model("cnn", in_channels=3, dims=3)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    grey = build_model("cnn", dims=3)
    assert load_pretrained(grey, tmp_path / "rgb.pt").adapted == ["features.stem.0.weight"]
    torch.testing.assert_close(grey.features.stem[0].weight, rgb.features.stem[0].weight.sum(1, keepdim=True))
    # freeze=stem: the 3-D ResNet's full-resolution convolution and norm
    resnet = freeze(build_model("resnet", dims=3), "stem")
    assert [n for n, p in resnet.named_parameters() if not p.requires_grad] == ["1.conv1.weight", "1.bn1.weight",
                                                                                  "1.bn1.bias"]
