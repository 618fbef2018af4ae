"""What a site's data folder may make us read, and the errors for what it may not.

A data folder may hold hostile or broken input (a symlink out of the folder, a FIFO, a DICOM header claiming
60000 x 60000 pixels, a PNG decompression bomb). Every file is opened non-blocking and checked to be a regular file
within :class:`ImageLimits` before it is read, and every reader checks image sizes from headers before decoding.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

MULTI_FRAME = ("reject", "first")  # ImageLimits.multi_frame values


class ManifestError(ValueError):
    """A whole-site problem: manifest missing, required columns missing, or no usable rows/images."""


class ImageError(ValueError):
    """One image cannot be used; load_site turns it into a Rejection and goes on."""


class DecoderMissing(ImageError):
    """No installed pydicom plugin decodes the image's transfer syntax: installing one fixes it without the file
    changing, so such a rejection is never cached."""


@dataclass(frozen=True)
class ImageLimits:
    """Caps on what one site's data folder can make us read, checked from headers before anything is decoded.

    max_pixels: pixel values in one image, Rows x Columns x frames x samples per pixel (colour channels count, so
        an RGB image of N pixels is 3N). Default 100 million (10000 x 10000 grey). The largest clinical images we
        take are mammograms (~4000 x 5000 = 20 M; tomosynthesis-sized detectors ~4100 x 5600 = 23 M) and
        radiographs (~4300 x 3500 = 15 M, 45 M as an RGB export); CT/MR slices are 512 x 512 = 0.26 M. So the
        default leaves 4x headroom over the largest real image, while the worst accepted image costs under 1 GB
        transiently (measured peak RSS growth: 0.6 GB for a 10000 x 10000 16-bit DICOM, 0.9 GB for a 5773 x 5773
        RGB PNG), which a site workstation survives.
        Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is set to this while we decode and
        its warning is an error.
    max_file_bytes: bytes of one image file, checked (fstat) before it is read. Default 512 MiB: an uncompressed
        100 M-value 16-bit image is 200 MB, real files are <= ~40 MB (uncompressed mammogram); anything bigger is
        multi-frame (refused anyway) or not an image. It caps each slice of a series and a .nii.gz too, but not an
        uncompressed .nii, which is its voxels and is capped with them (max_volume_bytes).
    max_manifest_bytes: bytes of the manifest CSV. Default 256 MiB (~2 million rows of ~128 bytes; the largest
        public chest X-ray sets have < 0.5 million images).

    multi_frame: what a multi-frame DICOM becomes (this layer trains on single 2-D images). "reject" (default): a
        Rejection naming the frame count, before anything is decoded; the frame count multiplies into max_pixels.
        "first": the first frame alone is read and decoded, so max_pixels applies to one frame. Rejecting is the
        default because a multi-frame object is usually a volume, cine loop or tomosynthesis stack whose first frame
        is an arbitrary slice, not the image its label describes; a site whose multi-frame files do hold one image
        each says so (site.toml `multi-frame = "first"`).

    Volumes (CT / MR: a DICOM series folder or a NIfTI file, :mod:`core_models.data.volumes`), checked from stat and
    headers before any voxel is decoded; max_pixels caps each slice (a series' Rows x Columns, a NIfTI's x * y):
    max_slices: files in one series folder, or a NIfTI's slices (z). Default 4096 (a thin-slice whole-body CT has
        ~2000).
    max_voxels: voxels of one volume. Default 512 x 512 x 1024 = 268 M (a 0.5 mm chest-abdomen CT); the float32
        volume is then 1 GiB, and resampling holds about two more copies transiently.
    max_volume_bytes: bytes of one series' files together, or of a NIfTI's voxels once inflated; an uncompressed
        .nii file may be this plus its header (at most 16 MiB with extensions). Default 2 GiB.
    """

    max_pixels: int = 100_000_000
    max_file_bytes: int = 512 * 1024**2
    max_manifest_bytes: int = 256 * 1024**2
    multi_frame: str = "reject"
    max_slices: int = 4096
    max_voxels: int = 512 * 512 * 1024
    max_volume_bytes: int = 2 * 1024**3

    def __post_init__(self):
        for name in ("max_pixels", "max_file_bytes", "max_manifest_bytes", "max_slices", "max_voxels",
                     "max_volume_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")
        if self.multi_frame not in MULTI_FRAME:
            raise ValueError(f"ImageLimits.multi_frame must be one of {MULTI_FRAME}, got {self.multi_frame!r}")


DEFAULT_LIMITS = ImageLimits()


def _limits(limits: ImageLimits | None) -> ImageLimits:
    if limits is None:
        return DEFAULT_LIMITS
    if not isinstance(limits, ImageLimits):
        raise TypeError(f"limits must be an ImageLimits, got {type(limits).__name__}")
    return limits


def _mb(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


def _open_regular(path, max_bytes: int, what: str = "image file") -> BinaryIO:
    """Open `path` for reading only if it is a regular file of at most max_bytes, without ever blocking.

    O_NONBLOCK makes opening a FIFO return at once (plain open() would wait for a writer forever), and the type and
    size come from fstat of the opened descriptor, so a file swapped for a FIFO, device or bigger file after an
    earlier check is still caught. Raises ImageError (from the OSError, so PermissionError stays visible).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ImageError(f"cannot open file: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"not a regular file (a device, FIFO or folder): {path}")
        if st.st_size > max_bytes:
            raise ImageError(f"{what} too large: {_mb(st.st_size)} (limit {_mb(max_bytes)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path, limits: ImageLimits | None, what: str, error: type[Exception]) -> bytes:
    """A small table's bytes (a manifest, a boxes file), if it is a regular file within limits.max_manifest_bytes:
    a FIFO, /dev/zero or a runaway export is an ``error`` naming ``what`` and the path, not a hang or an exhausted
    site."""
    limit = _limits(limits).max_manifest_bytes
    try:
        f = _open_regular(path, limit, what=what)
    except ImageError as e:
        text = str(e)
        if text.startswith((f"{what} not found", f"{what} too large")):
            raise error(text.replace(f"{what} too large", f"{what} {path} too large")) from None
        if text.startswith("not a regular file"):
            raise error(f"{what} {path} is not a regular file (a device, FIFO or folder)") from None
        raise error(f"cannot read {what} {path}: {e.__cause__ or e}") from e
    chunks, total = [], 0
    try:
        with f:  # chunked: read(limit + 1) would allocate the whole limit up front
            while total <= limit and (chunk := f.read(min(1 << 20, limit + 1 - total))):
                chunks.append(chunk)
                total += len(chunk)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e}") from e
    if total > limit:  # the file grew after the size check
        raise error(f"{what} {path} too large: over {_mb(limit)}")
    return b"".join(chunks)
