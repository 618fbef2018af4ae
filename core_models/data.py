"""Site data layer: manifest, image decoding (DICOM / PNG / JPEG / MedMNIST npz) and a decoded-image cache.

Why this exists: every hospital hands us a folder with a ``manifest.csv`` and images in whatever its PACS exported.
Everything downstream (splits, training, shift statistics, fairness audits) needs the same thing from it: a stack of
grayscale images in [0, 1] where bright means dense on every scanner, integer labels, and the manifest rows that
survived, with the acquisition metadata (manufacturer, model, ...) that explains site shift. One bad file or row must
never stop a site: it becomes a :class:`Rejection` with a reason a data manager can act on. Whole-site problems
(missing manifest, missing columns, nothing usable) raise :class:`ManifestError`.

A data folder may also hold hostile or broken input (a manifest row ``../../etc/shadow``, a symlink out of the folder,
a FIFO, a DICOM header claiming 60000 x 60000 pixels, a PNG decompression bomb). Every image path goes through
:func:`core_models.paths.resolve_site_file`, every file is opened non-blocking and checked to be a regular file, and
sizes are checked against :class:`ImageLimits` from headers, before any pixel data are read or decoded; for
compressed DICOM the first frame's own codestream header (JPEG SOF, JPEG 2000 SIZ) must agree with the DICOM header
before a decoder sees it, and a deflated dataset may not inflate past the file-size cap.

DICOM as PACS export it: compressed transfer syntaxes are decoded by pydicom's pixel-data plugins (pylibjpeg with
libjpeg / openjpeg / rle, pyjpegls, Pillow); colour images (RGB, YBR_*, PALETTE COLOR) become their ITU-R BT.601
luminance; multi-frame objects are refused or reduced to their first frame, as the site's ImageLimits.multi_frame says.

Full-size clinical DICOMs cost 10-100 ms each to decode and a federated run restarts clients often, so decoded stacks
are cached next to the data (``.equifed_cache/``), keyed by the manifest bytes, every image's (path, size, mtime_ns),
the image size and a format version; rejections are cached with them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pydicom
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from core_models.paths import UnsafePath, resolve_site_file

log = logging.getLogger(__name__)

MANIFEST_REQUIRED = ("patient_id", "image_path", "label")
# Manifest columns read as text so identifiers such as "007" or site "01" keep their leading zeros.
_TEXT_COLUMNS = ("patient_id", "image_path", "label", "site", "split")
# Per-image metadata added to SiteData.frame (DICOM fields; only rows/cols are known for PNG/JPEG).
META_COLUMNS = ("manufacturer", "scanner_model", "dicom_sex", "dicom_age", "modality", "rows", "cols")
MIN_SIDE = 8
CACHE_DIR = ".equifed_cache"
CACHE_VERSION = 3  # bump when decoding changes, so stale caches are never reused
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
MULTI_FRAME = ("reject", "first")  # ImageLimits.multi_frame values
# ITU-R BT.601 luma weights: the Y of DICOM's YBR_FULL (PS3.3 C.7.6.3.1.2) and of pydicom's convert_color_space, so a
# YBR image's Y channel and the luminance of the same image stored as RGB agree to rounding.
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CHANNEL_TOLERANCE = 2  # max |R-G|, |R-B| (of 255) still called grayscale: lossy JPEG leaves small chroma noise
_Q = 65535.0  # images are quantised to uint16 steps (error <= 7.7e-6) so cached and fresh loads are bit-identical


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
        multi-frame (refused anyway) or not an image.
    max_manifest_bytes: bytes of the manifest CSV. Default 256 MiB (~2 million rows of ~128 bytes; the largest
        public chest X-ray sets have < 0.5 million images).

    multi_frame: what a multi-frame DICOM becomes (this layer trains on single 2-D images). "reject" (default): a
        Rejection naming the frame count, before anything is decoded; the frame count multiplies into max_pixels.
        "first": the first frame alone is read and decoded, so max_pixels applies to one frame. Rejecting is the
        default because a multi-frame object is usually a volume, cine loop or tomosynthesis stack whose first frame
        is an arbitrary slice, not the image its label describes; a site whose multi-frame files do hold one image
        each says so (site.toml `multi-frame = "first"`).
    """

    max_pixels: int = 100_000_000
    max_file_bytes: int = 512 * 1024**2
    max_manifest_bytes: int = 256 * 1024**2
    multi_frame: str = "reject"

    def __post_init__(self):
        for name in ("max_pixels", "max_file_bytes", "max_manifest_bytes"):
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


@dataclass
class Rejection:
    image_path: str
    row: int | None  # 0-based manifest data row; None when not from a row
    reason: str


@dataclass
class SiteData:
    images: np.ndarray  # (N, 1, S, S) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    frame: pd.DataFrame  # accepted manifest rows (index reset) + META_COLUMNS
    rejected: list[Rejection]


# ----------------------------------------------------------------------------------------------------------- manifest


def _read_manifest_bytes(manifest_path: Path, limits: ImageLimits | None = None) -> bytes:
    """The manifest's bytes, if it is a regular file within limits.max_manifest_bytes (a FIFO, /dev/zero or a
    runaway export is a ManifestError, not a hang or an exhausted site)."""
    limit = _limits(limits).max_manifest_bytes
    try:
        f = _open_regular(manifest_path, limit, what="manifest")
    except ImageError as e:
        text = str(e)
        if text.startswith(("manifest not found", "manifest too large")):
            raise ManifestError(text.replace("manifest too large", f"manifest {manifest_path} too large")) from None
        if text.startswith("not a regular file"):
            raise ManifestError(f"manifest {manifest_path} is not a regular file (a device, FIFO or folder)") from None
        raise ManifestError(f"cannot read manifest {manifest_path}: {e.__cause__ or e}") from e
    chunks, total = [], 0
    try:
        with f:  # chunked: read(limit + 1) would allocate the whole limit up front
            while total <= limit and (chunk := f.read(min(1 << 20, limit + 1 - total))):
                chunks.append(chunk)
                total += len(chunk)
    except OSError as e:
        raise ManifestError(f"cannot read manifest {manifest_path}: {e}") from e
    if total > limit:  # the file grew after the size check
        raise ManifestError(f"manifest {manifest_path} too large: over {_mb(limit)}")
    return b"".join(chunks)


def _parse_label(value, num_classes: int | None) -> tuple[int | None, str]:
    """Return (label, "") or (None, reason). Accepts "1" and "1.0" (spreadsheets write those), nothing fractional."""
    if value is None or (not isinstance(value, str) and pd.isna(value)) or str(value).strip() == "":
        return None, "missing label"
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        return None, f"bad label {text!r}: not an integer"
    label = int(number)
    if label < 0 or (num_classes is not None and label >= num_classes):
        upper = "" if num_classes is None else f", {num_classes}"
        return None, f"bad label {text!r}: out of range [0{upper})"
    return label, ""


def _parse_manifest(raw: bytes, manifest_path: Path, num_classes: int | None, site_dir: Path | None = None):
    """Parse manifest bytes -> (accepted rows indexed by manifest row, resolved paths, their (size, mtime_ns),
    rejections, number of rows). Files are stat-ed here, before decoding, so a file changed meanwhile invalidates.

    Image paths are relative to the manifest's folder and must resolve (symlinks followed) to regular files inside
    `site_dir` (default: the manifest's folder); anything else is a Rejection with the reason from
    :func:`core_models.paths.resolve_site_file`, and nothing of it is opened."""
    try:
        header = pd.read_csv(io.BytesIO(raw), nrows=0, encoding="utf-8-sig").columns
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest {manifest_path} is empty (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {manifest_path} is not a readable CSV: {e}") from e
    names = {str(c): str(c).strip().lstrip("\ufeff").strip() for c in header}
    missing = [c for c in MANIFEST_REQUIRED if c not in names.values()]
    if missing:
        raise ManifestError(
            f"manifest {manifest_path} lacks required column(s) {', '.join(missing)} "
            f"(has: {', '.join(names.values()) or 'none'})"
        )
    try:
        df = pd.read_csv(
            io.BytesIO(raw),
            encoding="utf-8-sig",
            dtype={raw_name: str for raw_name, name in names.items() if name in _TEXT_COLUMNS},
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {manifest_path} is not a readable CSV: {e}") from e
    df = df.rename(columns=names)
    n_rows = len(df)

    base = os.path.abspath(manifest_path.parent)
    site = os.path.abspath(site_dir) if site_dir is not None else base
    same = os.path.realpath(site) == os.path.realpath(base)
    keep, labels, paths, stamps, rejected = [], [], [], [], []
    for row, pid, ipath, lab in zip(range(n_rows), df["patient_id"], df["image_path"], df["label"]):
        shown = "" if pd.isna(ipath) else str(ipath)
        if shown.strip() == "":
            rejected.append(Rejection(shown, row, "missing image_path"))
            continue
        if pd.isna(pid) or str(pid).strip() == "":
            rejected.append(Rejection(shown, row, "missing patient_id"))
            continue
        label, why = _parse_label(lab, num_classes)
        if label is None:
            rejected.append(Rejection(shown, row, why))
            continue
        text = shown.strip()
        try:  # relative to the manifest; an absolute image_path stays as it is (and must still be in the site)
            resolved, st = resolve_site_file(site, text if same else os.path.join(base, text))
        except UnsafePath as e:
            rejected.append(Rejection(shown, row, str(e)))
            continue
        except (OSError, ValueError) as e:  # e.g. an over-long name: still this row's problem only
            rejected.append(Rejection(shown, row, f"unusable image path ({type(e).__name__}: {e})"))
            continue
        keep.append(row)
        labels.append(label)
        paths.append(str(resolved))
        stamps.append((st.st_size, st.st_mtime_ns))
    df = df.iloc[keep].copy()
    df["label"] = np.asarray(labels, dtype=np.int64)
    return df, paths, stamps, rejected, n_rows


def _first_reasons(rejected: list[Rejection], k: int = 3) -> str:
    return "; ".join(f"row {r.row} ({r.image_path}): {r.reason}" for r in rejected[:k])


def read_manifest(manifest_path, num_classes: int | None = 2,
                  limits: ImageLimits | None = None) -> tuple[pd.DataFrame, list[Rejection]]:
    """Read and validate a manifest; bad rows (label, missing file, path outside the manifest's folder, not a
    regular file) become Rejections, not errors.

    The returned frame keeps the 0-based manifest row number as its index (so rows can be traced back), all original
    columns, and ``label`` as int64. ``image_path`` stays as written; relative paths are relative to the manifest.
    """
    manifest_path = Path(manifest_path)
    raw = _read_manifest_bytes(manifest_path, limits)
    df, _, _, rejected, n_rows = _parse_manifest(raw, manifest_path, num_classes)
    if df.empty:
        detail = "no rows" if n_rows == 0 else f"{n_rows} rows, all rejected; first reasons: {_first_reasons(rejected)}"
        raise ManifestError(f"no usable rows in {manifest_path}: {detail}")
    return df, rejected


def write_rejected(rejections: list[Rejection], path) -> None:
    """Write rejections as CSV (image_path,row,reason), header even when empty, for the site's data manager."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "row", "reason"])
        for r in rejections:
            w.writerow([r.image_path, "" if r.row is None else r.row, r.reason])


# ------------------------------------------------------------------------------------------------------------ images


def _resize(img: np.ndarray, size: int | None) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking, antialiased bilinear when any side grows.

    Integer shrink factors take an exact numpy box-mean (what mode="area" computes) to skip torch's per-call cost.
    """
    if size is None:
        return img
    h, w = img.shape
    if (h, w) == (size, size):
        return img
    if h % size == 0 and w % size == 0:
        fh, fw = h // size, w // size
        rows = img.reshape(size, fh, w)
        acc = rows[:, 0].astype(np.float32)  # strided adds: ~10x faster than mean(axis=(1, 3)) on 256 -> 64
        for k in range(1, fh):
            acc += rows[:, k]
        cols = acc.reshape(size, size, fw)
        out = cols[..., 0].copy()
        for k in range(1, fw):
            out += cols[..., k]
        out *= np.float32(1.0 / (fh * fw))
        return out
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    if h >= size and w >= size:
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return np.clip(out[0, 0].numpy(), 0.0, 1.0)


def _normalise(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto [0, 1] (clipped); a constant image becomes all zeros."""
    a = np.asarray(a, dtype=np.float32)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi == lo:
        return np.zeros(a.shape, dtype=np.float32)
    out = (a - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _grey_from_channels(arr: np.ndarray, max_value: float) -> np.ndarray | None:
    """(H, W, C>=3) -> (H, W) when R, G, B carry the same picture, else None (a true colour image)."""
    rgb = arr[..., :3].astype(np.float32)
    tol = _CHANNEL_TOLERANCE * max_value / 255.0
    if np.abs(rgb[..., 0] - rgb[..., 1]).max() > tol or np.abs(rgb[..., 0] - rgb[..., 2]).max() > tol:
        return None
    return rgb.mean(axis=-1)


def _check_side(rows: int, cols: int) -> None:
    if rows <= 0 or cols <= 0:
        raise ImageError(f"no image dimensions (Rows {rows}, Columns {cols})")
    if min(rows, cols) < MIN_SIDE:
        raise ImageError(f"image too small ({rows}x{cols} px; need at least {MIN_SIDE} in each dimension)")


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def parse_dicom_age(value) -> float | None:
    """DICOM AS ("045Y", "006M", "010W", "003D") -> age in years; None when absent or malformed."""
    if value is None:
        return None
    m = _AGE.match(str(value))
    if not m:
        return None
    return float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]


_TEXT_MEMO: dict[tuple, str | None] = {}
_MISSING = object()


def _clean(value) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _text(ds, tag: int) -> str | None:
    """Element value as stripped text. Decoding depends only on the raw bytes and the character set, and a site
    repeats the same few manufacturers/models/ages, so decoded values are memoised by those."""
    try:
        elem = ds.get_item(tag)
        if elem is None:
            return None
        if not isinstance(elem.value, bytes):
            return _clean(ds[tag].value)
        charset = ds.get_item(0x00080005)
        charset = None if charset is None else charset.value if isinstance(charset.value, (bytes, str)) else repr(
            charset.value)
        key = (tag, elem.value, charset)
        value = _TEXT_MEMO.get(key, _MISSING)
        if value is _MISSING:
            value = _clean(ds[tag].value)
            if len(_TEXT_MEMO) >= 65536:
                _TEXT_MEMO.clear()
            _TEXT_MEMO[key] = value
        return value
    except Exception:  # a malformed element must not cost the image
        return None


def _dicom_meta(ds) -> dict:
    return {
        "manufacturer": _text(ds, 0x00080070),
        "scanner_model": _text(ds, 0x00081090),
        "dicom_sex": _text(ds, 0x00100040),
        "dicom_age": parse_dicom_age(_text(ds, 0x00101010)),
        "modality": _text(ds, 0x00080060),
        "rows": int(ds.get("Rows") or 0),
        "cols": int(ds.get("Columns") or 0),
    }


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    if uid is None:
        return "unknown"
    name = getattr(uid, "name", "") or ""
    return name if name and name != str(uid) else str(uid)


def _as_int(ds, keyword: str, default: int) -> int:
    """An integer header value, or default when absent or malformed (the checks that use it must not crash)."""
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except Exception:
        return default


def _check_pixel_count(rows: int, cols: int, frames: int, samples: int, limits: ImageLimits) -> None:
    """Refuse, from the header alone, an image with more pixel values than limits.max_pixels."""
    rows, cols, frames, samples = max(rows, 0), max(cols, 0), max(frames, 1), max(samples, 1)
    total = rows * cols * frames * samples
    if total <= limits.max_pixels:
        return
    extra = (f" x {samples} samples" if samples > 1 else "") + (f" x {frames} frames" if frames > 1 else "")
    shown = f"{rows} x {cols} pixels{extra}" + (f" (= {total:,} values)" if extra else "")
    raise ImageError(f"image too large: {shown} (limit {limits.max_pixels:,} pixel values per image)")


def _check_dicom_limits(ds, limits: ImageLimits) -> None:
    """The pixel cap from the header; under multi_frame = "first" only one frame is ever read, so one counts."""
    frames = 1 if limits.multi_frame == "first" else _as_int(ds, "NumberOfFrames", 1)
    _check_pixel_count(_as_int(ds, "Rows", 0), _as_int(ds, "Columns", 0), frames, _as_int(ds, "SamplesPerPixel", 1),
                       limits)


def _check_deflate(f: BinaryIO, limits: ImageLimits) -> None:
    """pydicom inflates a deflated dataset (transfer syntax 1.2.840.10008.1.2.1.99) whole and unbounded, and a few kB
    can inflate to gigabytes: refuse one that inflates past limits.max_file_bytes, found by inflating it in 16 MiB
    steps first (deflated files are rare; the second inflation is pydicom's)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        f.seek(0)
        read_preamble(f, force=True)
        if _read_file_meta_info(f).get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        z, total, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, f.read(limits.max_file_bytes)
    except Exception:  # not a DICOM file meta: the readers below say what it is
        return
    try:
        while pending and not z.eof and total <= limits.max_file_bytes:
            total += len(z.decompress(pending, 1 << 24))
            pending = z.unconsumed_tail
    except zlib.error as e:
        raise ImageError(f"unreadable DICOM file (deflated dataset: {e})") from e
    if total > limits.max_file_bytes:
        raise ImageError(f"deflated dataset too large: inflates to over {_mb(limits.max_file_bytes)} "
                         f"(the limit per image file); refused before reading it")


def _dcmread(f: BinaryIO, limits: ImageLimits):
    """dcmread of an open file, with a forced read for old files lacking the 'DICM' preamble; anything else is
    'not DICOM'. The header (everything before the pixel data) is read and checked against `limits` first, so a
    header claiming a huge image is refused before its pixel data are read, let alone decoded."""
    forced = False
    _check_deflate(f, limits)
    f.seek(0)
    try:
        head = pydicom.dcmread(f, stop_before_pixels=True)
    except InvalidDicomError:
        forced = True
    except Exception as e:
        raise ImageError(f"unreadable DICOM file ({type(e).__name__}: {e})") from e
    if forced:
        try:
            f.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head = pydicom.dcmread(f, force=True, stop_before_pixels=True)
            usable = "Rows" in head and "Columns" in head
        except Exception:
            usable = False
        if not usable:
            raise ImageError("not a DICOM file (no 'DICM' marker and no readable image elements)")
    _check_dicom_limits(head, limits)
    f.seek(0)
    try:
        with warnings.catch_warnings():
            if forced:
                warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f, force=forced)
    except Exception as e:
        if forced:
            raise ImageError("not a DICOM file (no 'DICM' marker and no readable image elements)") from e
        raise ImageError(f"unreadable DICOM file ({type(e).__name__}: {e})") from e
    if not forced:
        return ds
    if "PixelData" not in ds:
        raise ImageError("not a DICOM file (no 'DICM' marker and no readable image elements)")
    if "TransferSyntaxUID" not in ds.file_meta:  # pixel decoding needs one; take what the parser detected
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit
            else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})  # F7: LS
_JPEG_FAMILY = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)
_J2K_FAMILY = frozenset(JPEG2000TransferSyntaxes)


def _jpeg_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) of a JPEG / JPEG-LS codestream from its SOF segment, walking the marker segments from SOI as
    a decoder does; None without SOI or without a frame header before the first scan."""
    if frame[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(frame)
    while i + 4 <= n:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_SOF:
            return None if i + 9 > n else struct.unpack(">HH", frame[i + 5 : i + 9])
        elif marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        else:
            i += 2 + int.from_bytes(frame[i + 2 : i + 4], "big")
    return None


def _j2k_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) of a JPEG 2000 codestream from its SIZ segment, which must directly follow SOC (inside the
    'jp2c' box when an encoder wrapped the frame as a JP2 file); None when there is none."""
    start, n = 0, len(frame)
    if frame[4:8] == b"jP  ":  # JP2 signature box: walk the boxes to the contiguous codestream
        while True:
            if start + 8 > n:
                return None
            length, kind = struct.unpack(">I4s", frame[start : start + 8])
            header = 8
            if length == 1 and start + 16 <= n:
                length, header = struct.unpack(">Q", frame[start + 8 : start + 16])[0], 16
            if kind == b"jp2c":
                start += header
                break
            if length < header:
                return None
            start += length
    if frame[start : start + 4] != b"\xff\x4f\xff\x51" or start + 24 > n:
        return None
    x, y, x0, y0 = struct.unpack(">4I", frame[start + 8 : start + 24])
    return y - y0, x - x0


def _check_codestream(frame: bytes, ts: UID, rows: int, cols: int) -> None:
    """Refuse a JPEG / JPEG-LS / JPEG 2000 frame whose own header disagrees with the DICOM header's Rows x Columns
    (already checked against the limits), before a decoder allocates whatever the codestream claims: the
    decompression bomb of compressed DICOM (Pillow's plugin has its own cap; libjpeg and openjpeg have none)."""
    if ts in _J2K_FAMILY:
        size, kind = _j2k_frame_size(frame), "JPEG 2000 SOC/SIZ"
    elif ts in _JPEG_FAMILY:
        size, kind = _jpeg_frame_size(frame), "JPEG SOI/SOF"
    else:
        return
    syntax = f"{ts.name} ({ts})"
    if size is None:
        raise ImageError(f"compressed transfer syntax {syntax}: decoding failed (no {kind} header at the start of "
                         f"the first frame)")
    if tuple(size) != (rows, cols):
        raise ImageError(f"compressed transfer syntax {syntax}: the first frame's codestream is {size[0]} x {size[1]} "
                         f"pixels but the DICOM header says {rows} x {cols}; refused undecoded")


# The plugin tried first, where one measured faster than pydicom's own order (benchmarks/dicom_corpus.py has the
# numbers): Pillow for 8-bit JPEG (2-4x libjpeg; pydicom's decoder before the plugins were added, so those images
# decode as they did), CharLS for JPEG-LS (~4x libjpeg). Any failure falls back to every available plugin in
# pydicom's order; 12-bit JPEG, JPEG Lossless, JPEG 2000 and RLE keep that order (libjpeg / openjpeg / pylibjpeg-rle
# first: the only 12-bit and lossless JPEG decoder here, as fast as Pillow on JPEG 2000, 10x pydicom's RLE).
_PREFERRED_PLUGIN = {JPEGBaseline8Bit: "pillow", JPEGExtended12Bit: "pillow", JPEGLSLossless: "pyjpegls",
                     JPEGLSNearLossless: "pyjpegls"}


def _as_array(decoder, src, ts: UID, bits_stored: int, /, **opts) -> tuple[np.ndarray, str]:
    """The first frame and the colour space it came out in. as_rgb=False: a YBR image stays YBR (its Y channel is
    the luminance, no round trip through RGB); a palette stays indices."""
    plugin = None if ts == JPEGExtended12Bit and bits_stored > 8 else _PREFERRED_PLUGIN.get(ts)
    if plugin is not None and plugin in decoder.available_plugins:
        pos = None if isinstance(src, pydicom.Dataset) else src.tell()
        try:
            arr, props = decoder.as_array(src, index=0, as_rgb=False, decoding_plugin=plugin, **opts)
            return arr, str(props.get("photometric_interpretation", ""))
        except Exception:
            if pos is not None:
                src.seek(pos)
    arr, props = decoder.as_array(src, index=0, as_rgb=False, **opts)
    return arr, str(props.get("photometric_interpretation", ""))


def _decode_pixels(ds) -> tuple[np.ndarray, str]:
    """The first frame (see _as_array), its codestream checked first, pydicom's errors turned into reasons that name
    the transfer syntax."""
    ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    try:
        if ts is None:
            raise ValueError("no transfer syntax")
        ts = UID(ts)
        decoder = pydicom.pixels.get_decoder(ts)
        if ts in _JPEG_FAMILY or ts in _J2K_FAMILY:
            extended = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            frame = get_frame(ds.PixelData, 0, number_of_frames=max(_as_int(ds, "NumberOfFrames", 1), 1),
                              extended_offsets=extended)
            _check_codestream(frame, ts, _as_int(ds, "Rows", 0), _as_int(ds, "Columns", 0))
        return _as_array(decoder, ds, ts, _as_int(ds, "BitsStored", 8))
    except ImageError:
        raise
    except Exception as e:
        first = " ".join(str(e).split())[:400] or type(e).__name__  # pydicom's plugin errors span lines
        syntax = f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"
        if ts is not None and ts.is_compressed:
            try:
                decoder = pydicom.pixels.get_decoder(ts)
            except NotImplementedError:
                decoder = None
            if decoder is None or not decoder.is_available:
                needs = "; ".join(decoder.missing_dependencies) if decoder is not None else "pydicom has none"
                raise DecoderMissing(
                    f"compressed transfer syntax {syntax}: no decoder available (needs one of: {needs})"
                ) from e
            raise ImageError(f"compressed transfer syntax {syntax}: decoding failed ({first})") from e
        raise ImageError(f"cannot decode pixel data ({syntax}): {first}") from e


def _luminance(arr: np.ndarray, ds, space: str) -> np.ndarray:
    """A colour image's luminance in [0, 1]: the ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B of RGB (a palette
    is looked up to RGB first), and the Y channel itself of YBR_FULL / YBR_FULL_422 (the same Y by definition).
    Colour samples are display values, so the scale is their stored range (0 .. 2^BitsStored - 1; a palette's
    0 .. 2^(LUT bits) - 1), not the image's own min-max; a grey image stored as RGB keeps its grey values exactly."""
    space = space.strip().upper()
    top = float(2 ** _as_int(ds, "BitsStored", 8) - 1)
    if space == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        if arr.ndim != 2:
            raise ImageError(f"unexpected pixel array shape {arr.shape} for a PALETTE COLOR image")
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:  # a missing or malformed palette
            raise ImageError(f"unusable palette (PALETTE COLOR): {type(e).__name__}: {e}") from e
        top, space = float(np.iinfo(arr.dtype).max), "RGB"
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(f"unexpected pixel array shape {arr.shape} for a {space or 'colour'} image")
    if space in ("YBR_FULL", "YBR_FULL_422"):
        luma = arr[..., 0].astype(np.float32)
    elif space == "RGB":
        luma = arr.astype(np.float32) @ _BT601
    else:
        raise ImageError(f"colour space {space or 'unknown'} (SamplesPerPixel 3) is not supported")
    return _normalise(luma, 0.0, top)


def _voi_kind(ds) -> str | None:
    """Which VOI transform pydicom's apply_voi_lut would use: 'lut', 'window' or None (same precedence)."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _finish(values: np.ndarray, lo: float, hi: float, photometric: str) -> np.ndarray:
    img = _normalise(values, lo, hi)
    if photometric == "MONOCHROME1":  # 0 = white there; flip so bright = dense on every scanner
        np.subtract(np.float32(1.0), img, out=img)
    return img


def _voi_display(values: np.ndarray, ds, photometric: str, kind: str | None) -> np.ndarray | None:
    """VOI LUT or window (the first one) on modality values, scaled to [0, 1]; None when there is no usable VOI."""
    from pydicom.pixels import apply_voi_lut, apply_windowing

    if kind is None:
        return None
    try:
        if kind == "lut":
            item = ds.VOILUTSequence[0]
            entries, first, bits = (int(v) for v in item.LUTDescriptor)
            if bits == 8:
                # pydicom 3.0.2 indexes an 8-bit LUT with uint8 indices, so inputs above 255 wrap around;
                # declaring 16 bits changes only the index/output dtype, not the table values.
                item.LUTDescriptor = [entries, first, 16]
            if values.dtype.kind == "f":  # LUT inputs are integers by definition
                values = np.rint(values).astype(np.int64)
            out = apply_voi_lut(values, ds, index=0)
            table = apply_voi_lut(np.arange(first, first + (entries or 65536), dtype=np.int64), ds, index=0)
            lo, hi = float(table.min()), float(table.max())
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out = apply_voi_lut(values, ds, index=0)
                # pydicom's output range for this window: -inf/+inf land exactly on its y_min/y_max
                lo, hi = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds, index=0))
    except (ValueError, NotImplementedError, IndexError, TypeError, AttributeError) as e:
        log.warning("ignoring invalid VOI %s (%s); using min-max instead", kind, e)
        return None
    return _finish(out, lo, hi, photometric)


@dataclass(frozen=True)
class _Tables:
    """The intensity chain evaluated once per stored value start, start + 1, ..."""

    start: int
    modality: np.ndarray  # modality values (after rescale / Modality LUT)
    display: np.ndarray | None  # float32 [0, 1] after VOI and MONOCHROME1; None: the image's own min-max decides
    # (x0, slope, y0) when the table above equals y0 + slope * (stored - x0) (display: clipped to [0, 1]) on every
    # entry, as for a rescale and a linear window: an image then takes a few float passes instead of a gather.
    display_affine: tuple[float, float, float] | None = None
    modality_affine: tuple[float, float, float] | None = None


def _fit_affine(x: np.ndarray, y: np.ndarray, clipped: bool) -> tuple[float, float, float] | None:
    """(x0, slope, y0) with y == y0 + slope * (x - x0) (clipped to [0, 1] if `clipped`) on every entry, else None."""
    x = x.astype(np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = np.flatnonzero((y > 0) & (y < 1)) if clipped else np.arange(len(y))
    if len(inside) < 2:
        return None
    i, j = inside[0], inside[-1]
    slope = (y[j] - y[i]) / (x[j] - x[i])
    fit = y[i] + slope * (x - x[i])
    if clipped:
        np.clip(fit, 0.0, 1.0, out=fit)
    tol = 1e-6 if clipped else 1e-9 * max(1.0, float(np.abs(y).max()))
    return (float(x[i]), float(slope), float(y[i])) if np.abs(fit - y).max() <= tol else None


def _apply_affine(arr: np.ndarray, x0: float, slope: float, y0: float) -> np.ndarray:
    out = arr.astype(np.float32)
    out -= np.float32(x0)  # exact for integer pixels; keeps the product small so float32 stays precise
    out *= np.float32(slope)
    out += np.float32(y0)
    return np.clip(out, 0.0, 1.0, out=out)


def _build_tables(domain: np.ndarray, ds, photometric: str, kind: str | None) -> _Tables:
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(domain, ds)
    display = _voi_display(values, ds, photometric, kind)
    return _Tables(
        start=int(domain[0]),
        modality=values,
        display=display,
        display_affine=None if display is None else _fit_affine(domain, display, clipped=True),
        modality_affine=None if display is not None else _fit_affine(domain, values, clipped=False),
    )


# Every element pydicom's apply_modality_lut / apply_voi_lut read when no LUT sequence is present. Images whose raw
# bytes of these agree (same dtype, encoding, photometric) share one table over the whole stored range.
_KEY_TAGS = (0x00280004, 0x00280100, 0x00280101, 0x00280103, 0x00281050, 0x00281051, 0x00281052, 0x00281053, 0x00281056)
_LUT_SEQUENCES = (0x00283000, 0x00283010)  # Modality / VOI LUT Sequence: tables built per image instead
_TABLES: dict[tuple, _Tables] = {}
_TABLES_MAX = 32


def _tables_key(ds, dtype: np.dtype, photometric: str) -> tuple | None:
    if dtype.kind not in "iu" or dtype.itemsize > 2 or any(t in ds for t in _LUT_SEQUENCES):
        return None
    parts: list = [dtype.str, photometric, tuple(getattr(ds, "original_encoding", (None, None)))]
    for tag in _KEY_TAGS:
        elem = ds.get_item(tag)
        value = None if elem is None else elem.value
        parts.append(value if value is None or isinstance(value, (bytes, str, int, float)) else repr(value))
    return tuple(parts)


def _stored_range(ds, dtype: np.dtype) -> tuple[int, int]:
    bits = min(int(ds.get("BitsStored") or dtype.itemsize * 8), dtype.itemsize * 8)
    return (0, 2**bits - 1) if dtype.kind == "u" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _direct_intensity(arr: np.ndarray, ds, photometric: str, kind: str | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds)
    out = _voi_display(values, ds, photometric, kind)
    return out if out is not None else _finish(values, float(values.min()), float(values.max()), photometric)


def _dicom_intensity(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Modality LUT (rescale), then VOI LUT / window (first one) else min-max, to [0, 1]; MONOCHROME1 inverted.

    The chain is pointwise, so for integer pixels pydicom's helpers run on a table of stored values, not on every
    pixel (their float64 passes cost more than reading the file). Images sharing the header elements the helpers
    read share one table over the whole stored range; when that table is verified affine (rescale, linear window)
    an image costs a few float32 passes, otherwise one gather. Min-max over a table slice [min, max] equals min-max
    over the image because a rescale is monotone; a Modality LUT Sequence without VOI (possibly not monotone) goes
    the direct way.
    """
    if arr.dtype.kind not in "iu" or not arr.size:
        return _direct_intensity(arr, ds, photometric, _voi_kind(ds))
    key = _tables_key(ds, arr.dtype, photometric)
    tables = _TABLES.get(key) if key is not None else None
    if tables is None and key is not None:
        lo, hi = _stored_range(ds, arr.dtype)
        tables = _build_tables(np.arange(lo, hi + 1, dtype=arr.dtype), ds, photometric, _voi_kind(ds))
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        _TABLES[key] = tables
    if tables is not None and tables.display_affine is not None:  # a linear window is affine + clip everywhere
        return _apply_affine(arr, *tables.display_affine)
    amin, amax = int(arr.min()), int(arr.max())
    if tables is not None and tables.display is None and tables.modality_affine is not None:
        x0, slope, y0 = tables.modality_affine  # min-max of a rescale: the extremes sit at amin and amax
        lo, hi = sorted((y0 + slope * (amin - x0), y0 + slope * (amax - x0)))
        if hi == lo:
            return np.zeros(arr.shape, dtype=np.float32)
        scale = slope / (hi - lo)
        y_amin = (y0 + slope * (amin - x0) - lo) / (hi - lo)
        if photometric == "MONOCHROME1":
            scale, y_amin = -scale, 1.0 - y_amin
        return _apply_affine(arr, amin, scale, y_amin)
    if tables is None or not (tables.start <= amin and amax < tables.start + len(tables.modality)):
        kind = _voi_kind(ds)
        if amax - amin >= arr.size or (_LUT_SEQUENCES[0] in ds and kind is None):
            return _direct_intensity(arr, ds, photometric, kind)
        tables = _build_tables(np.arange(amin, amax + 1, dtype=arr.dtype), ds, photometric, kind)
    if tables.display is not None:
        table, base = tables.display, tables.start
    else:
        seg = tables.modality[amin - tables.start : amax - tables.start + 1]
        table, base = _finish(seg, float(seg.min()), float(seg.max()), photometric), amin
    # arr >= base, so unsigned subtraction cannot wrap; signed ranges may exceed the dtype, hence int32
    if arr.dtype.kind == "u":
        index = arr if base == 0 else arr - arr.dtype.type(base)
    else:
        index = np.subtract(arr, base, dtype=np.int32)
    return np.take(table, index, mode="clip")  # indices are in range by construction; "clip" skips the checks


# Elements read besides group 0x0028 (pixel module, rescale, window, VOI/Modality LUTs) on the lean path.
_META_TAGS = (
    0x00080005,  # SpecificCharacterSet (decodes the text below)
    0x00080016,  # SOPClassUID
    0x00080060,  # Modality
    0x00080070,  # Manufacturer
    0x00081090,  # ManufacturerModelName
    0x00100040,  # PatientSex
    0x00101010,  # PatientAge
)


def _check_header(ds, meta: dict, limits: ImageLimits) -> tuple[str, int]:
    """Reject what cannot become one 2-D image (a multi-frame object unless limits.multi_frame is "first", a tiny
    image), before (or without) decoding any of it."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1 and limits.multi_frame != "first":
        raise ImageError(f"multi-frame image ({frames} frames); expected a single 2-D image "
                         f"(site setting multi-frame = \"first\" would take its first frame)")
    _check_side(meta["rows"], meta["cols"])
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    return photometric, int(ds.get("SamplesPerPixel") or 1)


try:  # the header pass of pydicom's lean reader (pydicom.pixels.pixel_array), so we can check before decoding
    from pydicom.pixels import get_decoder as _get_decoder
    from pydicom.pixels.utils import _GROUP_0028, _array_common

    _LEAN_TAGS = sorted(set(_META_TAGS) | set(_GROUP_0028) | {0x7FE00001, 0x7FE00002})
except ImportError:  # a pydicom without these private helpers: every file takes the full dcmread path below
    _array_common = None


def _read_lean(f: BinaryIO, limits: ImageLimits):
    """pydicom's lean reader: parses only group 0x0028, file meta and _META_TAGS, decodes the first frame.

    ~1.5x faster than dcmread(...).pixel_array (it skips converting every other element). The header is checked
    (_check_header, then limits, then a compressed first frame's codestream header) between parsing and decoding,
    so an image refused by them is never decoded; those refusals raise ImageError. Any other failure returns None
    and the full dcmread path below, which words every rejection reason, takes over.
    Returns (ds, arr, meta, photometric, samples, the colour space arr came out in).
    """
    if _array_common is None:
        return None
    try:
        f.seek(0)
        with warnings.catch_warnings():  # a deflated dataset parses as junk here: pydicom's warnings about it
            warnings.simplefilter("ignore")
            ds, opts = _array_common(f, _LEAN_TAGS)
        if ds.file_meta.get("TransferSyntaxUID") in (None, DeflatedExplicitVRLittleEndian):  # deflated: not lean
            return None
    except Exception:
        return None
    meta = _dicom_meta(ds)
    photometric, samples = _check_header(ds, meta, limits)
    _check_dicom_limits(ds, limits)
    try:
        ts = UID(opts["transfer_syntax_uid"])
        decoder = _get_decoder(ts)
        frame = None
        if ts in _JPEG_FAMILY or ts in _J2K_FAMILY:
            pos = f.tell()
            frame = get_frame(f, 0, number_of_frames=max(int(opts.get("number_of_frames") or 1), 1),
                              extended_offsets=opts.get("extended_offsets"))
            f.seek(pos)
    except Exception:
        return None
    if frame is not None:
        _check_codestream(frame, ts, meta["rows"], meta["cols"])
    try:
        arr, space = _as_array(decoder, f, ts, int(opts.get("bits_stored") or 8), validate=True, **opts)
    except Exception:
        return None
    return ds, arr, meta, photometric, samples, space


def read_dicom(path, size: int | None = None, limits: ImageLimits | None = None) -> tuple[np.ndarray, dict]:
    """Decode one DICOM image to float32 (H, W) in [0, 1] (or size x size) plus metadata.

    Any transfer syntax an installed pydicom plugin decodes; colour becomes luminance (:func:`_luminance`); a
    multi-frame file is refused or read as its first frame (limits.multi_frame). Raises ImageError with a reason for
    anything we cannot turn into such an image, including a file or image over `limits` (default
    :data:`DEFAULT_LIMITS`), refused from fstat and the headers before pixel data are decoded.
    """
    limits = _limits(limits)
    with _open_regular(Path(path), limits.max_file_bytes) as f:
        return _read_dicom_file(f, size, limits)


def _read_dicom_file(f: BinaryIO, size: int | None, limits: ImageLimits) -> tuple[np.ndarray, dict]:
    lean = _read_lean(f, limits)
    if lean is not None:
        ds, arr, meta, photometric, samples, space = lean
    else:
        ds = _dcmread(f, limits)
        if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ImageError(f"no pixel data (SOP class {_sop_name(ds)})")
        meta = _dicom_meta(ds)
        photometric, samples = _check_header(ds, meta, limits)
        _check_dicom_limits(ds, limits)
        arr, space = _decode_pixels(ds)

    if samples > 1 or arr.ndim == 3 or photometric == "PALETTE COLOR":
        img = _luminance(arr, ds, space or photometric)
    elif arr.ndim == 2:
        img = _dicom_intensity(arr, ds, photometric)
    else:
        raise ImageError(f"unexpected pixel array shape {arr.shape}; expected a 2-D image")
    return _resize(img, size), meta


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


def _read_pil(f: BinaryIO, size: int | None, limits: ImageLimits) -> tuple[np.ndarray, dict]:
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
    else:  # RGB / RGBA
        grey = _grey_from_channels(arr, 255.0)
        if grey is None:
            raise ImageError(f"colour image, expected grayscale (mode {mode})")
        img = _normalise(grey, 0.0, 255.0)
    h, w = img.shape
    _check_side(h, w)
    meta = {c: None for c in META_COLUMNS}
    meta.update(rows=int(h), cols=int(w))
    return _resize(img, size), meta


def _has_dicom_magic(f: BinaryIO) -> bool:
    try:
        f.seek(0)
        head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path, size: int | None = None, limits: ImageLimits | None = None) -> tuple[np.ndarray, dict]:
    """Decode any supported image: .dcm/.dicom or DICOM magic -> read_dicom; .png/.jpg/.jpeg (and other raster
    formats Pillow knows) -> grayscale via PIL. Returns float32 (H, W) in [0, 1] (size x size if given) and metadata.

    The file is opened once, non-blocking, and must be a regular file within `limits` (default
    :data:`DEFAULT_LIMITS`); image sizes are checked from headers before decoding. Refusals are ImageErrors."""
    path = Path(path)
    limits = _limits(limits)
    with _open_regular(path, limits.max_file_bytes) as f:
        return _dispatch(f, path, size, limits)


def _dispatch(f: BinaryIO, path: Path, size: int | None, limits: ImageLimits) -> tuple[np.ndarray, dict]:
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or (suffix not in PIL_SUFFIXES and _has_dicom_magic(f)):
        return _read_dicom_file(f, size, limits)
    if suffix in PIL_SUFFIXES:
        return _read_pil(f, size, limits)
    try:  # unknown suffix (PACS exports often have none): Pillow formats first, then preamble-less DICOM
        return _read_pil(f, size, limits)
    except ImageError as e:
        if not str(e).startswith("unreadable image file"):
            raise
    try:
        return _read_dicom_file(f, size, limits)
    except ImageError as e:
        if str(e).startswith("not a DICOM file"):
            raise ImageError(f"unrecognised file format (neither DICOM nor an image Pillow reads): {path.name}") from e
        raise


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


def load_npz(path, split: str = "train", limits: ImageLimits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a MedMNIST .npz -> images (N, 1, H, W) float32 in [0, 1] and labels (N,) int64.

    Shapes and dtypes are checked from the .npy headers before any array is read: one image (H x W x channels) must
    be within limits.max_pixels and there must be one label per image. The number of images is not capped (real
    MedMNIST splits reach several GB); npz files are benchmark downloads, not a hospital's manifest inputs.
    """
    path = Path(path)
    limits = _limits(limits)
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
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 4 and x.shape[-1] in (3, 4):
        x = _grey_from_channels(x, top)
        if x is None:
            raise ValueError(f"{path}: {ik} are colour images, expected grayscale")
    if x.ndim != 3:
        raise ValueError(f"{path}: {ik} has shape {x.shape}, expected (N, H, W) 2-D grayscale images")
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
    return np.ascontiguousarray(images[:, None]), y.astype(np.int64)


# -------------------------------------------------------------------------------------------------------------- cache


def _cache_key(raw: bytes, paths: list[str], stamps: list[tuple[int, int]], image_size: int,
               num_classes: int | None, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    """Hash of everything the decoded stack depends on: format version, size, limits (they decide rejections),
    manifest bytes, each image's (path, size, mtime_ns)."""
    h = hashlib.sha256()
    h.update(f"equifed-cache v{CACHE_VERSION}\0size={image_size}\0classes={num_classes}\0".encode())
    h.update(f"pixels={limits.max_pixels}\0bytes={limits.max_file_bytes}\0frames={limits.multi_frame}\0".encode())
    h.update(hashlib.sha256(raw).digest())
    for p, (size, mtime_ns) in zip(paths, stamps):
        h.update(f"{p}\0{size}\0{mtime_ns}\0".encode())
    return h.hexdigest()


def _cache_file(data_dir: Path, manifest: str, image_size: int, num_classes, key: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(manifest).stem)
    return data_dir / CACHE_DIR / f"{stem}-s{image_size}-k{num_classes}-{key[:32]}.npz"


def _cache_dir_ok(cache_dir: Path) -> bool:
    """The cache folder is ours only if it is a real folder (or absent): a symlink there would make us write, and
    delete old cache files, wherever it points."""
    try:
        return stat.S_ISDIR(os.lstat(cache_dir).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _cache_load(path: Path, key: str, n_images: int, image_size: int):
    """The cached (stack, ok_rows, metas, rejected), or None. The cache lives in the (untrusted) data folder, so
    the file must be a regular file of plausible size and its arrays' headers must match what this site can
    produce (at most n_images uint16 image_size^2 images, a bounded info text) before anything is loaded."""
    info_chars = 65536 + 4096 * n_images
    max_bytes = n_images * image_size * image_size * 2 + 4 * info_chars + 65536
    if not _cache_dir_ok(path.parent):
        return None
    try:
        f = _open_regular(path, max_bytes, what="cache file")
    except ImageError as e:
        if not str(e).startswith("cache file not found"):
            log.warning("ignoring cache %s: %s", path, e)
        return None
    try:
        with f, np.load(f, allow_pickle=False) as z:
            (ishape, idtype), (tshape, tdtype) = _npz_header(z, "images"), _npz_header(z, "info")
            if (len(ishape) != 3 or ishape[0] > n_images or ishape[1:] != (image_size, image_size)
                    or idtype != np.uint16 or tshape != () or tdtype.kind != "U" or tdtype.itemsize > 4 * info_chars):
                log.warning("ignoring cache %s: unexpected arrays %s %s / %s %s", path, ishape, idtype, tshape, tdtype)
                return None
            info = json.loads(str(z["info"]))
            stack = z["images"]
    except Exception as e:  # torn or foreign file: decode again and overwrite it
        log.warning("ignoring unreadable cache %s: %s", path, e)
        return None
    if info.get("key") != key or info.get("version") != CACHE_VERSION or len(info["ok_rows"]) != len(stack):
        return None
    rejected = [Rejection(p, r, why) for p, r, why in info["rejected"]]
    return stack, info["ok_rows"], info["meta"], rejected


def _cache_save(path: Path, key: str, stack: np.ndarray, ok_rows, metas, rejected) -> None:
    """Write atomically (tmp + os.replace); a read-only data dir only means no cache, never lost data."""
    info = {
        "version": CACHE_VERSION,
        "key": key,
        "ok_rows": [int(r) for r in ok_rows],
        "meta": metas,
        "rejected": [[r.image_path, r.row, r.reason] for r in rejected],
    }
    tmp = None
    if not _cache_dir_ok(path.parent):
        log.warning("decoded-image cache not written: %s is not a plain folder", path.parent)
        return
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=stack, info=np.array(json.dumps(info)))
        os.replace(tmp, path)
        tmp = None
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(prefix + "*.npz"):  # older versions of this same cache slot
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        log.info("decoded-image cache not written (%s); the loaded data is complete", e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------- load_site


def _meta_frame(metas: list[dict]) -> pd.DataFrame:
    mf = pd.DataFrame.from_records(metas, columns=list(META_COLUMNS))
    mf["dicom_age"] = pd.to_numeric(mf["dicom_age"], errors="coerce").astype(np.float64)
    for c in ("rows", "cols"):
        mf[c] = mf[c].astype(np.int64)
    return mf


def _decode_rows(df: pd.DataFrame, paths: list[str], image_size: int, limits: ImageLimits | None = None):
    """Decode each accepted row into a preallocated uint16 stack (a big site never holds two float copies).

    Returns (stack, ok_rows, metas, rejections, transient); transient means some failure may go away without the
    file changing (permission denied, out of memory, no decoder installed), so that result must not be cached.
    """
    stack = np.empty((len(paths), image_size, image_size), dtype=np.uint16)
    ok_rows, metas, rejected, transient = [], [], [], False
    done: dict[str, tuple | str] = {}  # a path listed twice is decoded once
    # read_image(path, size) when no limits were given (the defaults), so wrappers of that call keep working
    extra = {} if limits is None else {"limits": limits}
    for row, shown, p in zip(df.index, df["image_path"], paths):
        result = done.get(p)
        if result is None:
            try:
                result = read_image(p, image_size, **extra)
            except ImageError as e:
                result = str(e)
                transient |= isinstance(e.__cause__, PermissionError) or isinstance(e, DecoderMissing)
            except Exception as e:  # one odd file must not stop a site
                result = f"unexpected error while decoding ({type(e).__name__}: {e})"
                transient = True
            done[p] = result
        if isinstance(result, str):
            rejected.append(Rejection(str(shown), int(row), result))
        else:
            stack[len(ok_rows)] = np.rint(result[0] * np.float32(_Q))
            metas.append(result[1])
            ok_rows.append(int(row))
    return stack[: len(ok_rows)], ok_rows, metas, rejected, transient


def load_site(
    data_dir,
    image_size: int = 64,
    manifest: str = "manifest.csv",
    num_classes: int = 2,
    cache: bool = True,
    limits: ImageLimits | None = None,
) -> SiteData:
    """Load a site: validate the manifest, decode every usable image at image_size, collect rejections.

    Image paths must resolve to regular files inside `data_dir` (:func:`core_models.paths.resolve_site_file`);
    files and images over `limits` (default :data:`DEFAULT_LIMITS`, see :class:`ImageLimits`) are refused from
    fstat and headers before decoding. Each such refusal is a Rejection with its reason; the rest of the site loads.
    The result is identical whether or not the cache was hit (images are quantised to 1/65535 steps either way).
    """
    if limits is not None:
        _limits(limits)  # type check now, not once per image
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = int(image_size)
    data_dir = Path(data_dir)
    manifest_path = data_dir / manifest
    raw = _read_manifest_bytes(manifest_path, limits)
    df, paths, stamps, rejected, n_rows = _parse_manifest(raw, manifest_path, num_classes, site_dir=data_dir)

    def nothing_usable(all_rejected):
        detail = "manifest has no rows" if n_rows == 0 else (
            f"{n_rows} rows, all rejected; first reasons: {_first_reasons(all_rejected)}")
        return ManifestError(f"no usable images in {data_dir}: {detail}")

    if df.empty:
        raise nothing_usable(rejected)

    key = _cache_key(raw, paths, stamps, image_size, num_classes, _limits(limits)) if cache else None
    cache_path = _cache_file(data_dir, manifest, image_size, num_classes, key) if key else None
    hit = _cache_load(cache_path, key, len(paths), image_size) if cache_path is not None else None
    if hit is not None:
        stack, ok_rows, metas, decode_rejected = hit
        log.info("%s: %d images from cache %s", data_dir, len(ok_rows), cache_path.name)
    else:
        stack, ok_rows, metas, decode_rejected, transient = _decode_rows(df, paths, image_size, limits)
        if cache_path is not None and not transient:
            _cache_save(cache_path, key, stack, ok_rows, metas, decode_rejected)

    rejected = sorted(rejected + decode_rejected, key=lambda r: (r.row is None, r.row or 0))
    if len(ok_rows) == 0:
        raise nothing_usable(rejected)

    frame = df.loc[ok_rows].reset_index(drop=True)
    mf = _meta_frame(metas)
    for c in META_COLUMNS:
        if c in frame.columns:  # the manifest's own value wins; DICOM fills its gaps
            frame[c] = frame[c].where(frame[c].notna(), mf[c])
        else:
            frame[c] = mf[c]
    out = stack.astype(np.float32)
    out *= np.float32(1.0 / _Q)
    log.info("%s: %d images, %d rejected", data_dir, len(frame), len(rejected))
    return SiteData(
        images=out[:, None],
        labels=frame["label"].to_numpy(dtype=np.int64),
        frame=frame,
        rejected=rejected,
    )
