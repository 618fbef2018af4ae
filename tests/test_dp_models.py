"""The ResNets under DP-SGD: Opacus' backward hooks refuse in-place operations on the layers' outputs, so the
networks' residual blocks and ReLUs work out of place, with MONAI's parameters and function."""

import numpy as np
import pytest
import torch
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from core_models.networks import build_model
from simulations.baselines import DPSite, Training, snapshot, train_round


@pytest.mark.parametrize("name", ["resnet", "resnet18"])
def test_the_residual_blocks_compute_monais_function_out_of_place(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    blocks = [m for m in model.modules() if isinstance(m, ResNetBlock)]
    assert len(blocks) == (4 if name == "resnet" else 8)
    assert not [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    x = torch.randn(3, blocks[0].conv1.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # MONAI's own forward (in place) on the same weights: the same numbers
        assert torch.equal(blocks[0](x), ResNetBlock.forward(blocks[0], x.clone()))


def test_model_resnet_takes_a_dp_sgd_step(tmp_path):
    """One round of the DP-SGD a site runs (client.dp.train_dp through simulations.baselines), charged to a
    ledger; before the out-of-place blocks it stopped at Opacus' "... is a view and is being modified inplace"."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (12, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 2, 12)
    model = build_model("resnet")
    before = snapshot(model)
    training = Training(rounds=1, local_epochs=1, lr=0.05, optimizer="sgd", batch_size=12, epsilon=8.0,
                        physical_batch_size=6)
    dp = DPSite(tmp_path, "site", n_train=12, n_own=4, n_manifest=16, training=training,
                rng=np.random.default_rng(1))
    train_round(model, x, y, training, dp, rnd=1, seed=0, noise_seed=0)
    assert 0.0 < dp.spent() <= 8.0 + 1e-6
    after = model.state_dict()
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trained and all(not torch.equal(after[k], before[k]) for k in trained)
