"""CT and MR volumes as sites export them (a DICOM series folder, or one ``.nii`` / ``.nii.gz`` file) to float32
(1, S, S, S) in [0, 1], oriented RAS, plus the acquisition metadata of :data:`META_COLUMNS`.

A series is assembled from its headers alone before any pixel data are decoded: one SeriesInstanceUID, slices sorted
by ImagePositionPatient projected on the slice normal (not by InstanceNumber, which exporters renumber), one
orientation, pixel spacing and slice size, evenly spaced positions. Anything else (a mixed folder, a missing or
duplicated slice, a tilted or uneven stack, a NIfTI with an unusable affine, a 4-D file) is an ImageError naming what
is wrong, as for a bad 2-D file, and the caps of :class:`ImageLimits` (files, voxels, bytes) are checked from the
headers first. CT intensities are Hounsfield units (RescaleSlope / Intercept) under a configured window; MR, which has
no absolute scale, is scaled between intensity percentiles. Orientation and resampling are MONAI's transforms.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from core_models.data.dicom import (
    _J2K_FAMILY,
    _JPEG_FAMILY,
    _META_TAGS,
    _as_array,
    _check_codestream,
    _dicom_meta,
)
from core_models.data.limits import DecoderMissing, ImageError, ImageLimits, _limits, _mb, _open_regular
from core_models.data.pixels import META_COLUMNS, MIN_SIDE, _check_pixel_count, _check_side

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MIN_SLICES = 2
# Named CT windows (centre, width) in HU; "none" scales between intensity percentiles (MR, or CT without a window).
WINDOWS = {"none": None, "soft-tissue": (40.0, 400.0), "brain": (40.0, 80.0), "lung": (-600.0, 1500.0),
           "bone": (400.0, 1800.0)}
_SERIES_TAGS = (0x0020000E, 0x00200013, 0x00200032, 0x00200037)  # SeriesInstanceUID, InstanceNumber, IPP, IOP
_FORMAT = 2  # bump when reading or resampling changes, so cached volumes are never stale
_MAX_NIFTI_OFFSET = 16 * 1024**2  # header + extensions before the voxels; real files have a few kB


@dataclass(frozen=True)
class VolumeSettings:
    """How a volume becomes the model's (1, S, S, S) input; S is load_site's image_size.

    window_center, window_width: a CT window in HU (both, or neither). Neither: each volume is scaled between its
        `percentiles` of intensity (MR, whose values have no absolute unit; (0, 100) is min-max).
    spacing: isotropic target spacing in mm: the volume is resampled to it, then centre-cropped or zero-padded to
        S^3 (physical size kept, so a structure is the same size in every site's volumes). None: the whole volume
        is resized to S^3 (every volume fills the grid, aspect not kept).
    """

    window_center: float | None = None
    window_width: float | None = None
    spacing: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self):
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("VolumeSettings: give both window_center and window_width, or neither")
        if self.window_center is not None and not (math.isfinite(self.window_center)
                                                   and math.isfinite(self.window_width) and self.window_width > 0):
            raise ValueError(f"VolumeSettings: bad window {self.window_center!r} / {self.window_width!r}")
        if self.spacing is not None and not (math.isfinite(self.spacing) and self.spacing > 0):
            raise ValueError(f"VolumeSettings.spacing must be a positive number of mm, got {self.spacing!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"VolumeSettings.percentiles must satisfy 0 <= lower < upper <= 100, got {lo}, {hi}")

    @classmethod
    def from_window(cls, window: str, **kwargs) -> VolumeSettings:
        """From a configured window: a name of :data:`WINDOWS` ("none", "lung", ...) or "centre,width" in HU."""
        text = str(window).strip().lower()
        if text in WINDOWS:
            pair = WINDOWS[text]
        else:
            try:
                pair = tuple(float(v) for v in text.split(","))
            except ValueError:
                pair = ()
            if len(pair) != 2:
                raise ValueError(f"window must be one of {', '.join(WINDOWS)} or 'centre,width', got {window!r}")
        center, width = pair if pair is not None else (None, None)
        return cls(window_center=center, window_width=width, **kwargs)

    @property
    def key(self) -> str:
        """Everything that changes the output, for the cache key."""
        return (f"volumes v{_FORMAT}\0window={self.window_center},{self.window_width}\0spacing={self.spacing}\0"
                f"percentiles={self.percentiles[0]},{self.percentiles[1]}")


def _is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def volume_files(site_dir, path, limits: ImageLimits | None = None) -> list[tuple[str, int, int]]:
    """The files a volume path names, as (real path, size, mtime_ns): the NIfTI file itself, or every file directly
    in a series folder (names starting with "." skipped: exporters' .DS_Store and the like), each resolved (symlinks
    followed) and required to be a regular file inside `site_dir`. The folder may hold at most limits.max_slices
    files and limits.max_volume_bytes in all, checked from stat before anything is read."""
    limits = _limits(limits)
    base = Path(site_dir).resolve()

    def inside(p: str) -> Path:
        real = Path(os.path.realpath(p))
        if real != base and base not in real.parents:
            raise ImageError(f"volume path points outside the site folder: {p}")
        return real

    target = inside(str(path))
    try:
        st = os.stat(target)
    except OSError:
        raise ImageError(f"volume not found: {path}") from None
    if stat.S_ISREG(st.st_mode):
        if not _is_nifti(target):
            raise ImageError(f"not a volume: {Path(str(path)).name} (expected a DICOM series folder or a "
                             f"{' / '.join(NIFTI_SUFFIXES)} file)")
        return [(str(target), st.st_size, st.st_mtime_ns)]
    if not stat.S_ISDIR(st.st_mode):
        raise ImageError(f"not a regular file or folder (a device or FIFO): {path}")
    files, total = [], 0
    with os.scandir(target) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if len(files) >= limits.max_slices:
                raise ImageError(f"series folder has more than {limits.max_slices} files (the limit per volume)")
            real = inside(entry.path)
            try:
                est = os.stat(real)
            except OSError:
                raise ImageError(f"series file not found: {entry.name}") from None
            if stat.S_ISDIR(est.st_mode):
                raise ImageError(f"series folder holds a subfolder ({entry.name}); expected the slices of one series")
            if not stat.S_ISREG(est.st_mode):
                raise ImageError(f"not a regular file (a device or FIFO) in the series folder: {entry.name}")
            total += est.st_size
            files.append((str(real), est.st_size, est.st_mtime_ns))
    if total > limits.max_volume_bytes:
        raise ImageError(f"series too large: {_mb(total)} in {len(files)} files (limit {_mb(limits.max_volume_bytes)} "
                         f"per volume)")
    if not files:
        raise ImageError("empty series folder")
    return sorted(files)


# --- DICOM series ------------------------------------------------------------------------------------------------

try:
    from pydicom.pixels import get_decoder as _get_decoder
    from pydicom.pixels.utils import _GROUP_0028, _array_common

    _HEADER_TAGS = sorted(set(_META_TAGS) | set(_SERIES_TAGS) | set(_GROUP_0028) | {0x7FE00001, 0x7FE00002})
except ImportError:  # pragma: no cover - pydicom < 3
    _array_common = None


@dataclass(frozen=True)
class _Slice:
    """One file's header: where its pixel data start, how to decode them, and where the slice lies."""

    path: str
    stamp: tuple[int, int]  # (size, mtime_ns) when listed: the file must be the same when its pixels are read
    offset: int
    opts: dict
    series: str
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    meta: dict


def _floats(ds, keyword: str, n: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in ds[keyword].value)
    except Exception:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ImageError(f"{name}: no usable {keyword}")
    return values


def _read_header(path: str, stamp: tuple[int, int], limits: ImageLimits) -> _Slice:
    """One slice's header (pydicom's lean parse: file meta, group 0x0028 and the tags we use), stopping at the pixel
    data, whose value offset and decoding options are kept for later."""
    name = Path(path).name
    if _array_common is None:  # pragma: no cover
        raise ImageError("DICOM series need pydicom >= 3")
    with _open_regular(path, limits.max_file_bytes) as f:
        try:
            ds, opts = _array_common(f, _HEADER_TAGS)
            offset = f.tell()
        except Exception as e:
            why = " ".join(str(e).split())[:200]
            raise ImageError(f"not a readable DICOM image: {name} ({type(e).__name__}: {why})") from e
    if opts.get("transfer_syntax_uid") == "1.2.840.10008.1.2.1.99":
        raise ImageError(f"deflated DICOM in a series ({name}) is not read")
    frames = int(opts.get("number_of_frames") or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({name}, {frames} frames): a volume stored as one file is not read; "
                         f"export the series as one file per slice")
    if int(opts.get("samples_per_pixel") or 1) != 1:
        raise ImageError(f"colour DICOM ({name}, {opts.get('samples_per_pixel')} samples per pixel) in a series")
    meta = _dicom_meta(ds)
    _check_side(meta["rows"], meta["cols"])
    _check_pixel_count(meta["rows"], meta["cols"], 1, 1, limits)
    series = str(ds.get("SeriesInstanceUID") or "").strip()
    if not series:
        raise ImageError(f"{name}: no SeriesInstanceUID")
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise ImageError(f"{name}: malformed RescaleSlope / RescaleIntercept") from None
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise ImageError(f"{name}: unusable RescaleSlope / RescaleIntercept ({slope}, {intercept})")
    spacing = _floats(ds, "PixelSpacing", 2, name)
    if min(spacing) <= 0:
        raise ImageError(f"{name}: PixelSpacing must be positive, got {spacing}")
    return _Slice(path, stamp, offset, opts, series, _floats(ds, "ImagePositionPatient", 3, name),
                  _floats(ds, "ImageOrientationPatient", 6, name), spacing, meta["rows"], meta["cols"], slope,
                  intercept, meta)


def _same(values, atol: float) -> bool:
    a = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.abs(a - a[0]) <= atol))


def _assemble(slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """The slices in order along the slice normal and the volume's LPS affine (voxel (column, row, slice) -> mm), or
    an ImageError saying why they are not one evenly spaced volume."""
    if len(slices) < MIN_SLICES:
        raise ImageError(f"{len(slices)} slice(s); a volume needs at least {MIN_SLICES}")
    uids = sorted({s.series for s in slices})
    if len(uids) > 1:
        counts = ", ".join(f"{u} ({sum(s.series == u for s in slices)} files)" for u in uids[:3])
        raise ImageError(f"mixed series in one folder: {len(uids)} SeriesInstanceUIDs: {counts}"
                         + (", ..." if len(uids) > 3 else ""))
    if len({(s.rows, s.cols) for s in slices}) > 1:
        raise ImageError(f"inconsistent slice size across the series: {sorted({(s.rows, s.cols) for s in slices})}")
    if not _same([s.orientation for s in slices], 1e-4):
        raise ImageError("inconsistent orientation across slices (ImageOrientationPatient differs)")
    if not _same([s.pixel_spacing for s in slices], 1e-4 * max(slices[0].pixel_spacing)):
        raise ImageError("inconsistent pixel spacing across slices: "
                         f"{sorted({s.pixel_spacing for s in slices})[:3]}")
    iop = np.asarray(slices[0].orientation)
    row_dir, col_dir = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3
            or abs(row_dir @ col_dir) > 1e-3):
        raise ImageError(f"ImageOrientationPatient is not two orthogonal unit vectors: {slices[0].orientation}")
    normal = np.cross(row_dir, col_dir)
    pos = np.asarray([s.position for s in slices])
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    slices, pos, depth = [slices[i] for i in order], pos[order], depth[order]
    d_row, d_col = slices[0].pixel_spacing  # DICOM PixelSpacing: (between rows, between columns)
    drift = (pos - pos[0]) @ np.stack([row_dir, col_dir], axis=1)
    if np.abs(drift).max() > 0.05 * min(d_row, d_col) + 1e-3:
        raise ImageError("slices are not stacked along the slice normal (gantry tilt or shifted slices): in-plane "
                         f"offsets up to {np.abs(drift).max():.3g} mm")
    gaps = np.diff(depth)
    tol = 1e-3 + 0.01 * float(np.median(gaps))
    if gaps.min() <= tol:
        i = int(np.argmin(gaps))
        raise ImageError(f"duplicated slice position {depth[i]:.4g} mm along the normal "
                         f"({Path(slices[i].path).name}, {Path(slices[i + 1].path).name})")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / step
        if round(ratio) >= 2 and abs(ratio - round(ratio)) * step <= tol:
            raise ImageError(f"missing slice: a gap of {gaps[i]:.4g} mm between positions {depth[i]:.4g} and "
                             f"{depth[i + 1]:.4g} where slices are {step:.4g} mm apart "
                             f"({round(ratio) - 1} slice(s) missing)")
        raise ImageError(f"inconsistent slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm")
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row_dir * d_col, col_dir * d_row, normal * step, pos[0]
    return slices, affine


def _decode_slice(s: _Slice, limits: ImageLimits) -> np.ndarray:
    """One slice's stored values (rows, cols), from the pixel data offset found by the header pass."""
    name = Path(s.path).name
    with _open_regular(s.path, limits.max_file_bytes) as f:
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns) != s.stamp:
            raise ImageError(f"series file changed while being read: {name}")
        decoder = None
        try:
            ts = s.opts["transfer_syntax_uid"]
            decoder = _get_decoder(ts)
            f.seek(s.offset)
            if ts in _JPEG_FAMILY or ts in _J2K_FAMILY:
                from pydicom.encaps import get_frame

                frame = get_frame(f, 0, number_of_frames=1, extended_offsets=s.opts.get("extended_offsets"))
                _check_codestream(frame, ts, s.rows, s.cols)
                f.seek(s.offset)
            arr, _ = _as_array(decoder, f, ts, int(s.opts.get("bits_stored") or 8), validate=True, **s.opts)
        except (ImageError, MemoryError):
            raise  # out of memory is transient: never cached as the series' rejection
        except Exception as e:
            if not getattr(decoder, "is_available", True):  # a plugin the site can install: not the file's fault
                raise DecoderMissing(f"{name}: compressed transfer syntax {ts}: no decoder available (needs one "
                                     f"of: {'; '.join(decoder.missing_dependencies)})") from e
            raise ImageError(f"cannot decode pixel data of {name} ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from e
    if arr.shape != (s.rows, s.cols):
        raise ImageError(f"unexpected pixel array shape {arr.shape} in {name}")
    return arr


def _read_series(files: list[tuple[str, int, int]], limits: ImageLimits, settings: VolumeSettings):
    """A series folder's voxels (columns, rows, slices) in rescaled units (HU for CT), its RAS affine and the first
    slice's metadata. Every header is read and checked before any pixel data are decoded."""
    slices = [_read_header(p, (size, mtime), limits) for p, size, mtime in files]
    slices, affine = _assemble(slices)
    voxels = slices[0].rows * slices[0].cols * len(slices)
    if voxels > limits.max_voxels:
        raise ImageError(f"volume too large: {slices[0].cols} x {slices[0].rows} x {len(slices)} = {voxels:,} voxels "
                         f"(limit {limits.max_voxels:,} per volume)")
    modality = slices[0].meta.get("modality")
    if settings.window_center is not None and modality not in (None, "CT"):
        raise ImageError(f"a CT window (HU) was configured but the series is {modality}; MR and other modalities "
                         f"need window \"none\" (percentile scaling)")
    vol = np.empty((slices[0].cols, slices[0].rows, len(slices)), dtype=np.float32)
    for k, s in enumerate(slices):
        plane = vol[:, :, k]
        plane[...] = _decode_slice(s, limits).T
        if s.slope != 1.0 or s.intercept != 0.0:
            plane *= np.float32(s.slope)
            plane += np.float32(s.intercept)
    return vol, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, slices[0].meta  # DICOM's LPS -> RAS


# --- NIfTI -------------------------------------------------------------------------------------------------------

def _read_nifti(path: str, stamp: tuple[int, int], limits: ImageLimits):
    """A NIfTI-1/2 file's voxels (x, y, z) scaled by scl_slope/inter, and its affine (nibabel's best: sform, else
    qform). The header is checked (dimensions, data type, caps, affine) before a voxel is read, and a .nii.gz is
    inflated only as far as the header says the voxels reach, so a gzip bomb costs nothing.

    An uncompressed .nii is its voxels plus a header, so its file is capped like the voxels (max_volume_bytes, plus
    the header allowance), not by max_file_bytes: a 512 x 512 x 1024 int16 CT is 512 MiB and a few bytes. A .nii.gz
    keeps max_file_bytes (its compressed size says nothing of the voxels, which max_volume_bytes caps once inflated).
    The in-plane size (x * y) is one image under max_pixels and the slices (z) are under max_slices, as for a series.
    """
    import nibabel as nib

    name = Path(path).name
    gzipped = name.lower().endswith(".gz")
    cap = limits.max_file_bytes if gzipped else limits.max_volume_bytes + _MAX_NIFTI_OFFSET
    with _open_regular(path, cap, what="volume file") as raw:
        st = os.fstat(raw.fileno())
        if (st.st_size, st.st_mtime_ns) != stamp:
            raise ImageError(f"volume file changed while being read: {name}")
        f: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        try:
            head = f.read(540)
            sizeof = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
            if sizeof not in (348, 540):
                sizeof = int.from_bytes(head[:4], "big") if len(head) >= 4 else 0
            klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(sizeof)
            if klass is None or len(head) < sizeof:
                raise ImageError(f"not a NIfTI file: {name}")
            hdr = klass(head[:sizeof], check=False)
            magic = bytes(hdr["magic"]).rstrip(b"\0")
            if magic in (b"ni1", b"ni2"):
                raise ImageError(f"{name}: a NIfTI header with a separate .img file is not read; save it as .nii")
            if magic not in (b"n+1", b"n+2"):
                raise ImageError(f"not a NIfTI file: {name} (magic {magic!r})")
            shape = tuple(int(d) for d in hdr.get_data_shape())
            if len(shape) > 3 and any(d > 1 for d in shape[3:]):
                raise ImageError(f"{len(shape)}-D image {shape} (a time series or several volumes); expected one "
                                 f"3-D volume")
            shape = (shape + (1, 1, 1))[:3]
            if shape[2] < MIN_SLICES or min(shape[:2]) < MIN_SIDE:
                raise ImageError(f"not a volume: shape {shape} (need at least {MIN_SIDE} x {MIN_SIDE} x {MIN_SLICES})")
            dtype = hdr.get_data_dtype()
            if dtype.kind not in "iuf" or dtype.fields is not None:
                raise ImageError(f"unsupported NIfTI data type {dtype} in {name}")
            _check_pixel_count(shape[1], shape[0], 1, 1, limits)
            if shape[2] > limits.max_slices:
                raise ImageError(f"volume has {shape[2]} slices, more than {limits.max_slices} (the limit per volume)")
            voxels = math.prod(shape)
            if voxels > limits.max_voxels:
                raise ImageError(f"volume too large: {' x '.join(map(str, shape))} = {voxels:,} voxels "
                                 f"(limit {limits.max_voxels:,} per volume)")
            nbytes = voxels * dtype.itemsize
            if nbytes > limits.max_volume_bytes:
                raise ImageError(f"volume too large: {_mb(nbytes)} of voxels (limit {_mb(limits.max_volume_bytes)})")
            affine = hdr.get_best_affine()
            if not np.all(np.isfinite(affine)):
                raise ImageError(f"bad affine in {name}: non-finite values")
            if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
                raise ImageError(f"bad affine in {name}: singular (determinant {np.linalg.det(affine[:3, :3]):.3g})")
            offset = int(hdr.get_data_offset())
            if not sizeof <= offset <= _MAX_NIFTI_OFFSET:
                raise ImageError(f"{name}: voxel offset {offset} out of range")
            f.seek(offset)
            data = f.read(nbytes)
        except ImageError:
            raise
        except (OSError, EOFError, zlib.error, ValueError) as e:
            raise ImageError(f"unreadable NIfTI file {name} ({type(e).__name__}: {e})") from e
    if len(data) != nbytes:
        raise ImageError(f"truncated NIfTI file {name}: {len(data)} of {nbytes} voxel bytes")
    vol = np.frombuffer(data, dtype=dtype).reshape(shape, order="F").astype(np.float32)
    slope, inter = hdr.get_slope_inter()
    if slope is not None and (slope, inter or 0.0) != (1.0, 0.0):
        vol *= np.float32(slope)
        vol += np.float32(inter or 0.0)
    meta = dict.fromkeys(META_COLUMNS)
    meta.update(rows=shape[1], cols=shape[0])
    return vol, affine, meta


# --- to the model's grid -----------------------------------------------------------------------------------------

def _to_grid(vol: np.ndarray, affine: np.ndarray, side: int, settings: VolumeSettings) -> np.ndarray:
    """(x, y, z) voxels + RAS affine -> float32 (1, S, S, S) in [0, 1]: oriented RAS, intensities windowed or
    percentile-scaled, resampled (MONAI's Orientation, ScaleIntensityRange(Percentiles), Spacing / Resize)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        Orientation,
        Resize,
        ResizeWithPadOrCrop,
        ScaleIntensityRange,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    if not np.all(np.isfinite(vol)):
        raise ImageError("non-finite voxel values (NaN or infinity)")
    img = MetaTensor(torch.from_numpy(vol)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    if settings.window_center is not None:
        lo = settings.window_center - settings.window_width / 2
        img = ScaleIntensityRange(a_min=lo, a_max=lo + settings.window_width, b_min=0.0, b_max=1.0, clip=True)(img)
    else:
        lower, upper = settings.percentiles
        img = ScaleIntensityRangePercentiles(lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True)(img)
    if settings.spacing is not None:
        img = Spacing(pixdim=(settings.spacing,) * 3, mode="bilinear", padding_mode="zeros")(img)
        img = ResizeWithPadOrCrop((side, side, side), mode="constant")(img)
    elif any(n < side for n in img.shape[1:]):  # some axis grows: trilinear, smoothed along the axes that shrink
        img = Resize((side, side, side), mode="trilinear", anti_aliasing=True)(img)
    else:  # every axis shrinks: area averaging
        img = Resize((side, side, side), mode="area")(img)
    out = img.as_tensor().numpy().astype(np.float32, copy=False)
    return np.clip(out, 0.0, 1.0, out=out)


def read_volume(path, side: int, settings: VolumeSettings | None = None, limits: ImageLimits | None = None,
                site_dir=None, files: list[tuple[str, int, int]] | None = None) -> tuple[np.ndarray, dict]:
    """A DICOM series folder or NIfTI file -> (float32 (1, side, side, side) in [0, 1], metadata of META_COLUMNS).

    `files`: the listing :func:`volume_files` gave (load_site passes the one its cache key was made from); by default
    the path is listed now, and must lie inside `site_dir` (default: its own folder). Raises ImageError with the
    reason for anything that is not one usable volume.
    """
    settings = settings or VolumeSettings()
    limits = _limits(limits)
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
        raise ValueError(f"side must be a positive integer, got {side!r}")
    if files is None:
        p = Path(path)
        files = volume_files(site_dir if site_dir is not None else (p if p.is_dir() else p.parent), p, limits)
    if len(files) == 1 and _is_nifti(files[0][0]) and not Path(path).is_dir():
        vol, affine, meta = _read_nifti(files[0][0], (files[0][1], files[0][2]), limits)
    else:
        vol, affine, meta = _read_series(files, limits, settings)
    return _to_grid(vol, affine, int(side), settings), meta


def names_volumes(site_dir, manifest: str = "manifest.csv") -> bool:
    """Whether a site's manifest names studies (every image_path a folder or a NIfTI file) rather than images: how
    a site's folder is checked before any run says dims = 3. Unreadable manifests answer False (the image
    reader then says what is wrong)."""
    import pandas as pd

    try:
        paths = pd.read_csv(Path(site_dir) / manifest, usecols=["image_path"], dtype=str)["image_path"].dropna()
    except (OSError, ValueError):
        return False
    return len(paths) > 0 and all(_is_nifti(p.strip()) or (Path(site_dir) / p.strip()).is_dir() for p in paths)
