"""The decoded-site cache, ``.equifed_cache/`` next to the data.

Full-size clinical DICOMs cost 10-100 ms each to decode and a federated run restarts clients often, so decoded stacks
are cached, keyed by the manifest bytes, every image's (path, size, mtime_ns), the image size, the limits and a
format version; rejections are cached with them. The folder is the site's (untrusted): a cache file is checked
before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
from pathlib import Path

import numpy as np

from core_models.data.limits import DEFAULT_LIMITS, ImageError, ImageLimits, _open_regular
from core_models.data.manifest import Rejection
from core_models.data.npz import _npz_header

log = logging.getLogger(__name__)

CACHE_DIR = ".equifed_cache"
CACHE_VERSION = 3  # bump when decoding changes, so stale caches are never reused


def _cache_key(raw: bytes, paths: list[str], stamps: list[tuple[int, int]], image_size: int,
               num_classes: int | None, limits: ImageLimits = DEFAULT_LIMITS, unlabelled: bool = False,
               channels: int = 1, volume: str | None = None) -> str:
    """Hash of everything the decoded stack depends on: format version, size, limits (they decide rejections),
    manifest bytes, each image's (path, size, mtime_ns), whether rows without a label were kept and the channels
    (RGB, 3; each only hashed when it is not the default, so the keys of ordinary grey loads are what they always
    were). A volume load passes every file of every volume as `paths` / `stamps` and its settings as `volume`
    (VolumeSettings.key), which are hashed with the volume caps."""
    h = hashlib.sha256()
    h.update(f"equifed-cache v{CACHE_VERSION}\0size={image_size}\0classes={num_classes}\0".encode())
    if unlabelled:
        h.update(b"unlabelled=1\0")
    if channels != 1:
        h.update(f"channels={channels}\0".encode())
    h.update(f"pixels={limits.max_pixels}\0bytes={limits.max_file_bytes}\0frames={limits.multi_frame}\0".encode())
    if volume is not None:
        h.update(f"volume\0{volume}\0slices={limits.max_slices}\0voxels={limits.max_voxels}\0"
                 f"volume-bytes={limits.max_volume_bytes}\0".encode())
    h.update(hashlib.sha256(raw).digest())
    for p, (size, mtime_ns) in zip(paths, stamps):
        h.update(f"{p}\0{size}\0{mtime_ns}\0".encode())
    return h.hexdigest()


def _cache_file(data_dir: Path, manifest: str, image_size: int, num_classes, key: str,
                unlabelled: bool = False, channels: int = 1, volume: bool = False) -> Path:
    """The cache slot's file. A load that keeps unlabelled rows has its own slot ("k2u-" rather than "k2-"), and so
    has an RGB load ("k2c3-", "k2uc3-") and a volume load ("-v64-" for "-s64-"), so alternating the kinds of load
    never makes one's save delete the other's file (a save deletes the files of its own slot prefix, which no other
    slot's name starts with)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(manifest).stem)
    slot = f"k{num_classes}{'u' if unlabelled else ''}{f'c{channels}' if channels != 1 else ''}"
    return data_dir / CACHE_DIR / f"{stem}-{'v' if volume else 's'}{image_size}-{slot}-{key[:32]}.npz"


def _cache_dir_ok(cache_dir: Path) -> bool:
    """The cache folder is ours only if it is a real folder (or absent): a symlink there would make us write, and
    delete old cache files, wherever it points."""
    try:
        return stat.S_ISDIR(os.lstat(cache_dir).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _cache_load(path: Path, key: str, n_images: int, image_size: int, channels: int = 1, volume: bool = False):
    """The cached (stack, ok_rows, metas, rejected), or None. The cache lives in the (untrusted) data folder, so
    the file must be a regular file of plausible size and its arrays' headers must match what this site can
    produce (at most n_images uint16 image_size^2 images, of `channels` planes each when that is not 1, or
    image_size^3 volumes, a bounded info text) before anything is loaded."""
    info_chars = 65536 + 4096 * n_images
    plane = ((image_size,) * 3 if volume else (image_size, image_size) if channels == 1
             else (channels, image_size, image_size))
    max_bytes = n_images * math.prod(plane) * 2 + 4 * info_chars + 65536
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
            if (len(ishape) != 1 + len(plane) or ishape[0] > n_images or ishape[1:] != plane
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
