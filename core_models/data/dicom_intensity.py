"""DICOM stored values to intensity in [0, 1]: Modality LUT (rescale), then VOI LUT / window, else min-max;
MONOCHROME1 inverted.

Apart from the file reading in :mod:`core_models.data.dicom` because it changes for other reasons (speed, pydicom's
LUT semantics): the chain runs on tables of stored values, cached per header in ``_TABLES``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from core_models.data.pixels import _normalise

log = logging.getLogger(__name__)


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
