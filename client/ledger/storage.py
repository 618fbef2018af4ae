"""The ledger on disk: its file format, its validation, one writer at a time, and writes that never tear.

File layout:
    {"version": 1, "site": ..., "delta": the site's delta (only ever tightened), "datasets": {fingerprint: {"created", "delta",
     "history": [[sigma, q, steps], ...], "entries": [{...}, ...]}},
     "noised": {key: {"value": [...], "label", "time"}}, "checksum": sha256}
`history` is exactly Opacus' RDPAccountant.history; `entries` is the human-readable log (consecutive training
steps of the same round and run are merged into one entry); `noised` keeps values the site noised once and
reuses (e.g. its noised patient count), so that asking again costs nothing and reveals nothing new.

A witness file (`ledger_witness.json`, beside the ledger) records how many steps the ledger has charged, so a
ledger that was deleted, truncated or rolled back to an old copy is recognised and refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LEDGER_FILE = "privacy_ledger.json"
STATE_DIR = ".equifed"
WITNESS_FILE = "ledger_witness.json"
VERSION = 1
DEFAULT_DELTA = 1e-5


class LedgerError(RuntimeError):
    """The ledger is unreadable, corrupted or inconsistent: training must stop."""


def ledger_path(data_dir) -> Path:
    return Path(data_dir) / STATE_DIR / LEDGER_FILE


def witness_path(data_dir) -> Path:
    return Path(data_dir) / STATE_DIR / WITNESS_FILE


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def empty_ledger(site: str) -> dict:
    return {"version": VERSION, "site": site, "datasets": {}}


def empty_dataset(delta: float) -> dict:
    return {"created": now(), "delta": float(delta), "history": [], "entries": []}


def site_delta_of(doc: dict) -> float | None:
    """The delta the site's ledger is kept at: its own, or (a ledger from before it had one) the smallest any of
    its datasets was opened with; None for a new ledger."""
    if "delta" in doc:
        return float(doc["delta"])
    deltas = [float(ds["delta"]) for ds in doc["datasets"].values() if "delta" in ds]
    return min(deltas) if deltas else None


def all_history(doc: dict) -> list:
    """Every dataset's history in one list: the site's epsilon composes them all."""
    return [h for ds in doc["datasets"].values() for h in ds["history"]]


def total_steps(doc: dict) -> int:
    return sum(int(h[2]) for h in all_history(doc))


def valid_mechanism(sigma, q, steps) -> bool:
    return (
        isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0
        and isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 1
        and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    )


# --------------------------------------------------------------------------- file I/O


def atomic_write(path: Path, text: str) -> None:
    """Write a temp file in the same folder, fsync it, os.replace it over `path`: a crash leaves the old file
    or the new one, never half of either."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@contextmanager
def locked(path: Path):
    """One writer at a time: flock on `<ledger>.lock` around read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _corrupt(path: Path, why: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger {path} is corrupted ({why}). Training is stopped for this site. "
        f"Restore the file from a backup; it is left untouched for inspection and must never be deleted or "
        f"reset (a new ledger would hide the privacy already spent)."
    )


def load_ledger_file(path) -> dict:
    """Read and validate a ledger file; raise FileNotFoundError if absent, LedgerError if bad.

    Never writes: a bad file stays byte-identical for forensics.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise LedgerError(f"privacy ledger {path} cannot be read ({err}); training is stopped for this site") from err
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _corrupt(path, f"not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise _corrupt(path, "not a JSON object")
    if doc.get("version") != VERSION:
        raise _corrupt(path, f"unknown schema version {doc.get('version')!r}, expected {VERSION}")
    if doc.get("checksum") != checksum(doc):
        raise _corrupt(path, "checksum mismatch: the content was edited or partly written")
    datasets = doc.get("datasets")
    if not isinstance(datasets, dict):
        raise _corrupt(path, "no 'datasets' table")
    for fp, ds in datasets.items():
        if not (isinstance(ds, dict) and isinstance(ds.get("history"), list) and isinstance(ds.get("entries"), list)):
            raise _corrupt(path, f"dataset {fp[:12]}: missing history or entries")
        hist = Counter()
        for item in ds["history"]:
            if not (isinstance(item, list) and len(item) == 3 and valid_mechanism(*item)):
                raise _corrupt(path, f"dataset {fp[:12]}: bad history item {item!r}")
            hist[(item[0], item[1])] += item[2]
        logged = Counter()
        for e in ds["entries"]:
            if not (isinstance(e, dict) and valid_mechanism(e.get("sigma"), e.get("q"), e.get("steps"))):
                raise _corrupt(path, f"dataset {fp[:12]}: bad entry {e!r}")
            logged[(e["sigma"], e["q"])] += e["steps"]
        if hist != logged:
            raise _corrupt(path, f"dataset {fp[:12]}: history and entries disagree")
    if "delta" in doc and not (isinstance(doc["delta"], float) and 0 < doc["delta"] < 1):
        raise _corrupt(path, f"bad site delta {doc['delta']!r}")
    noised = doc.get("noised", {})
    if not (isinstance(noised, dict) and all(isinstance(v, dict) and isinstance(v.get("value"), list)
                                             for v in noised.values())):
        raise _corrupt(path, "bad 'noised' table")
    return doc


def write_ledger(path: Path, doc: dict) -> None:
    """Checksum, write the ledger atomically, then its witness (so the witness never runs ahead of it)."""
    doc["checksum"] = checksum(doc)
    atomic_write(path, json.dumps(doc, indent=1))
    write_witness(path.with_name(WITNESS_FILE), doc)


# --------------------------------------------------------------------------- witness


def read_witness(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LedgerError(f"ledger witness {path} is unreadable ({err}); training is stopped for this site. "
                          f"Restore it together with the ledger from a backup") from err
    if not (isinstance(doc, dict) and isinstance(doc.get("steps"), int)):
        raise LedgerError(f"ledger witness {path} is not a witness file; restore it from a backup")
    return doc


def write_witness(path: Path, doc: dict) -> None:
    atomic_write(path, json.dumps({"steps": total_steps(doc), "checksum": doc.get("checksum"), "time": now(),
                                   "note": "how much the privacy ledger beside this file has charged; "
                                           "never delete"}))


def check_against_witness(path: Path, doc: dict | None) -> None:
    """A ledger that is gone or went backwards is refused: a fresh ledger would hide what was spent."""
    witness = read_witness(path.with_name(WITNESS_FILE))
    if witness is None:
        return
    how = (f"Restore {path} from the site's backup (the copy from the last run, or later); the witness "
           f"{path.with_name(WITNESS_FILE)} must stay where it is. Training is stopped for this site.")
    if doc is None:
        raise LedgerError(f"privacy ledger {path} is missing, but its witness shows a ledger with "
                          f"{witness['steps']} charged steps existed. {how}")
    steps = total_steps(doc)
    if steps < witness["steps"]:
        raise LedgerError(f"privacy ledger {path} holds {steps} charged steps, but its witness shows "
                          f"{witness['steps']}: it was truncated or replaced by an older copy. {how}")
