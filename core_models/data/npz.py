"""MedMNIST ``.npz`` splits (benchmark downloads, not a hospital's input) to image and label arrays, shapes
checked from the .npy headers before any array is read.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from core_models.data.limits import ImageLimits, _limits
from core_models.data.pixels import _check_channels, _grey_from_channels


def _npz_header(z, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an .npz member from its .npy header alone: what np.load would allocate, before it does
    (a compressed member can inflate to any size its header claims)."""
    from numpy.lib import format as npy_format

    with z.zip.open(f"{key}.npy") as m:
        version = npy_format.read_magic(m)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(m)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(m)
        else:
            shape, _, dtype = npy_format._read_array_header(m, version)
    return tuple(int(v) for v in shape), np.dtype(dtype)


def load_npz(path, split: str = "train", limits: ImageLimits | None = None,
             channels: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a MedMNIST .npz -> images (N, 1, H, W) float32 in [0, 1] and labels (N,) int64.

    ``channels``: 1 (grey; colour images are refused), 3 (RGB (N, 3, H, W): colour kept, grey replicated to three
    channels) or None (as stored: colour images as (N, 3, H, W), grey ones, or RGB ones whose channels agree,
    as (N, 1, H, W)). A fourth (alpha) channel is dropped.

    Shapes and dtypes are checked from the .npy headers before any array is read: one image (H x W x channels) must
    be within limits.max_pixels and there must be one label per image. The number of images is not capped (real
    MedMNIST splits reach several GB); npz files are benchmark downloads, not a hospital's manifest inputs.
    """
    path = Path(path)
    limits = _limits(limits)
    if channels is not None:
        channels = _check_channels(channels)
    with np.load(path, allow_pickle=False) as z:
        keys = sorted(z.files)
        ik, lk = f"{split}_images", f"{split}_labels"
        missing = [k for k in (ik, lk) if k not in z.files]
        if missing:
            raise ValueError(f"{path}: split {split!r} not available (missing {', '.join(missing)}); "
                             f"keys present: {', '.join(keys)}")
        try:
            (xs, xd), (ys, _) = _npz_header(z, ik), _npz_header(z, lk)
        except Exception as e:  # KeyError: not an .npy member; ValueError: a broken header
            raise ValueError(f"{path}: unreadable array header in split {split!r} ({type(e).__name__}: {e})") from e
        if xd.kind not in "uif" or len(xs) not in (3, 4):
            raise ValueError(f"{path}: {ik} has shape {xs} and dtype {xd}; expected (N, H, W[, C]) numbers")
        if math.prod(xs[1:]) > limits.max_pixels:
            raise ValueError(f"{path}: {ik} images too large: {' x '.join(map(str, xs[1:]))} pixel values each "
                             f"(limit {limits.max_pixels:,})")
        if not ys or ys[0] != xs[0]:
            raise ValueError(f"{path}: {xs[0]} images but labels of shape {ys} in split {split!r}")
        x, y = z[ik], z[lk]
    if x.dtype == np.uint8 or x.dtype == np.uint16:
        top = float(np.iinfo(x.dtype).max)
    elif x.dtype.kind == "f":
        top = 1.0
    else:
        raise ValueError(f"{path}: {ik} has dtype {x.dtype}; expected uint8, uint16 or float in [0, 1]")
    colour = False
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 4 and x.shape[-1] in (3, 4):
        grey = None if channels == 3 else _grey_from_channels(x, top)
        if grey is not None:
            x = grey
        elif channels == 1:
            raise ValueError(f"{path}: {ik} are colour images, expected grayscale (load them with channels=3; "
                             f"train with run config in-channels=3)")
        else:
            x, colour = x[..., :3], True
    if x.ndim != (4 if colour else 3):
        raise ValueError(f"{path}: {ik} has shape {x.shape}, expected (N, H, W) 2-D grayscale images"
                         f"{' or (N, H, W, 3) colour ones' if channels != 1 else ''}")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{path}: {lk} has shape {y.shape}; multi-label targets are not supported")
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels in split {split!r}")
    if not np.all(np.asarray(y, dtype=np.float64) == np.rint(np.asarray(y, dtype=np.float64))):
        raise ValueError(f"{path}: {lk} are not integers")
    images = np.clip(x.astype(np.float32) / np.float32(top), 0.0, 1.0)
    if colour:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), y.astype(np.int64)
    if channels == 3:
        return np.ascontiguousarray(np.repeat(images[:, None], 3, axis=1)), y.astype(np.int64)
    return np.ascontiguousarray(images[:, None]), y.astype(np.int64)
