"""Self-supervised pretext tasks: train an equifed network's encoder on unlabelled grey images.

Why: a hospital has far more scans than labelled scans, and DP-SGD learns slowly from few labels. A pretext
phase on the unlabelled images gives the encoder useful features first; the label phase then starts from them
(`encoder_state` gives weights that `build_model(...).load_state_dict(..., strict=True)` takes).

Three tasks (`PRETEXT_TASKS`):

* "rotation": every image is turned by k x 90 degrees, k drawn per image; a linear head on the encoder's pooled
  features predicts k (4 classes, cross-entropy). Scans have a canonical orientation, so the encoder has to
  notice anatomy-like structure to solve it.
* "inpainting": a quarter of an 8 x 8 grid of square patches is set to the image's own mean; a small decoder from
  the encoder's last feature map rebuilds the image (16 x 16, upsampled to the input size) and the loss is the
  mean squared error on the hidden pixels only, so copying the visible pixels earns nothing.
* "contrastive": SimCLR (Chen et al. 2020). Two randomly augmented views of each image (crop and zoom, a small
  turn, a mirror, exposure and gamma, noise); a small projection head on the pooled features and the NT-Xent
  loss pull an image's two views together and push them from every other view of the batch. Its loss couples
  the images of a batch, so it has no per-sample gradient: each task's `per_sample` says so, the run config
  refuses it with dp = true and `pretext_loss` refuses it on an Opacus-wrapped model.

DP-SGD (Opacus, per-sample clipping) needs every sample's loss to depend on that sample alone. So for rotation
and inpainting the corruption happens inside `PretextModel.forward`, per image, from the draws of a
`torch.Generator` the caller passes (tests seed it; a DP run passes one seeded from OS entropy, like the DP
noise), a hidden patch is filled with that image's own mean (not the batch's), every loss is reduced over one
sample's pixels and then averaged over the batch, and the heads use only per-sample layers (Linear, Conv2d,
GroupNorm; no BatchNorm).

The network's own classification head is not part of the pretext graph: `PretextModel` freezes it (it would get
no per-sample gradient, which Opacus' optimizer refuses) and `encoder_state` returns it as it was.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core_models.devices import resolve_device
from core_models.networks import SmallCNN, input_channels
from core_models.pretrained import head_of
from core_models.training import LossFn, local_optimizer, make_loader, train_steps


class PretextOutput(NamedTuple):
    """What a pretext loss needs from one forward pass."""

    # rotation: (B, 4) logits; inpainting: (B, C, H, W) reconstruction; contrastive: (2B, d) unit projections
    prediction: torch.Tensor
    # rotation: (B,) each image's k; inpainting: (B, C, H, W) the uncorrupted images; contrastive: (2B,) each
    # view's partner
    target: torch.Tensor
    mask: torch.Tensor | None  # inpainting: (B, 1, H, W), 1.0 on hidden pixels; otherwise None


# --- the encoder: everything `embed` uses -------------------------------------------------------------------


def _resnet_parts(network: nn.Module) -> tuple[list[nn.Module], nn.Module] | None:
    """(modules before the ResNet, the MONAI ResNet) for `build_model("resnet")`'s layout, else None.

    Duck-typed (conv1 ... layer4, avgpool) so that recognising it does not import MONAI."""
    if isinstance(network, nn.Sequential) and len(network) >= 1:
        last = network[-1]
        if all(hasattr(last, name) for name in ("conv1", "bn1", "act", "layer4", "avgpool", "fc")):
            return list(network)[:-1], last
    return None


def feature_map(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's last feature map (B, C, h, w), before global pooling.

    SmallCNN: `network.features(x)`. MONAI ResNet (`build_model("resnet")`): its forward up to `layer4`."""
    if isinstance(network, SmallCNN):
        return network.features(x)
    parts = _resnet_parts(network)
    if parts is None:
        raise TypeError(f"no pretext encoder for {type(network).__name__}: expected SmallCNN or build_model('resnet')")
    before, resnet = parts
    for module in before:
        x = module(x)
    x = resnet.act(resnet.bn1(resnet.conv1(x)))
    if not resnet.no_max_pool:
        x = resnet.maxpool(x)
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))


def pool_features(network: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """The penultimate features from `feature_map`'s output: what the network's head sees (SmallCNN: `embed`)."""
    if isinstance(network, SmallCNN):
        return torch.flatten(network.pool(fmap), 1)
    parts = _resnet_parts(network)
    if parts is None:
        raise TypeError(f"no pretext encoder for {type(network).__name__}")
    return torch.flatten(parts[1].avgpool(fmap), 1)


def embed(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features of any supported network (equals `SmallCNN.embed`)."""
    return pool_features(network, feature_map(network, x))


# --- corruptions (all randomness from the caller's generator) -----------------------------------------------


def _draw_device(generator: torch.Generator) -> torch.device:
    """Draws are made where the generator lives (a CPU generator serves CUDA batches too), then moved."""
    return generator.device


def rotate(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of `x` (B, C, S, S) turned by k x 90 degrees, k drawn per image; returns (rotated, k)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    k = torch.randint(0, 4, (x.shape[0],), generator=generator, device=_draw_device(generator)).to(x.device)
    turned = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])  # (4, B, C, S, S)
    return turned[k, torch.arange(x.shape[0], device=x.device)], k


def mask_patches(x: torch.Tensor, generator: torch.Generator, grid: int = 8,
                 fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide `fraction` of a `grid` x `grid` split of each image, chosen per image, under that image's mean.

    Returns (masked images, mask), mask (B, 1, H, W) 1.0 on hidden pixels. Exactly round(fraction x grid^2)
    cells per image; at sizes not divisible by `grid` the cells differ by a pixel (nearest-neighbour split)."""
    b, _, h, w = x.shape
    if min(h, w) < grid:
        raise ValueError(f"images of {h}x{w} px are smaller than the {grid}x{grid} patch grid")
    cells = grid * grid
    hidden = min(cells, max(1, round(fraction * cells)))
    scores = torch.rand(b, cells, generator=generator, device=_draw_device(generator))
    chosen = scores.argsort(dim=1)[:, :hidden]
    cell_mask = torch.zeros_like(scores).scatter_(1, chosen, 1.0).view(b, 1, grid, grid).to(x.device, x.dtype)
    mask = F.interpolate(cell_mask, size=(h, w), mode="nearest")
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # this image's mean only: no other sample leaks in
    return x * (1 - mask) + mean * mask, mask


# --- the tasks ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationTask:
    """Predict which of 4 rotations each image got, from the pooled features."""

    name: str = "rotation"
    classes: int = 4
    per_sample: ClassVar[bool] = True  # each image's loss depends on that image alone (DP-SGD can train it)

    def make_head(self, channels: int, image_channels: int = 1) -> nn.Module:
        return nn.Linear(channels, self.classes)

    def corrupt(self, x: torch.Tensor, generator: torch.Generator):
        rotated, k = rotate(x, generator)
        return rotated, k, None

    def predict(self, head: nn.Module, fmap: torch.Tensor, pooled: torch.Tensor, size) -> torch.Tensor:
        return head(pooled)

    def per_sample_loss(self, output: PretextOutput) -> torch.Tensor:
        return F.cross_entropy(output.prediction, output.target, reduction="none")


@dataclass(frozen=True)
class InpaintingTask:
    """Rebuild hidden patches from the encoder's last feature map; MSE on the hidden pixels only."""

    name: str = "inpainting"
    per_sample: ClassVar[bool] = True
    grid: int = 8
    fraction: float = 0.25
    decoder_size: int = 16  # the decoder's output resolution, upsampled (bilinear) to the input size

    def make_head(self, channels: int, image_channels: int = 1) -> nn.Module:
        """A light decoder: the feature map (1x1 at 28 px, 2x2 at 32, 4x4 at 64) resampled to 4x4, then
        (upsample x2, conv 3x3, GroupNorm, ReLU) up to `decoder_size`, and one output channel per image channel
        (`image_channels`: 3 rebuilds an RGB image's colours).

        Per-sample layers only (GroupNorm, not BatchNorm), so Opacus computes its per-sample gradients."""
        steps = int(round(math.log2(self.decoder_size / 4)))
        if steps < 0 or 4 * 2**steps != self.decoder_size:
            raise ValueError(f"decoder_size must be 4 x a power of two, got {self.decoder_size}")
        width = 32
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(4), nn.Conv2d(channels, width, kernel_size=1),
                                   nn.GroupNorm(8, width), nn.ReLU()]
        for _ in range(steps):
            narrower = max(8, width // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, narrower, 3, padding=1),
                       nn.GroupNorm(8, narrower), nn.ReLU()]
            width = narrower
        layers.append(nn.Conv2d(width, image_channels, kernel_size=3, padding=1))
        return nn.Sequential(*layers)

    def corrupt(self, x: torch.Tensor, generator: torch.Generator):
        masked, mask = mask_patches(x, generator, self.grid, self.fraction)
        return masked, x, mask

    def predict(self, head: nn.Module, fmap: torch.Tensor, pooled: torch.Tensor, size) -> torch.Tensor:
        low = head(fmap)
        if tuple(low.shape[-2:]) == tuple(size):
            return low
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)

    def per_sample_loss(self, output: PretextOutput) -> torch.Tensor:
        if output.mask is None:
            raise ValueError("the inpainting loss needs the mask of hidden pixels")
        squared = (output.prediction - output.target) ** 2 * output.mask
        hidden = output.mask.sum(dim=(1, 2, 3))
        if output.prediction.shape[1] > 1:  # an RGB image: the mean over the hidden pixels' channels too
            hidden = hidden * output.prediction.shape[1]
        return squared.sum(dim=(1, 2, 3)) / hidden.clamp_min(1.0)


def augment(x: torch.Tensor, generator: torch.Generator, zoom: tuple[float, float] = (0.75, 1.0),
            turn: float = 0.2, shift: float = 0.12, exposure: tuple[float, float] = (0.7, 1.3),
            gamma: tuple[float, float] = (0.7, 1.4), noise: float = 0.06) -> torch.Tensor:
    """One random view of each square image of `x` (B, C, S, S) in [0, 1], every parameter drawn per image.

    A crop-and-zoom by `zoom` (share of the side kept), a turn of up to `turn` radians, a shift of up to `shift`
    of the half-width, a left-right mirror half the time (findings occur on either side), then gamma and exposure
    (scanners differ in both) and Gaussian noise of a drawn std up to `noise`. Values are clipped to [0, 1]
    before gamma; exposure and noise may then leave that range a little, as a scanner's would."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"augment needs a batch of square images (B, C, S, S), got {tuple(x.shape)}")
    if not (0 < zoom[0] <= zoom[1] <= 1 and 0 < gamma[0] <= gamma[1] and 0 < exposure[0] <= exposure[1]
            and turn >= 0 and shift >= 0 and noise >= 0):
        raise ValueError(f"augment's ranges must be low <= high, zoom within (0, 1], gamma and exposure above 0, "
                         f"turn, shift and noise >= 0: zoom {zoom}, gamma {gamma}, exposure {exposure}, turn {turn}, "
                         f"shift {shift}, noise {noise}")
    b, device = x.shape[0], _draw_device(generator)
    if b == 0:  # an empty Poisson draw
        return x.clone()

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(b, generator=generator, device=device)).to(x.device, x.dtype)

    scale, angle = uniform(*zoom), uniform(-turn, turn)
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    mirror = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0).to(x.dtype)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * mirror, -sin, tx], 1), torch.stack([sin * mirror, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, padding_mode="border", align_corners=False).clamp(0.0, 1.0)
    view = view ** uniform(*gamma).view(b, 1, 1, 1) * uniform(*exposure).view(b, 1, 1, 1)
    std = uniform(0.0, noise).view(b, 1, 1, 1)
    return view + std * torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)


@dataclass(frozen=True)
class ContrastiveTask:
    """SimCLR: tell each image's second view apart from every other view of the batch (NT-Xent).

    The other images of the batch are the negatives, so the run's `batch-size` sets how hard the task is (the
    benchmarks use 64; a batch of one image has no negative and a loss of 0)."""

    name: str = "contrastive"
    per_sample: ClassVar[bool] = False  # one image's loss depends on the whole batch: no DP-SGD
    temperature: float = 0.2
    projection: int = 64

    def make_head(self, channels: int, image_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Linear(channels, 128), nn.ReLU(), nn.Linear(128, self.projection))

    def corrupt(self, x: torch.Tensor, generator: torch.Generator):
        """Both views of every image, stacked (2B, ...): view 1 of image i at i, view 2 at B + i; the target is
        each row's partner."""
        b = x.shape[0]
        partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(x.device)
        return torch.cat([augment(x, generator), augment(x, generator)]), partner, None

    def predict(self, head: nn.Module, fmap: torch.Tensor, pooled: torch.Tensor, size) -> torch.Tensor:
        return F.normalize(head(pooled), dim=1)

    def per_sample_loss(self, output: PretextOutput) -> torch.Tensor:
        """Each image's NT-Xent loss (the mean over its two views), (B,); a view is never its own negative.

        One value per image, but each depends on every view of the batch: not a per-sample loss for DP-SGD."""
        z = output.prediction
        similarity = z @ z.T / self.temperature
        similarity = similarity.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
        per_view = F.cross_entropy(similarity, output.target, reduction="none")
        b = len(z) // 2
        return (per_view[:b] + per_view[b:]) / 2


PretextTask = RotationTask | InpaintingTask | ContrastiveTask
PRETEXT_TASKS: dict[str, PretextTask] = {"rotation": RotationTask(), "inpainting": InpaintingTask(),
                                         "contrastive": ContrastiveTask()}


def get_task(task: str | PretextTask) -> PretextTask:
    if isinstance(task, (RotationTask, InpaintingTask, ContrastiveTask)):
        return task
    if task not in PRETEXT_TASKS:
        raise ValueError(f"unknown pretext task {task!r}; choose one of {sorted(PRETEXT_TASKS)}")
    return PRETEXT_TASKS[task]


# --- the model, its loss and a plain training loop ----------------------------------------------------------


class PretextModel(nn.Module):
    """An equifed network's encoder (everything `embed` uses) with a pretext head.

    `forward(x, generator)` corrupts the batch per image (from `generator`), encodes it and returns a
    `PretextOutput`. The network is held, not copied: pretext training updates its encoder weights in place.
    The network's classification head is frozen here (it takes no part); unfreeze it for the label phase
    (`pretrained.freeze(network, "none")`) or load `encoder_state` into a fresh `build_model`."""

    def __init__(self, network: nn.Module, task: str | PretextTask = "rotation") -> None:
        super().__init__()
        self.task = get_task(task)
        self.network = network
        classifier = head_of(network)
        for p in classifier.parameters():
            p.requires_grad_(False)
        self.head = self.task.make_head(classifier.in_features, input_channels(network))

    @property
    def stem(self) -> nn.Module | None:
        """The network's stem, so that `prepare_for_dp(pretext_model)` freezes it as for the network itself."""
        return getattr(self.network, "stem", None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's penultimate features of uncorrupted images."""
        return embed(self.network, x)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> PretextOutput:
        inputs, target, mask = self.task.corrupt(x, generator)
        fmap = feature_map(self.network, inputs)
        pooled = pool_features(self.network, fmap)
        return PretextOutput(self.task.predict(self.head, fmap, pooled, tuple(x.shape[-2:])), target, mask)


def _unwrap(model: nn.Module) -> nn.Module:
    """The PretextModel inside an Opacus GradSampleModule (its `_module`), or `model` itself."""
    inner = model._modules.get("_module")
    return inner if isinstance(inner, PretextModel) else model


def per_sample_losses(task: str | PretextTask, output: PretextOutput) -> torch.Tensor:
    """One loss per image (B,); for the per-sample tasks each is reduced over that image's own pixels / logits only."""
    return get_task(task).per_sample_loss(output)


def pretext_loss(task: str | PretextTask, model: nn.Module, x: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """The batch's pretext loss: the mean of the per-image losses (Opacus' loss_reduction="mean").

    `model` is a PretextModel for `task`, or the GradSampleModule Opacus wraps it in; a task without per-sample
    losses is refused there, since per-sample clipping would not bound one image's influence. An empty batch (a
    Poisson draw that took nobody) gives 0, still connected to the graph so that a DP step (noise only) can
    follow."""
    task = get_task(task)
    inner = _unwrap(model)
    if isinstance(inner, PretextModel) and inner.task.name != task.name:
        raise ValueError(f"the model was built for the {inner.task.name!r} task, not {task.name!r}")
    wrapped = "_module" in model._modules  # Opacus' GradSampleModule (or any wrapper around the model)
    if wrapped and not (task.per_sample and getattr(inner, "task", task).per_sample):
        raise ValueError(f"the {task.name!r} pretext task compares each image with the rest of its batch: it has no "
                         "per-sample gradient and cannot be trained under DP-SGD")
    output = model(x, generator)
    if x.shape[0] == 0:
        return output.prediction.sum() * 0.0
    return task.per_sample_loss(output).mean()


def pretext_loss_fn(task: str | PretextTask, generator: torch.Generator) -> LossFn:
    """`pretext_loss` as `training.train_steps`' `loss_fn`: the one training loop, plain or, for the per-sample
    tasks, under DP-SGD (there `forward` is Opacus' GradSampleModule and the batches a BatchMemoryManager's
    chunks); labels are ignored."""
    task = get_task(task)
    return lambda forward, x, y, *_meta: pretext_loss(task, forward, x, generator)


def train_pretext(model: PretextModel, images: np.ndarray, task: str | PretextTask, epochs: int = 5,
                  batch_size: int = 32, lr: float = 1e-3, device: torch.device | None = None,
                  generator: torch.Generator | None = None, optimizer: str = "adam") -> dict:
    """Train `model` (in place, no DP) on unlabelled `images` (N, 1, H, W) in [0, 1].

    `generator` gives the corruptions and the shuffling order (default: seeded from the OS). Returns the mean
    loss of the first and the last epoch, every epoch's mean and the optimizer step count."""
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    if get_task(task).name != model.task.name:
        raise ValueError(f"the model was built for the {model.task.name!r} task, not {get_task(task).name!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    device = device or resolve_device()
    model.to(device).train()
    opt, counter = local_optimizer(model, optimizer, lr, weight_decay=0.0, proximal_mu=0.0)
    shuffle_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_draw_device(generator)))
    loader = make_loader(images, np.zeros(len(images), dtype=np.int64), batch_size=batch_size, shuffle=True,
                         seed=shuffle_seed)
    epoch_losses = []
    for _ in range(epochs):
        loss, n = train_steps(model, loader, opt, device, loss_fn=pretext_loss_fn(task, generator))
        epoch_losses.append(loss / max(n, 1))
    return {"loss_first": epoch_losses[0], "loss_last": epoch_losses[-1], "epoch_losses": epoch_losses,
            "steps": float(counter.steps)}


def encoder_state(pretext_model: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped network's state_dict (its classification head as it was), detached copies.

    Keys are the plain network's, so `build_model(name, num_classes).load_state_dict(state, strict=True)`
    takes it when the head's shape matches (same `num_classes`; else drop the head's keys and load non-strict).
    Accepts the PretextModel or Opacus' GradSampleModule around it."""
    inner = _unwrap(pretext_model)
    if not isinstance(inner, PretextModel):
        raise TypeError(f"expected a PretextModel, got {type(pretext_model).__name__}")
    return {k: v.detach().clone() for k, v in inner.network.state_dict().items()}
