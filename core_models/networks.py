"""Networks for 1-channel medical images that Opacus can train.

Both use GroupNorm (never BatchNorm): BatchNorm mixes samples inside a batch, so
per-sample gradients (DP-SGD) are undefined for it.
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet
from opacus.validators import ModuleValidator
from torch import nn

MODEL_NAMES = ("cnn", "resnet")


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class Standardize(nn.Module):
    """Fixed input scaling: images arrive in [0, 1]; centring them speeds up the first epochs."""

    def __init__(self, mean: float = 0.4, std: float = 0.2) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Four conv blocks and a global-max-pooled linear head.

    Global pooling makes it work for any input size from 28 to 224 px; max rather than
    average pooling because a finding is small and local (a lesion anywhere => positive).
    """

    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in (width, width * 2, width * 4, width * 4):
            layers += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
                _group_norm(out_ch),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(Standardize(), *layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(in_ch, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (used by shift and fairness statistics)."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_model(name: str = "cnn", num_classes: int = 2) -> nn.Module:
    """Return a fresh, DP-compatible network producing `num_classes` logits.

    Binary tasks use two logits (softmax), so one loss and one metric path serve
    binary and multi-class heads alike.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "cnn":
        return SmallCNN(num_classes=num_classes)
    if name == "resnet":
        # MONAI's ResNet-10 layout in 2-D, narrowed for CPU. MONAI 1.6 applies `norm`
        # only to the stem, so Opacus swaps the blocks' BatchNorm for GroupNorm.
        resnet = ResNet(
            block="basic",
            layers=[1, 1, 1, 1],
            block_inplanes=[16, 32, 64, 128],
            spatial_dims=2,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=1,
            no_max_pool=False,
            num_classes=num_classes,
            norm=("group", {"num_groups": 8}),
        )
        return nn.Sequential(Standardize(), ModuleValidator.fix(resnet))
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


def get_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
