"""One image file to a grayscale array (or, with channels=3, an RGB one): by suffix or DICOM magic to the DICOM
reader, else Pillow (PNG, JPEG and other raster formats) with its decompression-bomb cap tied to ImageLimits.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

from core_models.data.dicom import _read_dicom_file
from core_models.data.limits import ImageError, ImageLimits, _limits, _open_regular
from core_models.data.pixels import (
    META_COLUMNS,
    _as_channels,
    _check_channels,
    _check_pixel_count,
    _check_side,
    _grey_from_channels,
    _normalise,
    _resize,
)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


# Raster formats Pillow may open (PACS/phone exports). Not EPS/PDF/PSD and the like: EPS is rendered by running
# Ghostscript, far outside what a grayscale-image decoder should do with a hospital's untrusted files.
_PIL_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "GIF", "PPM", "WEBP")


@contextlib.contextmanager
def _pillow_cap(max_pixels: int):
    """Pillow's decompression-bomb limit tied to our cap while we decode, and its warning (> cap) an error like its
    error (> 2 x cap). Restored afterwards, so other Pillow users in the process keep their own setting."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _read_pil(f: BinaryIO, size: int | None, limits: ImageLimits, channels: int = 1) -> tuple[np.ndarray, dict]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    f.seek(0)
    try:
        with _pillow_cap(limits.max_pixels), Image.open(f, formats=_PIL_FORMATS) as im:
            # Image.open reads only the header: the size is known, nothing is decoded until load()
            width, height = im.size
            _check_pixel_count(height, width, 1, len(im.getbands()), limits)
            if getattr(im, "n_frames", 1) > 1:
                raise ImageError(f"multi-frame image ({im.n_frames} frames); expected a single 2-D image")
            im = ImageOps.exif_transpose(im)  # phone/scanner JPEGs may store rotation in EXIF
            mode = im.mode
            if mode == "P":
                im, mode = im.convert("RGBA"), "RGBA"
            elif mode not in ("1", "L", "LA", "I", "F", "RGB", "RGBA") and not mode.startswith("I;16"):
                im, mode = im.convert("RGB"), "RGB"
            arr = np.asarray(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e} (limit {limits.max_pixels:,} pixel values per image)") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"unreadable image file ({type(e).__name__}: {e})") from e

    if mode == "1":
        img = arr.astype(np.float32)
    elif mode == "L":
        img = _normalise(arr, 0.0, 255.0)
    elif mode == "LA":
        img = _normalise(arr[..., 0], 0.0, 255.0)
    elif mode.startswith("I;16"):
        img = _normalise(arr, 0.0, 65535.0)
    elif mode == "I":  # 32-bit container; PNG/TIFF 16-bit data lands here in some Pillow versions
        lo, hi = float(arr.min()), float(arr.max())
        img = _normalise(arr, 0.0, 65535.0) if lo >= 0 and hi <= 65535 else _normalise(arr, lo, hi)
    elif mode == "F":
        img = _normalise(arr, float(np.nanmin(arr)), float(np.nanmax(arr)))
    elif channels == 3:  # RGB / RGBA kept in colour (alpha dropped), (3, H, W)
        img = np.ascontiguousarray(_normalise(arr[..., :3], 0.0, 255.0).transpose(2, 0, 1))
    else:  # RGB / RGBA
        grey = _grey_from_channels(arr, 255.0)
        if grey is None:
            raise ImageError(f"colour image, expected grayscale (mode {mode}); run config in-channels=3 trains on "
                             f"colour images")
        img = _normalise(grey, 0.0, 255.0)
    h, w = img.shape[-2:]
    _check_side(h, w)
    meta = {c: None for c in META_COLUMNS}
    meta.update(rows=int(h), cols=int(w))
    return _as_channels(_resize(img, size), channels), meta


def _has_dicom_magic(f: BinaryIO) -> bool:
    try:
        f.seek(0)
        head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path, size: int | None = None, limits: ImageLimits | None = None,
               channels: int = 1) -> tuple[np.ndarray, dict]:
    """Decode any supported image: .dcm/.dicom or DICOM magic -> read_dicom; .png/.jpg/.jpeg (and other raster
    formats Pillow knows) -> grayscale via PIL. Returns float32 (H, W) in [0, 1] (size x size if given) and metadata.

    ``channels=3``: float32 (3, H, W) RGB in [0, 1] instead; a colour PNG/JPEG keeps its colour (with channels=1 it
    is refused), a colour DICOM its RGB (YBR converted; with channels=1 its luminance), and a grey image is
    replicated to the three channels.

    The file is opened once, non-blocking, and must be a regular file within `limits` (default
    :data:`DEFAULT_LIMITS`); image sizes are checked from headers before decoding. Refusals are ImageErrors."""
    path = Path(path)
    limits = _limits(limits)
    channels = _check_channels(channels)
    with _open_regular(path, limits.max_file_bytes) as f:
        return _dispatch(f, path, size, limits, channels)


def _dispatch(f: BinaryIO, path: Path, size: int | None, limits: ImageLimits,
              channels: int = 1) -> tuple[np.ndarray, dict]:
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or (suffix not in PIL_SUFFIXES and _has_dicom_magic(f)):
        return _read_dicom_file(f, size, limits, channels)
    if suffix in PIL_SUFFIXES:
        return _read_pil(f, size, limits, channels)
    try:  # unknown suffix (PACS exports often have none): Pillow formats first, then preamble-less DICOM
        return _read_pil(f, size, limits, channels)
    except ImageError as e:
        if not str(e).startswith("unreadable image file"):
            raise
    try:
        return _read_dicom_file(f, size, limits, channels)
    except ImageError as e:
        if str(e).startswith("not a DICOM file"):
            raise ImageError(f"unrecognised file format (neither DICOM nor an image Pillow reads): {path.name}") from e
        raise
