"""load_site: a site folder to what everything downstream (splits, training, shift statistics, fairness audits)
needs from it: grayscale images in [0, 1] where bright means dense on every scanner (or, with channels=3, RGB images
for colour modalities: dermoscopy, fundus photographs, pathology tiles), integer labels, and the manifest rows that
survived, with the acquisition metadata (manufacturer, model, ...) that explains site shift. With
``volume=VolumeSettings(...)`` every row names a CT / MR volume instead (a DICOM series folder or a NIfTI file) and
the images are (N, 1, S, S, S).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core_models.data.cache import _cache_file, _cache_key, _cache_load, _cache_save
from core_models.data.images import read_image
from core_models.data.limits import DecoderMissing, ImageError, ImageLimits, ManifestError, _limits
from core_models.data.manifest import _NO_LABEL, Rejection, _first_reasons, _parse_manifest, _read_manifest_bytes
from core_models.data.pixels import META_COLUMNS, _check_channels
from core_models.data.volumes import VolumeSettings, read_volume, volume_files

log = logging.getLogger(__name__)

_Q = 65535.0  # images are quantised to uint16 steps (error <= 7.7e-6) so cached and fresh loads are bit-identical


@dataclass
class SiteData:
    images: np.ndarray  # (N, C, S, S) float32 in [0, 1]; C = 1 (grey) or 3 (RGB: load_site(channels=3));
    # volumes (load_site(volume=...)): (N, 1, S, S, S)
    labels: np.ndarray  # (N,) int64
    frame: pd.DataFrame  # accepted labelled manifest rows (index reset) + META_COLUMNS
    rejected: list[Rejection]
    # Rows without a label, kept only by load_site(unlabelled=True): for a self-supervised pretext phase, never for
    # anything that needs labels. (N_u, C, S, S) float32 in [0, 1]; left out, (0, C, S, S) with C, S from `images`.
    unlabelled: np.ndarray | None = None
    # Their manifest rows (index reset, no `label` column) + META_COLUMNS; left out, empty.
    unlabelled_frame: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __post_init__(self):
        if self.unlabelled is None:
            ndim = getattr(self.images, "ndim", 0)
            side, channels = (self.images.shape[-1], self.images.shape[1]) if ndim in (4, 5) else (0, 1)
            self.unlabelled = np.empty((0, channels, *(side,) * (3 if ndim == 5 else 2)), dtype=np.float32)


def _meta_frame(metas: list[dict]) -> pd.DataFrame:
    mf = pd.DataFrame.from_records(metas, columns=list(META_COLUMNS))
    mf["dicom_age"] = pd.to_numeric(mf["dicom_age"], errors="coerce").astype(np.float64)
    for c in ("rows", "cols"):
        mf[c] = mf[c].astype(np.int64)
    return mf


def _decode_rows(df: pd.DataFrame, paths: list[str], image_size: int, limits: ImageLimits | None = None,
                 channels: int = 1, read: Callable[[str], tuple[np.ndarray, dict]] | None = None):
    """Decode each accepted row into a preallocated uint16 stack (a big site never holds two float copies):
    (N, S, S) grey, (N, 3, S, S) with channels=3, (N, S, S, S) with `read` (a volume reader: path -> (1, S, S, S)).

    Returns (stack, ok_rows, metas, rejections, transient); transient means some failure may go away without the
    file changing (permission denied, out of memory, no decoder installed), so that result must not be cached.
    """
    plane = ((image_size,) * 3 if read is not None else (image_size, image_size) if channels == 1
             else (channels, image_size, image_size))
    stack = np.empty((len(paths), *plane), dtype=np.uint16)
    ok_rows, metas, rejected, transient = [], [], [], False
    done: dict[str, tuple | str] = {}  # a path listed twice is decoded once
    # read_image(path, size) when no limits were given (the defaults) and grey is asked for, so wrappers of that
    # call keep working
    extra = ({} if limits is None else {"limits": limits}) | ({} if channels == 1 else {"channels": channels})
    if read is None:
        def read(p):
            return read_image(p, image_size, **extra)
    for row, shown, p in zip(df.index, df["image_path"], paths):
        result = done.get(p)
        if result is None:
            try:
                result = read(p)
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
            stack[len(ok_rows)] = np.rint(result[0].reshape(plane) * np.float32(_Q))
            metas.append(result[1])
            ok_rows.append(int(row))
    return stack[: len(ok_rows)], ok_rows, metas, rejected, transient


def _volume_locator(limits: ImageLimits):
    """_parse_manifest's `locate` for a volume site: a series folder or NIfTI file inside the site, listed now
    (:func:`volume_files`); that listing (every file's size and mtime_ns) is what the cache key covers and what is
    read."""
    def locate(site: str, target: str) -> tuple[str, list[tuple[str, int, int]]]:
        full = os.path.join(site, target)
        return os.path.realpath(full), volume_files(site, full, limits)
    return locate


def load_site(
    data_dir,
    image_size: int = 64,
    manifest: str = "manifest.csv",
    num_classes: int = 2,
    cache: bool = True,
    limits: ImageLimits | None = None,
    unlabelled: bool = False,
    channels: int = 1,
    volume: VolumeSettings | None = None,
) -> SiteData:
    """Load a site: validate the manifest, decode every usable image at image_size, collect rejections.

    A row with an empty label cell is rejected ("missing label") unless `unlabelled`: then it is kept, through the
    same path checks and decoding as any row, in ``unlabelled`` / ``unlabelled_frame`` (for a self-supervised
    pretext phase only), while ``images``, ``labels`` and ``frame`` hold the labelled rows alone. A site of only
    unlabelled rows then loads (with an empty ``frame``); it is still a ManifestError without `unlabelled`.

    Image paths must resolve to regular files inside `data_dir` (:func:`core_models.paths.resolve_site_file`);
    files and images over `limits` (default :data:`DEFAULT_LIMITS`, see :class:`ImageLimits`) are refused from
    fstat and headers before decoding. Each such refusal is a Rejection with its reason; the rest of the site loads.
    The result is identical whether or not the cache was hit (images are quantised to 1/65535 steps either way).

    ``channels=3`` (run config in-channels=3) gives RGB images (N, 3, S, S): colour PNG/JPEG and DICOM keep their
    colour (which channels=1 refuses or reduces to luminance, see :func:`read_image`), grey images are replicated to
    three channels; it is part of the cache key, so grey and RGB loads of one site have their own cache files.

    ``volume``: every row names a CT / MR volume (a DICOM series folder or a ``.nii`` / ``.nii.gz`` file, see
    :func:`core_models.data.volumes.read_volume`), read with these settings onto an image_size^3 grid: images are
    (N, 1, S, S, S). A row that is not one usable volume is a Rejection with its reason. The cache key covers every
    file of every volume (size, mtime_ns), the settings and the volume caps of `limits`.
    """
    channels = _check_channels(channels)
    if volume is not None:
        if not isinstance(volume, VolumeSettings):
            raise TypeError(f"volume must be a VolumeSettings, got {type(volume).__name__}")
        if channels != 1:
            raise ValueError("volumes are grey: channels must be 1")
    if limits is not None:
        _limits(limits)  # type check now, not once per image
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = int(image_size)
    data_dir = Path(data_dir)
    manifest_path = data_dir / manifest
    raw = _read_manifest_bytes(manifest_path, limits)
    read, settings_key = None, None
    if volume is None:
        df, paths, stamps, rejected, n_rows = _parse_manifest(raw, manifest_path, num_classes, site_dir=data_dir,
                                                              unlabelled=unlabelled)
        key_paths = paths
    else:
        df, paths, listings, rejected, n_rows = _parse_manifest(raw, manifest_path, num_classes, site_dir=data_dir,
                                                                unlabelled=unlabelled,
                                                                locate=_volume_locator(_limits(limits)))
        listing = dict(zip(paths, listings))
        key_paths = [p for files in listings for p, _, _ in files]
        stamps = [(size, mtime) for files in listings for _, size, mtime in files]
        settings_key = volume.key

        def read(p):
            return read_volume(p, image_size, volume, limits, files=listing[p])

    def nothing_usable(all_rejected):
        detail = "manifest has no rows" if n_rows == 0 else (
            f"{n_rows} rows, all rejected; first reasons: {_first_reasons(all_rejected)}")
        return ManifestError(f"no usable images in {data_dir}: {detail}")

    if df.empty:
        raise nothing_usable(rejected)

    key = (_cache_key(raw, key_paths, stamps, image_size, num_classes, _limits(limits), unlabelled, channels,
                      settings_key) if cache else None)
    cache_path = (_cache_file(data_dir, manifest, image_size, num_classes, key, unlabelled, channels,
                              volume is not None) if key else None)
    hit = (_cache_load(cache_path, key, len(paths), image_size, channels, volume is not None)
           if cache_path is not None else None)
    if hit is not None:
        stack, ok_rows, metas, decode_rejected = hit
        log.info("%s: %d images from cache %s", data_dir, len(ok_rows), cache_path.name)
    else:
        stack, ok_rows, metas, decode_rejected, transient = _decode_rows(df, paths, image_size, limits, channels,
                                                                         read)
        if cache_path is not None and not transient:
            _cache_save(cache_path, key, stack, ok_rows, metas, decode_rejected)

    rejected = sorted(rejected + decode_rejected, key=lambda r: (r.row is None, r.row or 0))
    colour = sum(r.reason.startswith("colour image") for r in decode_rejected)
    if colour:
        log.warning("%s: %d colour image(s) refused as grey (in-channels=1); set run config in-channels=3 to train "
                    "on them in colour", data_dir, colour)
    if len(ok_rows) == 0:
        raise nothing_usable(rejected)
    if channels == 3 and np.array_equal(stack[:, 0], stack[:, 1]) and np.array_equal(stack[:, 0], stack[:, 2]):
        log.warning("%s: in-channels=3 but all %d images are grey (each replicated to 3 channels); in-channels=1 "
                    "trains on the same pixels with a third of the first layer's inputs", data_dir, len(ok_rows))

    def with_meta(rows: list[int], row_metas: list[dict]) -> pd.DataFrame:
        frame = df.loc[rows].reset_index(drop=True)
        mf = _meta_frame(row_metas)
        for c in META_COLUMNS:
            if c in frame.columns:  # the manifest's own value wins; DICOM fills its gaps
                frame[c] = frame[c].where(frame[c].notna(), mf[c])
            else:
                frame[c] = mf[c]
        return frame

    no_label = (df["label"].loc[ok_rows].to_numpy() == _NO_LABEL) if unlabelled else np.zeros(len(ok_rows), bool)
    pick = [np.flatnonzero(~no_label), np.flatnonzero(no_label)]
    frame, u_frame = (with_meta([ok_rows[i] for i in idx], [metas[i] for i in idx]) for idx in pick)
    u_frame = u_frame.drop(columns="label")

    def to_float(idx: np.ndarray) -> np.ndarray:
        out = (stack if len(idx) == len(stack) else stack[idx]).astype(np.float32)  # one float copy per part
        out *= np.float32(1.0 / _Q)
        return out[:, None] if channels == 1 else out

    images, u_images = (to_float(idx) for idx in pick)
    if unlabelled:
        log.info("%s: %d images, %d unlabelled, %d rejected", data_dir, len(frame), len(u_frame), len(rejected))
    else:
        log.info("%s: %d images, %d rejected", data_dir, len(frame), len(rejected))
    return SiteData(
        images=images,
        labels=frame["label"].to_numpy(dtype=np.int64),
        frame=frame,
        rejected=rejected,
        unlabelled=u_images,
        unlabelled_frame=u_frame,
    )
