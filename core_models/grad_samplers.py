"""Opacus' per-sample gradient rule for `DPConv2d` and `DPConv3d`; importing this module registers it.

Kept apart from the networks so that building or scoring a model (the server, the audit
commands) does not import Opacus (seconds per process). `prepare_for_dp` and the DP
training loop import it before `PrivacyEngine.make_private`.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.utils import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d, unfold3d
from torch import nn

from core_models.networks import DPConv, DPConv2d, DPConv3d


def _grouped_conv_applies(layer: nn.Conv2d | nn.Conv3d, activations: torch.Tensor) -> bool:
    in_per_group = layer.in_channels // layer.groups
    out_per_group = layer.out_channels // layer.groups
    return (
        activations.dim() == layer.weight.dim()
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        # 2-D: oneDNN's grouped kernels are slow for odd channel counts (measured 12->24); 3-D: the grouped
        # path was 1.6-11x faster than unfold3d + einsum for every channel count measured (1->16, 12->24, 64->64)
        and (activations.dim() == 5 or (in_per_group % 8 == 0 and out_per_group % 8 == 0))
    )


def _unfold_grad_sample(layer: nn.Conv2d | nn.Conv3d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Opacus' own method (im2col + einsum), which keys on type(layer) is nn.Conv2d / nn.Conv3d and so skips
    subclasses."""
    n = x.shape[0]
    unfold = unfold3d if x.dim() == 5 else unfold2d
    cols = unfold(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                  dilation=layer.dilation)
    grad = torch.einsum("noq,npq->nop", backprops.reshape(n, -1, cols.shape[-1]), cols)
    g = layer.groups
    grad = grad.view(n, g, -1, g, layer.in_channels // g, *layer.kernel_size)
    return torch.einsum("ngrg...->ngr...", grad).contiguous().view(n, *layer.weight.shape)


def _grouped_grad_sample(layer: nn.Conv2d | nn.Conv3d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Sample i's weight gradient is block i of the weight gradient of a convolution with
    groups = batch size over the batch laid out as channels."""
    n, c_in, c_out = x.shape[0], x.shape[1], backprops.shape[1]
    return torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * c_out, *backprops.shape[2:]),
        x.reshape(1, n * c_in, *x.shape[2:]),
        layer.weight.detach().repeat(n, *[1] * (layer.weight.dim() - 1)),
        None,
        layer.stride,
        layer.padding,
        layer.dilation,
        False,
        [0] * (x.dim() - 2),
        n,
        [False, True, False],
    )[1].view(n, *layer.weight.shape)


@register_grad_sampler([DPConv2d, DPConv3d])
def compute_dpconv_grad_sample(layer: DPConv, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Per-sample gradients of a `DPConv2d` / `DPConv3d` for Opacus (grad_sample_mode "hooks" and "ghost")."""
    x = activations[0].to(backprops.dtype)
    ret = {}
    if layer.weight.requires_grad:
        if x.shape[0] == 0:
            ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        elif _grouped_conv_applies(layer, x):
            ret[layer.weight] = _grouped_grad_sample(layer, x, backprops)
        else:
            ret[layer.weight] = _unfold_grad_sample(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(dim=2)
    return ret
