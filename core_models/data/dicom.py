"""DICOM as PACS export it, to one grayscale image in [0, 1] (or an RGB one, channels=3) plus its acquisition
metadata.

Compressed transfer syntaxes are decoded by pydicom's pixel-data plugins (pylibjpeg with libjpeg / openjpeg / rle,
pyjpegls, Pillow); colour images (RGB, YBR_FULL / YBR_FULL_422, PALETTE COLOR) become their ITU-R BT.601 luminance,
or with channels=3 stay RGB (YBR converted to RGB, a palette looked up); multi-frame objects
are refused or reduced to their first frame, as the site's ImageLimits.multi_frame says. Sizes are checked against
ImageLimits from the header before pixel data are read; the first frame's own codestream header (JPEG SOF, JPEG 2000
SIZ) must agree with the DICOM header before a decoder sees it, and a deflated dataset may not inflate past the
file-size cap.
"""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
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

from core_models.data.dicom_intensity import _dicom_intensity
from core_models.data.limits import DecoderMissing, ImageError, ImageLimits, _limits, _mb, _open_regular
from core_models.data.pixels import _as_channels, _check_channels, _check_pixel_count, _check_side, _normalise, _resize

# ITU-R BT.601 luma weights: the Y of DICOM's YBR_FULL (PS3.3 C.7.6.3.1.2) and of pydicom's convert_color_space, so a
# YBR image's Y channel and the luminance of the same image stored as RGB agree to rounding.
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


def _colour_samples(arr: np.ndarray, ds, space: str) -> tuple[np.ndarray, str, float]:
    """(samples (H, W, 3), their colour space, the top of their range): a palette looked up to RGB (its range
    0 .. 2^(LUT bits) - 1), else the samples as decoded (0 .. 2^BitsStored - 1)."""
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
    return arr, space, top


# YBR_FULL -> RGB (PS3.3 C.7.6.3.1.2, ITU-T T.871): the inverse of the BT.601 matrix pydicom's convert_color_space
# uses, applied to (Y, Cb - half, Cr - half) in float, so any bit depth converts and nothing is rounded on the way
_YBR_TO_RGB = np.array([[1.0, 1.0, 1.0],
                        [0.0, -0.114 * 1.772 / 0.587, 1.772],
                        [1.402, -0.299 * 1.402 / 0.587, 0.0]], dtype=np.float32)


def _rgb(arr: np.ndarray, ds, space: str) -> np.ndarray:
    """A colour image as float32 RGB (3, H, W) in [0, 1]: RGB as stored, YBR_FULL / YBR_FULL_422 converted to RGB
    (what pydicom's convert_color_space does for 8 bits, here at any depth and without rounding), a palette looked
    up. Scaled by the samples' stored range, as :func:`_luminance` is, so a grey image stored as RGB keeps its
    values exactly in every channel."""
    arr, space, top = _colour_samples(arr, ds, space)
    if space in ("YBR_FULL", "YBR_FULL_422"):
        half = (top + 1.0) / 2.0
        ybr = arr.astype(np.float32) - np.array([0.0, half, half], dtype=np.float32)
        rgb = ybr @ _YBR_TO_RGB
    elif space == "RGB":
        rgb = arr
    else:
        raise ImageError(f"colour space {space or 'unknown'} (SamplesPerPixel 3) is not supported")
    return np.ascontiguousarray(_normalise(rgb, 0.0, top).transpose(2, 0, 1))


def _luminance(arr: np.ndarray, ds, space: str) -> np.ndarray:
    """A colour image's luminance in [0, 1]: the ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B of RGB (a palette
    is looked up to RGB first), and the Y channel itself of YBR_FULL / YBR_FULL_422 (the same Y by definition).
    Colour samples are display values, so the scale is their stored range (0 .. 2^BitsStored - 1; a palette's
    0 .. 2^(LUT bits) - 1), not the image's own min-max; a grey image stored as RGB keeps its grey values exactly."""
    arr, space, top = _colour_samples(arr, ds, space)
    if space in ("YBR_FULL", "YBR_FULL_422"):
        luma = arr[..., 0].astype(np.float32)
    elif space == "RGB":
        luma = arr.astype(np.float32) @ _BT601
    else:
        raise ImageError(f"colour space {space or 'unknown'} (SamplesPerPixel 3) is not supported")
    return _normalise(luma, 0.0, top)


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


def read_dicom(path, size: int | None = None, limits: ImageLimits | None = None,
               channels: int = 1) -> tuple[np.ndarray, dict]:
    """Decode one DICOM image to float32 (H, W) in [0, 1] (or size x size) plus metadata.

    Any transfer syntax an installed pydicom plugin decodes; colour becomes luminance (:func:`_luminance`); a
    multi-frame file is refused or read as its first frame (limits.multi_frame). Raises ImageError with a reason for
    anything we cannot turn into such an image, including a file or image over `limits` (default
    :data:`DEFAULT_LIMITS`), refused from fstat and the headers before pixel data are decoded.
    ``channels=3``: float32 (3, H, W) RGB instead (:func:`_rgb`); a grey image replicated to the three channels.
    """
    limits = _limits(limits)
    channels = _check_channels(channels)
    with _open_regular(Path(path), limits.max_file_bytes) as f:
        return _read_dicom_file(f, size, limits, channels)


def _read_dicom_file(f: BinaryIO, size: int | None, limits: ImageLimits,
                     channels: int = 1) -> tuple[np.ndarray, dict]:
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
        img = (_rgb if channels == 3 else _luminance)(arr, ds, space or photometric)
    elif arr.ndim == 2:
        img = _dicom_intensity(arr, ds, photometric)
    else:
        raise ImageError(f"unexpected pixel array shape {arr.shape}; expected a 2-D image")
    return _as_channels(_resize(img, size), channels), meta
