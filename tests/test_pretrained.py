"""Transfer learning: a checkpoint file the test writes, mapped onto equifed's networks, its RGB first convolution
adapted to grey, pickled code refused, and the frozen parts a site keeps while it trains."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from core_models.config import ConfigError, run_config_of
from core_models.networks import build_model
from core_models.pretrained import (CheckpointFormatError, freeze, frozen_part, grey_first_conv, load_pretrained,
                                    read_state_dict)
from core_models.training import make_loader, train_epochs


def test_grey_conv_gives_the_rgb_output_of_a_replicated_grey_image():
    gen = torch.Generator().manual_seed(0)
    rgb = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        rgb.weight.copy_(torch.randn(rgb.weight.shape, generator=gen))
    grey = nn.Conv2d(1, 8, 3, padding=1)
    with torch.no_grad():
        grey.weight.copy_(grey_first_conv(rgb.weight))
        grey.bias.copy_(rgb.bias)
    x = torch.rand((4, 1, 16, 16), generator=gen)
    assert torch.allclose(grey(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5)


def _rgb_checkpoint(tmp_path, num_classes=5):
    """A SmallCNN-shaped state dict with a 3-channel stem and another head, as DataParallel saves it."""
    torch.manual_seed(1)
    source = build_model("cnn", num_classes).state_dict()
    source["features.stem.0.weight"] = torch.randn(16, 3, 3, 3)
    path = tmp_path / "pretrained.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 90}, path)
    return path, source


def test_checkpoint_loads_with_the_stem_adapted_and_the_head_kept_fresh(tmp_path):
    path, source = _rgb_checkpoint(tmp_path)
    torch.manual_seed(2)
    model = build_model("cnn", 2)
    fresh_head = model.head.weight.detach().clone()
    report = load_pretrained(model, path)
    state = model.state_dict()
    assert report.adapted == ["features.stem.0.weight"]
    assert torch.equal(state["features.stem.0.weight"], source["features.stem.0.weight"].sum(1, keepdim=True))
    assert torch.equal(state["features.block3.0.weight"], source["features.block3.0.weight"])
    assert set(report.skipped) == {"head.weight", "head.bias"} and "shape (5, 64)" in report.skipped["head.weight"]
    assert torch.equal(model.head.weight, fresh_head)


def test_key_map_renames_a_bare_checkpoint_onto_the_network(tmp_path):
    torch.manual_seed(3)
    source = build_model("cnn", 2).state_dict()
    path = tmp_path / "encoder.pt"
    torch.save({f"encoder.{k}": v for k, v in source.items()}, path)
    with pytest.raises(CheckpointFormatError, match="key map"):
        load_pretrained(build_model("cnn", 2), path)
    model = build_model("cnn", 2)
    report = load_pretrained(model, path, key_map="encoder.=")
    assert not report.skipped and all(torch.equal(model.state_dict()[k], v) for k, v in source.items())


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointFormatError, match="not a plain state dict"):
        read_state_dict(path)
    assert not marker.exists()


def test_frozen_encoder_trains_only_the_head_until_unfrozen():
    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 0.1, (64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 2, 64)
    torch.manual_seed(0)
    model = build_model("cnn", 2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert frozen_part("encoder", 2, server_round=2) == "encoder" and frozen_part("encoder", 2, 3) == "none"
    freeze(model, frozen_part("encoder", 2, server_round=1))
    train_epochs(model, make_loader(x, y, 16, shuffle=True), epochs=1, optimizer="adam", lr=0.01,
                 device=torch.device("cpu"))
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    freeze(model, frozen_part("encoder", 2, server_round=3))
    train_epochs(model, make_loader(x, y, 16, shuffle=True), epochs=1, optimizer="adam", lr=0.01,
                 device=torch.device("cpu"))
    assert not torch.equal(model.state_dict()["features.block2.0.weight"], after["features.block2.0.weight"])


def test_server_starts_from_the_checkpoint_and_bad_settings_are_config_errors(tmp_path):
    from server.app import initial_model

    path, source = _rgb_checkpoint(tmp_path, num_classes=2)
    model = initial_model(run_config_of({"pretrained-path": str(path)}))
    assert torch.equal(model.state_dict()["head.weight"], source["head.weight"])
    with pytest.raises(ConfigError, match="freeze"):
        run_config_of({"freeze": "everything"})
    with pytest.raises(CheckpointFormatError, match="not found"):
        initial_model(run_config_of({"pretrained-path": str(tmp_path / "missing.pt")}))


def test_a_torchvision_resnet18_checkpoint_maps_onto_model_resnet18(tmp_path):
    """torchvision's ResNet-18 parameter names and shapes (written here by MONAI's ResNet in the same layout with
    BatchNorm, 3 channels, 1000 classes: no download) load into `resnet18` with the key map "=1."."""
    from monai.networks.nets import ResNet

    torch.manual_seed(3)
    public = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                    n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, bias_downsample=False, num_classes=1000)
    state = public.state_dict()
    torchvision = {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 3, 3),  # torchvision's names
                   "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.1.bn2.running_var": (512,),
                   "fc.weight": (1000, 512), "fc.bias": (1000,)}
    assert {k: tuple(state[k].shape) for k in torchvision} == torchvision
    assert len(state) == 122 and "layer2.0.downsample.0.bias" not in state  # 1x1 shortcuts without bias
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model("resnet18", 2)
    report = load_pretrained(model, path, "=1.")
    assert report.adapted == ["1.conv1.weight"]  # RGB stem summed to grey
    assert torch.equal(model.state_dict()["1.conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    assert set(report.skipped) == {"1.fc.weight", "1.fc.bias"}  # 1000 classes there, 2 here
    convs = [k for k in state if k.endswith("weight") and state[k].dim() == 4 and k != "conv1.weight"]
    assert len(convs) == 19 and all(torch.equal(model.state_dict()[f"1.{k}"], state[k]) for k in convs)
    # BatchNorm's running statistics have no counterpart in the GroupNorm network DP-SGD needs
    assert set(report.unused) == {f"1.{k}" for k in state if "running_" in k or "num_batches_tracked" in k}
