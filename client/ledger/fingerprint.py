"""Which dataset a ledger history belongs to: a fingerprint of the site's patients and image contents."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from client.ledger.storage import STATE_DIR, LedgerError, atomic_write
from core_models.data import manifest_table
from core_models.paths import UnsafePath, resolve_site_file

FINGERPRINT_CACHE = "fingerprint_cache.json"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(data_dir, manifest: str = "manifest.csv") -> str:
    """sha256 over the site's (patient_id, image content digest) pairs, sorted.

    The key is the patient set and the bytes of their images, not the manifest's bytes: reformatting the
    manifest (column order, quoting, blank lines, extra columns, renamed or moved files, whitespace around a header
    or an id) leaves it unchanged. The manifest is read as the loader reads it (core_models.data.manifest_table).
    It never leaves the site: replies carry a keyed tag of it (client.ledger.dataset_tag).
    Only regular files inside the site folder are read (core_models.paths); any other path counts as
    "unreadable" without being opened, so a FIFO or /dev/zero in the manifest cannot hang the site.
    Per-file digests are cached in `<data>/.equifed/fingerprint_cache.json` keyed by (real path, size,
    mtime_ns), so a big site re-hashes only files that changed.
    """
    data_dir = Path(data_dir)
    manifest_path = data_dir / manifest
    if not manifest_path.exists():
        raise FileNotFoundError(f"no {manifest} in {data_dir}: cannot fingerprint the dataset")
    table = manifest_table(manifest_path)  # the loader's own normalised reading: one patient is one id everywhere

    cache_path = data_dir / STATE_DIR / FINGERPRINT_CACHE
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}  # the cache is only a speed-up; the ledger never depends on it
    new_cache: dict[str, list] = {}
    # A file written within the last 2 s could change again without its mtime moving
    # (coarse timestamps): hash it now but do not cache it ("racy git" rule).
    racy_before = time.time_ns() - 2_000_000_000

    pairs = set()
    for pid, rel in zip(table["patient_id"], table["image_path"]):
        if not pid or not rel:
            continue
        try:
            real, st = resolve_site_file(data_dir, rel)
        except UnsafePath:
            pairs.add((pid, "unreadable"))
            continue
        key = str(real)
        hit = cache.get(key)
        if isinstance(hit, list) and len(hit) == 3 and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            digest = hit[2]
        else:
            digest = _file_sha256(real)
        if st.st_mtime_ns < racy_before:
            new_cache[key] = [st.st_size, st.st_mtime_ns, digest]
        pairs.add((pid, digest))
    if new_cache != cache:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_path, json.dumps(new_cache))
        except OSError:
            pass  # read-only data folder: hash again next time
    h = hashlib.sha256()
    h.update(b"equifed-dataset-v2\0")
    for pid, digest in sorted(pairs):
        h.update(json.dumps([pid, digest]).encode() + b"\n")
    return h.hexdigest()


SITE_KEY = "site_key"  # a secret of the site's, made once from OS entropy; it never leaves the site


def _site_key(data_dir) -> bytes:
    """The site's secret key (`<data>/.equifed/site_key`, owner-only, 64 hex digits), created on first use.

    It is written whole to a private temporary file and linked into place, so no reader ever sees a partial
    key, and two processes racing to make it end with the one key that was linked first. A key file that is not
    64 hex digits or that others may read is refused (LedgerError): a short or known key would make the tag a
    membership test again."""
    path = Path(data_dir) / STATE_DIR / SITE_KEY
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{SITE_KEY}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic; fails if another process linked its key first
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    text = path.read_text().strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
        raise LedgerError(f"{path} is not a site key (64 hex digits); restore it from the site's backup")
    if path.stat().st_mode & 0o077:
        raise LedgerError(f"{path} can be read by others; make it owner-only (chmod 600) or restore it")
    return bytes.fromhex(text)


def dataset_tag(data_dir, fingerprint: str) -> str:
    """What the server is told about which dataset a reply's spend belongs to: HMAC-SHA256 of the fingerprint
    under the site's secret key. The server can still tell "the same dataset as before" (its registry refuses a
    site whose spend on a dataset went backwards), but no one without the key can compute the tag of a
    candidate dataset, so it is no membership test and names no data."""
    return hmac.new(_site_key(data_dir), fingerprint.encode(), hashlib.sha256).hexdigest()
