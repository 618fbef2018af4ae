"""Image evidence for the fairness audit: does the model look at the scanner's corner marker?

The causal audit measures how much of the score flows along the impermissible A -> S -> score path; it cannot say
*which pixels* carry it. In the synthetic data the legacy scanner (S=1) burns a bright square into the top-left
corner (:func:`simulations.generator.marker_mask`), so a model that leans on S should put its attribution there.
This module gives that evidence from the images themselves, before and after a mitigation, and checks that the
attribution map is worth reading at all:

* :func:`gradcam_maps`: Grad-CAM (Selvaraju et al. 2017) via MONAI on a copy of the model;
* :func:`hirescam_maps`: HiResCAM (Draelos & Carin 2020), Grad-CAM without averaging the gradient over positions;
* :func:`occlusion_maps`: occlusion (Zeiler & Fergus 2014) at the input's resolution, for when the network's
  usable Grad-CAM layer is too coarse for the region (SmallCNN at 32 px: 2x2);
* :func:`region_share` / :func:`area_share`: the share of attribution mass inside the marker region, against the
  share of the image the region covers (what a map spread evenly would give);
* :func:`randomisation_check`: the model-parameter randomisation test (Adebayo et al. 2018): a map that barely
  changes when the weights are re-initialised explains the image, not the model;
* :func:`deletion_curve`: the deletion metric (Petsiuk et al. 2018, RISE): deleting the most-attributed pixels
  first must lower the score faster than deleting pixels in random order;
* :func:`image_evidence`: all of it as one JSON-able dict for :func:`fairness.report.render_html`
  (``context["image_evidence"]``).

Layer. :class:`core_models.networks.SmallCNN`'s blocks give, at 32 px input, 16x16 (``features.stem``, stride 2),
8x8 (``features.block2``), 4x4 (``features.block3``) and 2x2 (``features.block4``, stride 16) maps; at 64 px twice
that; at 28 px (MedMNIST) block4 is 1x1, without spatial information (:func:`image_evidence` refuses it: render
32 px or more). The default is ``features.block4``, the last block, the highest resolution that works: every earlier
block feeds a convolution followed by GroupNorm, which makes the score invariant to scaling its input, so at those
layers sum(gradient * activation) over channels and positions is close to 0 (exactly 0 but for the conv bias and
GroupNorm's eps; measured <= 0.09 against |g*a| sums of 7-10, while at block4 it equals the class logit minus the
head's bias, ~5). Grad-CAM's map is roughly that sum spread over the positions, so there it is negative almost
everywhere and its ReLU leaves nothing or a seed-dependent fragment (on marker-trained SmallCNNs: all-zero maps for
every image at ``stem`` and ``block2``, and at ``block3`` for some training seeds). At 2x2 the map says little more
than which quadrant: read the region share against the area share of the region grown by the stride, and mind that
the randomisation check is coarse there (a 2x2 map has 4 values to rank).

For maps with resolution, use a ResNet (``resnet``): its identity shortcuts add each block's input to the
normalised branch, so the score is not invariant to the scale of an inner stage and the CAM does not cancel. Its
default layer is ``1.layer2``, 16x16 at 64 px (stride 4), where a 6x6 marker is a few cells, not a quadrant.

Images are numpy arrays (N, C, H, W), float32 in [0, 1], as the models take them: C = 1 grey, or 3 for an RGB
network (run config in-channels=3). Every map is 2-D over the image, (N, H, W), whatever C: the CAMs sum over the
layer's channels, occlusion hides a window in every channel at once (filled with the image's mean colour), and
deletion removes a pixel's three channels together. :func:`show_image` draws a grey or RGB image (with a map over it)
in a matplotlib figure. Imports no Flower code.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from monai.visualize import GradCAM
from scipy.ndimage import binary_dilation
from scipy.stats import spearmanr
from torch import nn

DEFAULT_LAYERS = ("features.block4", "1.layer2")
"""Grad-CAM's layer, the first of these a network has: SmallCNN's last conv block (2x2 at 32 px input, stride 16),
the earliest layer whose Grad-CAM is not cancelled by the GroupNorm that follows it; a MONAI ResNet's second stage
(``resnet``: 16x16 at 64 px, stride 4; ``resnet18``, with its stride-2 stem: 8x8), whose identity shortcuts keep the
score from being invariant to the scale of its activations (see the module docstring)."""

DELETION_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)

ATTRIBUTION_METHODS = ("gradcam", "hirescam", "occlusion")

RANDOMISATION_PASS = 0.3
"""A map passes the randomisation check when its median rank correlation with the re-initialised network's maps
is at most this (a map that explains the model changes when its weights do)."""


# --------------------------------------------------------------------------------------------- helpers

def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter trainable, so the caller's model (its weights, mode,
    requires_grad flags and hooks) stays as it is; unwraps an Opacus GradSampleModule and switches off
    ``DPConv2d.skip_summed_grads`` (which refuses a forward with gradients outside Opacus)."""
    inner = getattr(model, "_module", model)
    m = copy.deepcopy(inner).cpu().float().eval()
    for mod in m.modules():
        if getattr(mod, "skip_summed_grads", False):
            mod.skip_summed_grads = False
        for hooks in (mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks):
            hooks.clear()  # the copy carries the original's hooks (Opacus' per-sample capture among them)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def _as_images(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {x.shape}")
    return x


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _check_layer(model: nn.Module, layer: str) -> None:
    if layer not in dict(model.named_modules()):
        raise ValueError(f"no layer {layer!r} in {type(model).__name__}; layers: {_layer_names(model)}")


def _default_layer(model: nn.Module) -> str:
    names = dict(model.named_modules())
    for layer in DEFAULT_LAYERS:
        if layer in names:
            return layer
    raise ValueError(f"{type(model).__name__} has none of {DEFAULT_LAYERS}: pass layer= (one of "
                     f"{_layer_names(model)})")


def cam_resolution(model: nn.Module, layer: str, size: Sequence[int], channels: int = 1) -> tuple[int, int]:
    """(h, w) of ``layer``'s output for an input of spatial ``size``: the grid Grad-CAM actually resolves before it
    is upsampled to the image."""
    m = _plain_copy(model)
    _check_layer(m, layer)
    out: dict[str, tuple[int, int]] = {}

    def hook(_m, _i, o) -> None:  # a forward hook that returns something replaces the layer's output
        out["hw"] = (int(o.shape[-2]), int(o.shape[-1]))

    handle = dict(m.named_modules())[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            m(torch.zeros(1, channels, *size))
    finally:
        handle.remove()
    return out["hw"]


def grow_mask(mask: np.ndarray, grow: int = 0) -> np.ndarray:
    """``mask`` dilated by ``grow`` pixels in every direction (a square neighbourhood): an upsampled CAM cannot place
    mass more precisely than its layer's stride, so the region is widened by about that much."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if grow < 0:
        raise ValueError(f"grow must be >= 0, got {grow}")
    return binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=int(grow)) if grow else mask.copy()


def area_share(mask: np.ndarray, grow: int = 0) -> float:
    """The share of the image the (grown) region covers: the region share a uniform map would get."""
    return float(grow_mask(mask, grow).mean())


def _auc(y: Sequence[float], x: Sequence[float]) -> float:
    return float(np.trapezoid(np.asarray(y, float), np.asarray(x, float)))


# --------------------------------------------------------------------------------------------- maps

def gradcam_maps(model: nn.Module, x: np.ndarray | torch.Tensor, layer: str | None = None, class_idx: int = 1,
                 *, batch_size: int = 128) -> np.ndarray:
    """Grad-CAM maps (N, H, W) of class ``class_idx`` at ``layer`` (default: the first of :data:`DEFAULT_LAYERS` the
    model has), upsampled bilinearly to the image size by MONAI.

    Runs on a deep copy (eval mode, gradients on), because MONAI registers hooks on the module and needs gradients
    at the layer. The maps are MONAI's raw ReLU'd Grad-CAM, in the model's units and comparable across images:
    MONAI's default post-processing (``default_normalizer``) min-max scales every map *and flips it* (its maximum
    becomes 0), which would point region shares and deletion order at the least-attributed pixels.
    """
    m = _plain_copy(model)
    layer = layer or _default_layer(m)
    _check_layer(m, layer)
    x = _as_images(x)
    cam = GradCAM(nn_module=m, target_layers=layer, postprocessing=lambda a: a)
    out = []
    for i in range(0, len(x), batch_size):
        cam.nn_module.gradients.clear()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Backward hook for")  # checked just below instead
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # first layers: harmless
            with torch.enable_grad():  # also inside a caller's no_grad block
                maps = cam(torch.from_numpy(x[i:i + batch_size]), class_idx=class_idx)
        if layer not in cam.nn_module.gradients:
            raise RuntimeError(f"no gradient reached {layer!r}: choose a layer the class score depends on")
        out.append(maps.detach().cpu().numpy()[:, 0])
    if not out:
        return np.zeros((0, *x.shape[2:]), np.float32)
    return np.concatenate(out).astype(np.float32)


def hirescam_maps(model: nn.Module, x: np.ndarray | torch.Tensor, layer: str | None = None, class_idx: int = 1,
                  *, batch_size: int = 128) -> np.ndarray:
    """HiResCAM maps (Draelos & Carin 2020) (N, H, W): ReLU of the channel sum of gradient times activation at
    ``layer``, position by position, upsampled bilinearly to the image size.

    Grad-CAM averages each channel's gradient over the positions before weighting the activations, so a channel
    that helps the score at the marker and hurts it elsewhere gets a small weight everywhere; HiResCAM keeps the
    gradient where it is. On the marker scenario at 64 px (ResNet, ``1.layer2``, 5 draws) its marker share fell
    from 0.151 to 0.014 with the mitigation (Grad-CAM's from 0.092 to 0.056), and for the unmitigated model its
    deletion curve lay below random order (0.150 against 0.193; Grad-CAM's above it, 0.231)."""
    m = _plain_copy(model)
    layer = layer or _default_layer(m)
    _check_layer(m, layer)
    x = _as_images(x)
    seen: dict[str, torch.Tensor] = {}

    def keep(_m, _i, o) -> None:
        seen["a"] = o

    handle = dict(m.named_modules())[layer].register_forward_hook(keep)
    out = []
    try:
        for i in range(0, len(x), batch_size):
            with torch.enable_grad():  # also inside a caller's no_grad block
                logits = m(torch.from_numpy(x[i:i + batch_size]))
                act = seen.pop("a")
                grad, = torch.autograd.grad(logits[:, class_idx].sum(), act)
            cam = torch.relu((grad * act).sum(1, keepdim=True))
            out.append(nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear",
                                                 align_corners=False)[:, 0].detach().numpy())
    finally:
        handle.remove()
    if not out:
        return np.zeros((0, *x.shape[2:]), np.float32)
    return np.concatenate(out).astype(np.float32)


def occlusion_window(width: int) -> int:
    """The default occlusion window: an eighth of the image width, at least 2 px (4 px at 32 px, ~ the marker)."""
    return max(2, int(width) // 8)


def occlusion_maps(model: nn.Module, x: np.ndarray | torch.Tensor, patch: int | None = None, class_idx: int = 1,
                   *, stride: int = 1) -> np.ndarray:
    """Occlusion attribution (Zeiler & Fergus 2014) at the input's resolution: for every ``patch`` x ``patch``
    window (default :func:`occlusion_window`; every ``stride`` pixels) filled with the image's
    mean, the drop of the class-``class_idx`` probability; each pixel gets the mean drop of the windows that cover
    it (N, H, W). Positive: hiding the pixel lowers the score. An RGB image's window is filled with its mean colour
    (each channel's mean), across all three channels.

    Why not Grad-CAM here: SmallCNN's only usable Grad-CAM layer is 2x2 at 32 px (module docstring), too coarse to
    tell a 3x3 corner marker from its quadrant. Why not MONAI's ``OcclusionSensitivity``: its map is a
    sliding-window blend whose class probabilities do not sum to 1 (0.88 per pixel, measured on SmallCNN, 5 px
    windows, overlap 0.6), so the drop against the unoccluded probability is not defined; the exhaustive form is
    cheap at these sizes (~850 forward passes per 32 px image)."""
    m = _plain_copy(model)
    x = _as_images(x)
    n, _, h, w = x.shape
    k = int(patch or occlusion_window(w))
    corners = [(i, j) for i in range(0, h - k + 1, stride) for j in range(0, w - k + 1, stride)]
    cover = np.zeros((h, w))
    for i, j in corners:
        cover[i:i + k, j:j + k] += 1
    base = _class_probability(m, x, class_idx)
    out = np.zeros((n, h, w))
    for idx in range(n):
        batch = np.repeat(x[idx:idx + 1], len(corners), axis=0)
        fill = x[idx].mean() if x.shape[1] == 1 else x[idx].mean(axis=(1, 2), keepdims=True)  # RGB: mean colour
        for b, (i, j) in enumerate(corners):
            batch[b, :, i:i + k, j:j + k] = fill
        drop = base[idx] - _class_probability(m, batch, class_idx)
        for b, (i, j) in enumerate(corners):
            out[idx, i:i + k, j:j + k] += drop[b]
    return (out / np.maximum(cover, 1)).astype(np.float32)


def attribution_maps(model: nn.Module, x: np.ndarray | torch.Tensor, method: str = "gradcam",
                     layer: str | None = None, class_idx: int = 1, *, occlusion_stride: int = 1) -> np.ndarray:
    """``method`` "gradcam" (:func:`gradcam_maps` at ``layer``), "hirescam" (:func:`hirescam_maps`) or
    "occlusion" (:func:`occlusion_maps`, windows every ``occlusion_stride`` pixels)."""
    if method == "gradcam":
        return gradcam_maps(model, x, layer, class_idx)
    if method == "hirescam":
        return hirescam_maps(model, x, layer, class_idx)
    if method == "occlusion":
        return occlusion_maps(model, x, class_idx=class_idx, stride=occlusion_stride)
    raise ValueError(f"unknown attribution method {method!r}: one of {ATTRIBUTION_METHODS}")


def region_share(maps: np.ndarray, mask: np.ndarray, grow: int = 0) -> np.ndarray:
    """Per map, the share of its non-negative mass inside ``mask`` grown by ``grow`` pixels (NaN for an all-zero
    map). Compare with :func:`area_share`: a map that ignores the region gets about the area share, one that
    points at it gets much more."""
    maps = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    if maps.ndim == 2:
        maps = maps[None]
    region = grow_mask(mask, grow)
    if maps.shape[1:] != region.shape:
        raise ValueError(f"maps are {maps.shape[1:]}, mask is {region.shape}")
    total = maps.sum(axis=(1, 2))
    inside = maps[:, region].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def show_image(ax, image: np.ndarray, attribution: np.ndarray | None = None, alpha: float = 0.45) -> None:
    """Draw one model input on a matplotlib axis: (1, H, W) or (H, W) in grey, (3, H, W) in colour (an RGB
    network's input, in [0, 1]); with ``attribution`` (an (H, W) map) its positive part over it in a heat colour map."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] == 3:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0.0, 1.0))
    else:
        ax.imshow(img.reshape(img.shape[-2:]), cmap="gray", vmin=0.0, vmax=1.0)
    if attribution is not None:
        ax.imshow(np.clip(np.asarray(attribution, dtype=np.float32), 0.0, None), cmap="jet", alpha=alpha)
    ax.set_axis_off()


# --------------------------------------------------------------------------------------------- sanity checks

def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture (and constructor arguments) with every layer re-initialised under ``seed``
    (``reset_parameters`` of each module that has one)."""
    m = _plain_copy(model)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream where it was
        torch.manual_seed(seed)
        for mod in m.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return m


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # a constant map has no ranking to compare
        return math.nan
    return float(spearmanr(a, b).statistic)


def _randomisation_rhos(model: nn.Module, x: np.ndarray | torch.Tensor, layer: str | None, seed: int, n_draws: int,
                        class_idx: int, method: str = "gradcam", *, occlusion_stride: int = 1,
                        trained: np.ndarray | None = None) -> np.ndarray:
    """(n_draws, N) Spearman correlations, trained map (``trained``, if already computed) vs re-initialised
    (seeds ``seed``, ``seed + 1``, ...) map."""
    if trained is None:
        trained = attribution_maps(model, x, method, layer, class_idx, occlusion_stride=occlusion_stride)
    rhos = []
    for d in range(int(n_draws)):
        rand = attribution_maps(randomised_copy(model, seed + d), x, method, layer, class_idx,
                                occlusion_stride=occlusion_stride)
        rhos.append([_spearman(a, b) for a, b in zip(trained, rand)])
    return np.array(rhos, dtype=float).reshape(int(n_draws), len(trained))


def randomisation_check(model: nn.Module, x: np.ndarray | torch.Tensor, layer: str | None = None, seed: int = 0,
                        *, n_draws: int = 10, class_idx: int = 1) -> float:
    """Model-parameter randomisation test (Adebayo et al. 2018): the median over images (and ``n_draws``
    re-initialisations, seeds ``seed``, ``seed + 1``, ...) of the Spearman rank correlation between the model's
    Grad-CAM map and that of the same architecture with re-initialised weights. A map that explains the model must
    change when the model does: low correlation passes, near 1 fails (the map shows the image, not the model).

    Several draws because one is not enough at a coarse layer: with SmallCNN's 2x2 maps the median of a single draw
    ranged from -0.8 to 1.0 over seeds on the same trained model (a random network's max-pooled features also
    pick out the bright marker); pooled over 10 draws it stayed within -0.25..0.15. Pairs where either map is
    constant (a random network's map is often all zero) have no ranking and are skipped; NaN when all are.
    """
    rho = _randomisation_rhos(model, x, layer, seed, n_draws, class_idx)
    return float(np.nanmedian(rho)) if np.isfinite(rho).any() else math.nan


def _class_probability(model: nn.Module, x: np.ndarray, class_idx: int, batch_size: int = 256) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(torch.softmax(model(torch.from_numpy(x[i:i + batch_size])), dim=1)[:, class_idx].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def deletion_curve(model: nn.Module, x: np.ndarray | torch.Tensor, maps: np.ndarray,
                   fractions: Sequence[float] = DELETION_FRACTIONS, fill: str | float = "mean", seed: int = 0,
                   *, class_idx: int = 1) -> dict[str, Any]:
    """Deletion metric (Petsiuk et al. 2018, RISE): for each fraction f, set the top-f pixels of each image by
    attribution to ``fill`` (``"mean"``: the image's own mean, or a number) and record the mean class-``class_idx``
    probability; the same for a random pixel order (seeded) as the baseline. A faithful map drops the score faster,
    i.e. a smaller area under the curve (trapezoid over ``fractions``, not normalised) than the random order.

    Ties in the map (e.g. Grad-CAM's zeros) are broken in random order, never by pixel index, which would delete
    the top-left corner, where the marker is, first. Returns ``fractions``, ``attribution`` and ``random`` (mean
    probabilities), ``auc_attribution`` and ``auc_random``.
    """
    m = _plain_copy(model)
    x = _as_images(x)
    maps = np.asarray(maps, dtype=np.float64)
    n, c, h, w = x.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"maps must be {(n, h, w)}, got {maps.shape}")
    fractions = [float(f) for f in fractions]
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1], got {fractions}")
    rng = np.random.default_rng(seed)
    flat = maps.reshape(n, -1)
    tie_break = rng.random(flat.shape)
    orders = {
        "attribution": np.stack([np.lexsort((t, -a)) for a, t in zip(flat, tie_break)]),
        "random": np.argsort(rng.random(flat.shape), axis=1),
    }
    if fill == "mean":  # the image's mean (an RGB image's mean colour)
        fill_value = x.mean(axis=(1, 2, 3) if c == 1 else (2, 3), keepdims=True)
    else:
        fill_value = np.full((n, 1, 1, 1), float(fill), np.float32)
    curves: dict[str, list[float]] = {}
    for name, order in orders.items():
        curve = []
        for f in fractions:
            k = int(round(f * h * w))
            keep = np.ones((n, h * w), bool)
            np.put_along_axis(keep, order[:, :k], False, axis=1)
            keep = keep.reshape(n, 1, h, w)
            xd = np.where(keep, x, fill_value).astype(np.float32)
            curve.append(float(_class_probability(m, xd, class_idx).mean()) if n else math.nan)
        curves[name] = curve
    return {"fractions": fractions, "attribution": curves["attribution"], "random": curves["random"],
            "auc_attribution": _auc(curves["attribution"], fractions), "auc_random": _auc(curves["random"], fractions)}


# --------------------------------------------------------------------------------------------- report

def _evidence_one(model: nn.Module, x: np.ndarray, mask: np.ndarray, layer: str | None, grow: int, seed: int,
                  n_draws: int, class_idx: int, method: str = "gradcam", occlusion_stride: int = 1) -> dict[str, Any]:
    maps = attribution_maps(model, x, method, layer, class_idx, occlusion_stride=occlusion_stride)
    rho = _randomisation_rhos(model, x, layer, seed, n_draws, class_idx, method, occlusion_stride=occlusion_stride,
                              trained=maps)
    share = region_share(maps, mask, grow)
    dc = deletion_curve(model, x, maps, seed=seed, class_idx=class_idx)

    def fin(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    rho_median = fin(float(np.nanmedian(rho))) if np.isfinite(rho).any() else None
    return {
        "region_share_mean": fin(float(np.nanmean(share))) if np.isfinite(share).any() else None,
        "region_share_median": fin(float(np.nanmedian(share))) if np.isfinite(share).any() else None,
        "n_zero_maps": int(np.sum(~np.isfinite(share))),
        "randomisation_spearman": rho_median,
        "randomisation_pairs": int(np.isfinite(rho).sum()),
        "randomisation_draws": int(n_draws),
        "mean_probability": dc["attribution"][0] if dc["fractions"] and dc["fractions"][0] == 0 else None,
        "deletion_auc_attribution": dc["auc_attribution"],
        "deletion_auc_random": dc["auc_random"],
        "deletion_fractions": dc["fractions"],
        "deletion_attribution": dc["attribution"],
        "deletion_random": dc["random"],
        "passes_randomisation": rho_median is not None and rho_median <= RANDOMISATION_PASS,
        "passes_deletion": bool(dc["auc_attribution"] < dc["auc_random"]),
    }


def image_evidence(model: nn.Module, x: np.ndarray | torch.Tensor, mask: np.ndarray, layer: str | None = None,
                   grow: int | None = None, seed: int = 0, reference_model: nn.Module | None = None,
                   *, n_draws: int = 10, class_idx: int = 1, method: str = "gradcam",
                   occlusion_stride: int = 1) -> dict[str, Any]:
    """Attribution evidence on images ``x`` (e.g. legacy-scanner images, which carry the marker) as one JSON-able
    dict for the audit report (``context["image_evidence"]``): ``n_images``, ``method`` (one of
    :data:`ATTRIBUTION_METHODS`), ``layer`` (the CAM's; for occlusion the window), ``cam_resolution`` [h, w] (the
    grid the map resolves: the layer's, or the input's for occlusion), ``grow`` (default: the layer's stride, input
    size // CAM size; 0 for occlusion), ``region_area_share`` (the grown marker region's share of the image),
    ``region_share_mean`` / ``_median`` (of the attribution; ``n_zero_maps`` all-zero maps left out), the
    randomisation Spearman correlation (``randomisation_pairs``: the image x draw pairs it rests on), the deletion
    AUCs (attribution vs random order) and curves (``occlusion_stride``: windows every that many pixels, for large
    images or slow networks), ``passes_randomisation`` (median correlation <= :data:`RANDOMISATION_PASS`) and
    ``passes_deletion`` (map order below random order); with ``reference_model`` (e.g. the model before
    mitigation) the same numbers for it under ``reference``, so the report shows before and after.
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution method {method!r}: one of {ATTRIBUTION_METHODS}")
    x = _as_images(x)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != x.shape[2:]:
        raise ValueError(f"mask is {mask.shape}, images are {x.shape[2:]}")
    if method == "occlusion":
        res = (int(x.shape[2]), int(x.shape[3]))
        label = f"occlusion {occlusion_window(x.shape[3])} px" + (
            f", stride {occlusion_stride}" if occlusion_stride > 1 else "")
        grow = 0 if grow is None else grow
    else:
        layer = layer or _default_layer(getattr(model, "_module", model))
        res = cam_resolution(model, layer, x.shape[2:], x.shape[1])
        if min(res) < 2:
            raise ValueError(f"{layer!r} is {res[0]}x{res[1]} at {x.shape[2]}x{x.shape[3]} px: no spatial "
                             "information; render larger images (SmallCNN's block4 is 2x2 at 32 px)")
        label = layer
        if grow is None:
            grow = max(0, min(x.shape[2] // res[0], x.shape[3] // res[1]))
    out: dict[str, Any] = {
        "n_images": int(len(x)),
        "method": method,
        "layer": label,
        "input_size": [int(x.shape[2]), int(x.shape[3])],
        "cam_resolution": [int(res[0]), int(res[1])],
        "grow": int(grow),
        "class_idx": int(class_idx),
        "seed": int(seed),
        "region_area_share": area_share(mask, grow),
        **_evidence_one(model, x, mask, layer, grow, seed, n_draws, class_idx, method, occlusion_stride),
    }
    if reference_model is not None:
        out["reference"] = _evidence_one(reference_model, x, mask, layer, grow, seed, n_draws, class_idx, method,
                                         occlusion_stride)
    return out
