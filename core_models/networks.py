"""Networks for 1-channel (grey) or 3-channel (RGB: dermoscopy, fundus, pathology) medical images that Opacus can
train; `in_channels` (run config in-channels) is the input's channel count, 1 by default. `dims=3` builds the
same networks for volumes (CT, MRI: float32 tensors (N, C, D, H, W)); the scattering networks are 2-D only.

Both use GroupNorm (never BatchNorm): BatchNorm mixes samples inside a batch, so
per-sample gradients (DP-SGD) are undefined for it.

DP-SGD cost (benchmarks/bench_dp.py, benchmarks/RESULTS.md): Opacus computes one
weight gradient per sample for every trainable layer, and the cost of a conv layer's
per-sample gradients grows with its output resolution. `SmallCNN` therefore reaches
half resolution with a strided stem convolution rather than convolving (and max-pooling)
at full resolution, and `prepare_for_dp` trims what DP-SGD has to do per sample.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from core_models.config import TrainingConfig

MODEL_NAMES = TrainingConfig.MODELS


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class Standardize(nn.Module):
    """Fixed input scaling: images arrive in [0, 1]; centring them speeds up the first epochs."""

    def __init__(self, mean: float = 0.4, std: float = 0.2) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _ConvInputGradOnly(torch.autograd.Function):
    """A convolution (2-D or 3-D) whose backward computes only the input gradient.

    Under Opacus' hooks the weight and bias gradients come per sample from the grad sampler;
    the summed ones autograd would also compute are overwritten by the DP optimizer unused.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        conv = F.conv3d if weight.dim() == 5 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = None
        if ctx.needs_input_grad[0]:
            x, weight = ctx.saved_tensors
            stride, padding, dilation, groups = ctx.conf
            grad_in = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, dilation, False, [0] * (weight.dim() - 2), groups,
                [True, False, False],
            )[0]
        return grad_in, None, None, None, None, None, None


def _per_sample_hooks_attached(module: nn.Module) -> bool:
    """True when an enabled Opacus hooks-mode GradSampleModule computes `module`'s per-sample gradients
    from its activations and backprops (not functorch, not ghost clipping, which needs autograd's grads)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks  # here: only DP training gets this far
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

    for hook in module._forward_hooks.values():
        owner = getattr(hook, "__self__", None)
        if (
            isinstance(owner, GradSampleHooks)
            and not isinstance(owner, GradSampleHooksFastGradientClipping)
            and not owner.force_functorch
            and owner.hooks_enabled
        ):
            return True
    return False


class DPConv:
    """The DP-SGD speed-ups of `DPConv2d` and `DPConv3d` (`nn.Conv2d` / `nn.Conv3d`: same parameters, same
    state_dict).

    * Their per-sample weight gradients (Opacus hooks mode) come from one grouped
      convolution-backward over the batch when the channel counts suit the CPU kernels,
      rather than Opacus' unfold + einsum (2-D: 1.2-1.6x faster per layer on this CPU; 3-D: see
      benchmarks/bench_volume.py).
    * With `skip_summed_grads` (set by `prepare_for_dp`) their backward computes only the
      input gradient: Opacus discards the summed weight/bias gradients anyway. This is only
      valid while an Opacus hooks-mode GradSampleModule wraps the model, so the forward
      raises otherwise (a plain optimizer would silently never update the layer).
    """

    skip_summed_grads: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_summed_grads and torch.is_grad_enabled() and self.weight.requires_grad:
            if not _per_sample_hooks_attached(self):
                raise RuntimeError(
                    f"{type(self).__name__}.skip_summed_grads is set but no Opacus grad_sample_mode='hooks' module "
                    "wraps this layer: train it through PrivacyEngine.make_private(..., grad_sample_mode='hooks') or "
                    "call prepare_for_dp(model, skip_summed_grads=False)"
                )
            if self.padding_mode == "zeros" and not isinstance(self.padding, str):
                return _ConvInputGradOnly.apply(
                    x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
                )
        return super().forward(x)


class DPConv2d(DPConv, nn.Conv2d):
    """`nn.Conv2d` with the DP-SGD speed-ups of `DPConv`."""


class DPConv3d(DPConv, nn.Conv3d):
    """`nn.Conv3d` with the DP-SGD speed-ups of `DPConv`."""


SPATIAL_DIMS = (2, 3)  # images, volumes
# per spatial dims: the convolution, the max-pool and the global pool SmallCNN is built of
_LAYERS = {2: (DPConv2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d), 3: (DPConv3d, nn.MaxPool3d, nn.AdaptiveMaxPool3d)}


class SmallCNN(nn.Module):
    """A strided stem and three conv blocks, then a global-max-pooled linear head.

    The stem convolves with stride 2 (`stem_stride=1`: the earlier layout, a stride-1
    convolution and a 2x2 max-pool at full resolution, four times the stem's cost and,
    under DP-SGD, of its per-sample gradients; same parameters, same accuracy).
    Global pooling makes it work for any input size from 28 to 224 px; max rather than
    average pooling because a finding is small and local (a lesion anywhere => positive).
    `dims=3`: the same layers in 3-D (kernels 3x3x3, pools 2x2x2) for volumes from 16^3 voxels.
    """

    def __init__(self, num_classes: int = 2, width: int = 16, stem_stride: int = 2, in_channels: int = 1,
                 dims: int = 2) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if dims not in _LAYERS:
            raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
        conv, max_pool, global_pool = _LAYERS[dims]
        self.in_channels, self.dims = int(in_channels), int(dims)
        stem: list[nn.Module] = [
            conv(in_channels, width, kernel_size=3, stride=stem_stride, padding=1),
            _group_norm(width),
            nn.ReLU(),
        ]
        if stem_stride == 1:
            stem.append(max_pool(2))
        blocks: list[tuple[str, nn.Module]] = [("standardize", Standardize()), ("stem", nn.Sequential(*stem))]
        in_ch = width
        for i, out_ch in enumerate((width * 2, width * 4, width * 4), start=2):
            blocks.append((f"block{i}", nn.Sequential(
                conv(in_ch, out_ch, kernel_size=3, padding=1),
                _group_norm(out_ch),
                nn.ReLU(),
                max_pool(2),
            )))
            in_ch = out_ch
        self.features = nn.Sequential(OrderedDict(blocks))
        self.pool = global_pool(1)
        self.head = nn.Linear(in_ch, num_classes)

    @property
    def stem(self) -> nn.Module:
        """The first, highest-resolution block (what `prepare_for_dp` freezes)."""
        return self.features.stem

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (used by shift and fairness statistics)."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def prepare_for_dp(model: nn.Module, *, freeze_stem: bool = True, skip_summed_grads: bool = True) -> nn.Module:
    """Make `model` cheaper to train with Opacus DP-SGD in grad_sample_mode="hooks"; returns it.

    * `freeze_stem`: the stem (a `.stem` submodule, as in `SmallCNN`) keeps its current,
      e.g. the global model's, weights: no per-sample gradients at the highest resolution and
      no backward pass through it (0.3% of SmallCNN's parameters).
    * `skip_summed_grads`: `DPConv2d` / `DPConv3d` layers skip autograd's summed weight/bias gradients,
      which the DP optimizer overwrites with the clipped, noised per-sample sum.

    Call it before `PrivacyEngine.make_private` (the optimizer may hold frozen parameters:
    they get no gradient and are not updated). Undo with
    `prepare_for_dp(model, freeze_stem=False, skip_summed_grads=False)` (which unfreezes the stem).
    """
    import core_models.grad_samplers  # noqa: F401  (registers DPConv's per-sample gradients with Opacus)

    stem = getattr(model, "stem", None)
    if isinstance(stem, nn.Module):
        for p in stem.parameters():
            p.requires_grad_(not freeze_stem)
    for module in model.modules():
        if isinstance(module, DPConv):
            module.skip_summed_grads = skip_summed_grads
    return model


class CoefficientCache:
    """Scattering coefficients of images seen before, for every ScatterNet in the process (the transform is fixed,
    so they do not depend on the network's weights). A site trains on the same images every epoch and every round,
    with a fresh network each round, and the transform is ~85 % of a training step at 64 px on CPU. Holds at most
    ``max_bytes`` (per process); beyond that nothing more is kept, so a site larger than that is served its first
    images from the cache every epoch instead of none (an LRU would evict all of them in a cyclic pass)."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._store: dict[bytes, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, keys: list[bytes]) -> list[torch.Tensor | None]:
        with self._lock:
            return [self._store.get(k) for k in keys]

    def put(self, keys: list[bytes], coefficients: torch.Tensor) -> None:
        with self._lock:
            for k, coef in zip(keys, coefficients):
                if k not in self._store and self.bytes + coef.nbytes <= self.max_bytes:
                    self._store[k] = coef.clone()
                    self.bytes += coef.nbytes

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._store)


SCATTER_CACHE = CoefficientCache()
# kymatio's filter banks by (input size, device), shared by every ScatterNet of the process: the transform is fixed,
# and building one takes longer than a site's round on a few hundred cached images
_FILTER_BANKS: dict = {}


class ScatterNet(nn.Module):
    """Fixed wavelet scattering features (kymatio's Scattering2D, J=2, 8 angles: 81 channels at a quarter of the
    resolution), GroupNorm, two small convolutions and a linear head.

    Why: the scattering transform is fixed (no parameters, no privacy cost), and DP-SGD learns far better on such
    features than end to end (Tramer & Boneh, 2021: ScatterNet + a small CNN or a linear model beat end-to-end
    CNNs under DP). The transform is kept outside the module tree, so its filter banks are neither in the state dict
    nor sent; one is built per input size (a multiple of 4) and device on first use, for every ScatterNet of the
    process. On CPU the coefficients of images seen before come from :data:`SCATTER_CACHE`.
    `freeze=encoder` leaves a linear model on the (normalised, pooled) features. An RGB input (`in_channels=3`) is
    scattered channel by channel: 3 x 81 coefficient maps, normalised in groups of 9 as the grey ones are."""

    def __init__(self, num_classes: int = 2, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        self._transforms: dict = _FILTER_BANKS
        self.in_channels = int(in_channels)
        coefficients = 81 * self.in_channels
        self.norm = nn.GroupNorm(coefficients // 9, coefficients)
        self.features = nn.Sequential(
            DPConv2d(coefficients, width, kernel_size=3, padding=1), _group_norm(width), nn.ReLU(), nn.MaxPool2d(2),
            DPConv2d(width, 2 * width, kernel_size=3, padding=1), _group_norm(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def _transform(self, x: torch.Tensor):
        key = (tuple(x.shape[-2:]), x.device)
        transform = self._transforms.get(key)
        if transform is None:
            from kymatio.torch import Scattering2D  # here: only this network needs it

            if x.shape[-1] % 4 or x.shape[-2] % 4:
                raise ValueError(f"ScatterNet needs image sides divisible by 4, got {tuple(x.shape[-2:])}")
            transform = self._transforms[key] = Scattering2D(J=2, shape=tuple(x.shape[-2:]), L=8).to(x.device)
        return transform

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C x 81, H/4, W/4) scattering coefficients (no gradient to the input); on CPU,
        images seen before are served from the cache (keyed by their bytes: the transform is deterministic). Only
        training adds to it: evaluation and attribution (occlusion's thousands of one-off variants) read it only."""
        transform = self._transform(x)
        x = x.detach().contiguous()
        if x.shape[0] == 0:  # DP-SGD's Poisson batches can be empty
            return x.new_zeros((0, 81 * x.shape[1], x.shape[-2] // 4, x.shape[-1] // 4))
        if x.device.type != "cpu":
            with torch.no_grad():
                return transform(x).flatten(1, 2)
        shape = repr(tuple(x.shape[1:])).encode()
        keys = [hashlib.blake2b(shape + row.numpy().tobytes(), digest_size=16).digest() for row in x]
        found = SCATTER_CACHE.get(keys)
        missing = [i for i, coef in enumerate(found) if coef is None]
        if missing:
            with torch.no_grad():
                computed = transform(x[missing]).flatten(1, 2)
            for i, coef in zip(missing, computed):
                found[i] = coef
            if self.training:
                SCATTER_CACHE.put([keys[i] for i in missing], computed)
        return torch.stack(found)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(self.norm(self.scatter(x)))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class OrderNorm(nn.Module):
    """Per-image standardisation of each block of scattering coefficients of one order and scale (order 0; order 1
    at j = 0; order 1 at j = 1; order 2, for J = 2, L = 8), per colour channel. No parameters and no data statistics,
    so no privacy cost. Why: order-0 coefficients are ~300x larger than order-2 ones, so under a shared norm a
    linear model sees almost only the low-pass image (BreastMNIST, logistic probe: AUROC 0.874 vs 0.815)."""

    BLOCKS = ((0, 1), (1, 9), (9, 17), (17, 81))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for c in range(0, x.shape[1], 81):
            for lo, hi in self.BLOCKS:
                block = x[:, c + lo:c + hi]
                mean = block.mean(dim=(1, 2, 3), keepdim=True)
                per_image = block.shape[1] * block.shape[2] * block.shape[3]
                std = block.std(dim=(1, 2, 3), keepdim=True) if per_image > 1 else torch.ones_like(mean)
                out.append((block - mean) / (std + 1e-6))
        return torch.cat(out, 1)


class ScatterLinear(ScatterNet):
    """Fixed scattering coefficients, OrderNorm and one linear layer on the 81 x 7 x 7 pooled coefficients per
    colour channel (Tramer & Boneh's ScatterNet + linear): the DP recipe for hospital-sized sites. Few trained
    parameters (7,940 for two classes) is what lets DP-SGD learn from ~200 patients (benchmarks/bench_real.py:
    BreastMNIST, 3 sites, epsilon 8, AUROC 0.83 where the CNN stays at the majority rate)."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, pool: int = 7) -> None:
        nn.Module.__init__(self)
        self._transforms: dict = _FILTER_BANKS
        self.in_channels = int(in_channels)
        self.norm = OrderNorm()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.head = nn.Linear(81 * self.in_channels * pool * pool, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.norm(self.scatter(x))), 1)


SCATTER_MODELS = ("scatter", "scatter-linear")  # 2-D only: kymatio's 2-D wavelet scattering


def build_model(name: str = "cnn", num_classes: int = 2, in_channels: int = 1, dims: int = 2) -> nn.Module:
    """Return a fresh, DP-compatible network producing `num_classes` logits from `in_channels`-channel images
    (1 grey, 3 RGB: run config in-channels), 2-D images (N, C, H, W) or, with `dims=3`, volumes (N, C, D, H, W).

    Binary tasks use two logits (softmax), so one loss and one metric path serve
    binary and multi-class heads alike.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer (1 grey, 3 RGB), got {in_channels!r}")
    if isinstance(dims, bool) or dims not in SPATIAL_DIMS:
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
    if dims == 3 and name in SCATTER_MODELS:
        raise ValueError(f"model {name!r} is 2-D only (wavelet scattering of images); for volumes (dims = 3) "
                         f"choose one of {[m for m in MODEL_NAMES if m not in SCATTER_MODELS]}")
    if name == "cnn":
        return SmallCNN(num_classes=num_classes, in_channels=in_channels, dims=dims)
    if name == "scatter":
        return ScatterNet(num_classes=num_classes, in_channels=in_channels)
    if name == "scatter-linear":
        return ScatterLinear(num_classes=num_classes, in_channels=in_channels)
    if name == "resnet":
        # MONAI's ResNet-10 layout, narrowed for CPU
        return _monai_resnet(num_classes, layers=[1, 1, 1, 1], widths=[16, 32, 64, 128], stem_kernel=3,
                             stem_stride=1, groups=8, bias_downsample=True, in_channels=in_channels, dims=dims)
    if name == "resnet18":
        # torchvision's ResNet-18 layout and parameter names (7x7 stride-2 stem, max-pool, [2, 2, 2, 2] basic
        # blocks of 64-512 channels, bias-free 1x1 shortcuts), so its public checkpoints map onto it
        # (pretrained-key-map "=1."); in 3-D, MedicalNet's ResNet-18 layout
        return _monai_resnet(num_classes, layers=[2, 2, 2, 2], widths=[64, 128, 256, 512], stem_kernel=7,
                             stem_stride=2, groups=32, bias_downsample=False, in_channels=in_channels, dims=dims)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")


def input_channels(model: nn.Module) -> int:
    """The number of image channels `model` takes (1 grey, 3 RGB): its `in_channels` (SmallCNN, ScatterNet), else
    its first convolution's (a MONAI ResNet); looks through a PretextModel, a LesionDetector and Opacus' wrapper."""
    for attr in ("_module", "network", "classifier"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return input_channels(inner)
    channels = getattr(model, "in_channels", None)
    if isinstance(channels, int):
        return channels
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 1


def input_dims(model: nn.Module) -> int:
    """2 when `model` takes images (N, C, H, W), 3 when it takes volumes (N, C, D, H, W): the spatial dims of its
    first convolution (2 for a network without one, e.g. ScatterLinear); looks through the same wrappers as
    `input_channels`."""
    for attr in ("_module", "network", "classifier"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return input_dims(inner)
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return len(first.kernel_size) if first is not None else 2


def with_detector(model: nn.Module, train) -> nn.Module:
    """The global model a training config names: ``model``, wrapped with its lesion detector when
    ``train.detection`` (imported here: MONAI's detection utilities cost every process seconds to import)."""
    if not getattr(train, "detection", False):
        return model
    from core_models.detection import LesionDetector
    return LesionDetector(model, train.image_size)


_OUT_OF_PLACE_RELU = ("relu", {"inplace": False})


@functools.cache
def _out_of_place_block() -> type:
    """MONAI's basic ResNetBlock (same layers, parameters and function) with its residual added and its ReLUs
    applied out of place. Under DP-SGD Opacus' full backward hooks wrap each layer's output, and MONAI's in-place
    `out += residual` and ReLU modify those outputs ("Output 0 of BackwardHookFunction is a view and is being
    modified inplace": torch 2.13, Opacus 1.6), so model = resnet could not train with dp = true."""
    from monai.networks.nets.resnet import ResNetBlock

    class OutOfPlaceResNetBlock(ResNetBlock):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "act": _OUT_OF_PLACE_RELU})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
            residual = x if self.downsample is None else self.downsample(x)
            return self.act(out + residual)

    # a module-level name (served by __getattr__ below), so that the module pickles: Opacus' ModuleValidator clones
    # the network through torch.save
    OutOfPlaceResNetBlock.__module__, OutOfPlaceResNetBlock.__qualname__ = __name__, "OutOfPlaceResNetBlock"
    return OutOfPlaceResNetBlock


def __getattr__(name: str):
    if name == "OutOfPlaceResNetBlock":  # built on first use: importing MONAI costs every process seconds
        return _out_of_place_block()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _monai_resnet(num_classes: int, *, layers: list[int], widths: list[int], stem_kernel: int, stem_stride: int,
                  groups: int, bias_downsample: bool, in_channels: int = 1, dims: int = 2) -> nn.Module:
    """A MONAI ResNet of basic blocks (one input channel, or `in_channels`; 2-D, or 3-D with `dims=3`) behind
    `Standardize`, with GroupNorm throughout: MONAI 1.6 applies `norm` only to the stem, so Opacus swaps the blocks'
    BatchNorm for GroupNorm (DP-SGD needs it); its blocks and ReLUs work out of place (`_out_of_place_block`:
    DP-SGD needs that too). In 3-D its convolutions are `DPConv3d` (same parameters, same state dict) and it names
    its stem (`VolumeResNet`): with Opacus' own unfold3d per-sample gradients a DP-SGD step was 2.3x a plain one at
    32^3, with `DPConv3d` 1.73x, with the stem frozen too 1.35x (benchmarks/bench_volume.py)."""
    from monai.networks.nets import ResNet  # here: importing MONAI costs every process seconds
    from opacus.validators import ModuleValidator  # and so does Opacus (the server never needs it)

    resnet = ResNet(block=_out_of_place_block(), layers=layers, block_inplanes=widths, spatial_dims=dims,
                    n_input_channels=in_channels, conv1_t_size=stem_kernel, conv1_t_stride=stem_stride,
                    no_max_pool=False, bias_downsample=bias_downsample, num_classes=num_classes,
                    norm=("group", {"num_groups": groups}), act=_OUT_OF_PLACE_RELU)
    resnet = ModuleValidator.fix(resnet)
    if dims == 2:
        return nn.Sequential(Standardize(), resnet)
    for module in resnet.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = DPConv3d  # a subclass adding no state: only the forward and the grad sampler
    return VolumeResNet(Standardize(), resnet)


class VolumeResNet(nn.Sequential):
    """`Standardize` then a 3-D MONAI ResNet (the same modules and state dict as the 2-D network's `nn.Sequential`),
    with a `stem`: its first convolution and norm, at the volume's full resolution. Under DP-SGD `prepare_for_dp`
    freezes it as it freezes SmallCNN's (under 0.1 % of the parameters; no per-sample gradients and no backward
    pass at full resolution), and `freeze=stem` keeps it fixed."""

    @property
    def stem(self) -> nn.Module:
        resnet = self[1]
        return nn.ModuleList([resnet.conv1, resnet.bn1])


def get_device() -> torch.device:
    """The "auto" device (core_models.devices.resolve_device): CUDA when present, else CPU."""
    from core_models.devices import resolve_device

    return resolve_device()
