"""The site's privacy ledger: every Opacus RDP accountant history the site ever had, never reset.

A hospital promises its ethics board an (epsilon, delta) bound per patient over every round, run and restart.
The accountant therefore lives on the site's disk (`<data>/.equifed/privacy_ledger.json`), not in a training
process: every noised optimizer step and every released statistic is appended to it and the file is rewritten
atomically (temp file, fsync, os.replace) before the step's result can be used.

The budget is enforced on the composition of *every* history in the file: a dataset keeps its own history
(keyed by a fingerprint of its patients and image contents), but a patient may be in every version of the
site's data, so the site's epsilon is that of all histories together (the conservative bound). Changing the
data (adding patients, editing the manifest) therefore never grants a fresh budget.

A ledger that cannot be read or whose checksum does not match stops training with LedgerError. It is never
overwritten or reset. A witness file (`ledger_witness.json`, beside it) records how many steps the ledger has
charged; a ledger that is missing or holds fewer steps than its witness (deleted, truncated, rolled back to an
old copy) stops training too, naming the file and how to restore it.

File layout:
    {"version": 1, "site": ..., "datasets": {fingerprint: {"created", "delta",
     "history": [[sigma, q, steps], ...], "entries": [{...}, ...]}},
     "noised": {key: {"value": [...], "label", "time"}}, "checksum": sha256}
`history` is exactly Opacus' RDPAccountant.history; `entries` is the human-readable log (consecutive training
steps of the same round and run are merged into one entry); `noised` keeps values the site noised once and
reuses (e.g. its noised patient count), so that asking again costs nothing and reveals nothing new.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import hashlib
import json
import math
import os
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

from core_models.paths import UnsafePath, resolve_site_file

LEDGER_FILE = "privacy_ledger.json"
STATE_DIR = ".equifed"
FINGERPRINT_CACHE = "fingerprint_cache.json"
WITNESS_FILE = "ledger_witness.json"
VERSION = 1
DEFAULT_DELTA = 1e-5
RDP_NOTE = (
    "epsilon from training and from releases are each computed from their own sub-history; under RDP "
    "composition they do not add up to the total (the total is smaller than their sum)"
)


class LedgerError(RuntimeError):
    """The ledger is unreadable, corrupted or inconsistent: training must stop."""


class BudgetExhausted(RuntimeError):
    """A charge would take this dataset's epsilon over the site's max_epsilon."""


def ledger_path(data_dir) -> Path:
    return Path(data_dir) / STATE_DIR / LEDGER_FILE


# --------------------------------------------------------------------------- fingerprint


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(data_dir, manifest: str = "manifest.csv") -> str:
    """sha256 over the site's (patient_id, image content digest) pairs, sorted.

    The key is the patient set and the bytes of their images, not the manifest's bytes: reformatting the
    manifest (column order, quoting, blank lines, extra columns, renamed or moved files) leaves it unchanged.
    Only regular files inside the site folder are read (core_models.paths); any other path counts as
    "unreadable" without being opened, so a FIFO or /dev/zero in the manifest cannot hang the site.
    Per-file digests are cached in `<data>/.equifed/fingerprint_cache.json` keyed by (real path, size,
    mtime_ns), so a big site re-hashes only files that changed.
    """
    data_dir = Path(data_dir)
    manifest_path = data_dir / manifest
    if not manifest_path.exists():
        raise FileNotFoundError(f"no {manifest} in {data_dir}: cannot fingerprint the dataset")
    rows = list(csv.DictReader(manifest_path.read_bytes().decode("utf-8-sig", errors="replace").splitlines()))

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
    for r in rows:
        pid, rel = str(r.get("patient_id") or "").strip(), str(r.get("image_path") or "").strip()
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
            _atomic_write(cache_path, json.dumps(new_cache))
        except OSError:
            pass  # read-only data folder: hash again next time
    h = hashlib.sha256()
    h.update(b"equifed-dataset-v2\0")
    for pid, digest in sorted(pairs):
        h.update(json.dumps([pid, digest]).encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- file I/O


def _atomic_write(path: Path, text: str) -> None:
    """Write a temp file in the same folder, fsync it, os.replace it over `path`."""
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


def _checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _corrupt(path: Path, why: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger {path} is corrupted ({why}). Training is stopped for this site. "
        f"Restore the file from a backup; it is left untouched for inspection and must never be deleted or "
        f"reset (a new ledger would hide the privacy already spent)."
    )


def _valid_mechanism(sigma, q, steps) -> bool:
    return (
        isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0
        and isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 1
        and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
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
    if doc.get("checksum") != _checksum(doc):
        raise _corrupt(path, "checksum mismatch: the content was edited or partly written")
    datasets = doc.get("datasets")
    if not isinstance(datasets, dict):
        raise _corrupt(path, "no 'datasets' table")
    for fp, ds in datasets.items():
        if not (isinstance(ds, dict) and isinstance(ds.get("history"), list) and isinstance(ds.get("entries"), list)):
            raise _corrupt(path, f"dataset {fp[:12]}: missing history or entries")
        hist = Counter()
        for item in ds["history"]:
            if not (isinstance(item, list) and len(item) == 3 and _valid_mechanism(*item)):
                raise _corrupt(path, f"dataset {fp[:12]}: bad history item {item!r}")
            hist[(item[0], item[1])] += item[2]
        logged = Counter()
        for e in ds["entries"]:
            if not (isinstance(e, dict) and _valid_mechanism(e.get("sigma"), e.get("q"), e.get("steps"))):
                raise _corrupt(path, f"dataset {fp[:12]}: bad entry {e!r}")
            logged[(e["sigma"], e["q"])] += e["steps"]
        if hist != logged:
            raise _corrupt(path, f"dataset {fp[:12]}: history and entries disagree")
    noised = doc.get("noised", {})
    if not (isinstance(noised, dict) and all(isinstance(v, dict) and isinstance(v.get("value"), list)
                                             for v in noised.values())):
        raise _corrupt(path, "bad 'noised' table")
    return doc


@contextmanager
def _locked(path: Path):
    """One writer at a time: flock on `<ledger>.lock` around read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- accounting


@lru_cache(maxsize=256)
def _unit_rdp(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP curve of one step, cached: computing it takes ~50 ms and the hook charges
    every optimizer step. compute_rdp(steps=k) is exactly k times this array."""
    rdp = privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)
    return rdp


def _epsilon(history, delta: float) -> float:
    """Opacus' RDP epsilon of a (sigma, q, steps) history; 0.0 for none.

    The same arithmetic as RDPAccountant.get_privacy_spent (same orders, same sum, same
    conversion), with the per-step curves cached.
    """
    if not history:
        return 0.0
    rdp = sum([_unit_rdp(float(s), float(q)) * steps for s, q, steps in history])
    eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _append_mechanism(history: list, sigma: float, q: float, steps: int) -> None:
    """Append like RDPAccountant.step: merge with the last item when (sigma, q) are equal."""
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = [sigma, q, history[-1][2] + steps]
    else:
        history.append([sigma, q, steps])


def _history_of(entries: list[dict], kind: str | None = None) -> list:
    history: list = []
    for e in entries:
        if kind is None or e["kind"] == kind:
            _append_mechanism(history, e["sigma"], e["q"], e["steps"])
    return history


def _epsilon_trail(entries: list[dict], delta: float) -> list[float]:
    """Epsilon after each entry at `delta`, composing incrementally with Opacus' RDP analysis."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = np.zeros(len(orders))
    out = []
    for e in entries:
        rdp = rdp + _unit_rdp(float(e["sigma"]), float(e["q"])) * e["steps"]
        eps, _ = privacy_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        out.append(float(eps))
    return out


def _dataset_summary(fp: str, ds: dict, delta: float) -> dict:
    train = _history_of(ds["entries"], "train")
    release = _history_of(ds["entries"], "release")
    return {
        "fingerprint": fp,
        "created": ds.get("created"),
        "delta": delta,
        "epsilon": _epsilon(ds["history"], delta),
        "epsilon_train": _epsilon(train, delta),
        "epsilon_release": _epsilon(release, delta),
        "train_steps": sum(h[2] for h in train),
        "releases": sum(h[2] for h in release),
        "n_entries": len(ds["entries"]),
        "last_used": ds["entries"][-1]["time"] if ds["entries"] else None,
    }


def ledger_report(data_dir, delta: float | None = None) -> dict:
    """Everything an ethics board asks about the site's ledger, read-only (for the CLI).

    Raises FileNotFoundError when the site has no ledger, LedgerError when it is corrupted.
    `epsilon_after` of each entry is recomputed at `delta` (default: each dataset's stored delta).
    """
    path = ledger_path(data_dir)
    doc = load_ledger_file(path)
    datasets = []
    for fp, ds in doc["datasets"].items():
        d = float(delta if delta is not None else ds.get("delta", DEFAULT_DELTA))
        summary = _dataset_summary(fp, ds, d)
        trail = _epsilon_trail(ds["entries"], d)
        summary["entries"] = [dict(e, epsilon_after=eps) for e, eps in zip(ds["entries"], trail)]
        datasets.append(summary)
    site_delta = float(delta if delta is not None else min((d["delta"] for d in datasets), default=DEFAULT_DELTA))
    return {"site": doc.get("site"), "path": str(path), "note": RDP_NOTE, "datasets": datasets,
            "delta": site_delta, "epsilon": _epsilon(_all_history(doc), site_delta)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _all_history(doc: dict) -> list:
    """Every dataset's history in one list: the site's epsilon composes them all."""
    return [h for ds in doc["datasets"].values() for h in ds["history"]]


def _total_steps(doc: dict) -> int:
    return sum(int(h[2]) for h in _all_history(doc))


def witness_path(data_dir) -> Path:
    return Path(data_dir) / STATE_DIR / WITNESS_FILE


def _read_witness(path: Path) -> dict | None:
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


def _write_witness(path: Path, doc: dict) -> None:
    _atomic_write(path, json.dumps({"steps": _total_steps(doc), "checksum": doc.get("checksum"), "time": _now(),
                                    "note": "how much the privacy ledger beside this file has charged; "
                                            "never delete"}))


def _check_against_witness(path: Path, doc: dict | None) -> None:
    """A ledger that is gone or went backwards is refused: a fresh ledger would hide what was spent."""
    witness = _read_witness(path.with_name(WITNESS_FILE))
    if witness is None:
        return
    how = (f"Restore {path} from the site's backup (the copy from the last run, or later); the witness "
           f"{path.with_name(WITNESS_FILE)} must stay where it is. Training is stopped for this site.")
    if doc is None:
        raise LedgerError(f"privacy ledger {path} is missing, but its witness shows a ledger with "
                          f"{witness['steps']} charged steps existed. {how}")
    steps = _total_steps(doc)
    if steps < witness["steps"]:
        raise LedgerError(f"privacy ledger {path} holds {steps} charged steps, but its witness shows "
                          f"{witness['steps']}: it was truncated or replaced by an older copy. {how}")


class PrivacyLedger:
    """The site's accountant histories in the ledger file, one of them this dataset's; every change is on
    disk first. Budget checks and `epsilon()` compose every history in the file."""

    def __init__(self, path: Path, fingerprint: str, delta: float, max_epsilon: float | None, doc: dict):
        self.path = path
        self.fingerprint = fingerprint
        self.delta = delta
        self.max_epsilon = max_epsilon
        self._doc = doc

    @classmethod
    def open(
        cls,
        data_dir,
        delta: float | None = None,
        max_epsilon: float | None = None,
        fingerprint: str | None = None,
    ) -> "PrivacyLedger":
        """Load the site's ledger (validated against its witness) or create it; select this dataset's history.

        A dataset whose fingerprint is not in the file yet (new site, or changed data) gets a new history next
        to the old ones, which keep counting against the budget. `delta` defaults to the one stored with this
        dataset's history (1e-5 for a new one); the client passes the site policy's; `max_epsilon` comes from
        the site's own policy each time.
        """
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"site data folder {data_dir} does not exist")
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        fp = fingerprint if fingerprint is not None else dataset_fingerprint(data_dir)
        path = ledger_path(data_dir)
        with _locked(path):
            doc = load_ledger_file(path) if path.exists() else None
            _check_against_witness(path, doc)
            if doc is None:
                doc = {"version": VERSION, "site": data_dir.resolve().name, "datasets": {}}
            if fp not in doc["datasets"]:
                doc["datasets"][fp] = {
                    "created": _now(),
                    "delta": float(delta if delta is not None else DEFAULT_DELTA),
                    "history": [],
                    "entries": [],
                }
                cls._write(path, doc)
            elif not path.with_name(WITNESS_FILE).exists():
                _write_witness(path.with_name(WITNESS_FILE), doc)  # a ledger from before witnesses
        stored_delta = doc["datasets"][fp].get("delta", DEFAULT_DELTA)
        return cls(path, fp, float(delta if delta is not None else stored_delta), max_epsilon, doc)

    @staticmethod
    def _write(path: Path, doc: dict) -> None:
        doc["checksum"] = _checksum(doc)
        _atomic_write(path, json.dumps(doc, indent=1))
        _write_witness(path.with_name(WITNESS_FILE), doc)

    def _refresh(self) -> dict:
        """The file on disk is the truth (another ledger object or process may have charged)."""
        try:
            doc = load_ledger_file(self.path)
        except FileNotFoundError:
            doc = None
        _check_against_witness(self.path, doc)
        if doc is None:
            raise LedgerError(f"privacy ledger {self.path} disappeared while in use; training is stopped for this "
                              f"site. Restore the file from a backup; a new ledger would hide the privacy already "
                              f"spent")
        self._doc = doc
        if self.fingerprint not in self._doc["datasets"]:
            raise LedgerError(f"privacy ledger {self.path} lost the history of dataset {self.fingerprint[:12]}; "
                              f"restore the file from a backup")
        return self._doc["datasets"][self.fingerprint]

    @property
    def _ds(self) -> dict:
        return self._doc["datasets"][self.fingerprint]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """This dataset's own history (the budget composes it with the others)."""
        return [tuple(h) for h in self._refresh()["history"]]

    @property
    def entries(self) -> list[dict]:
        return copy.deepcopy(self._refresh()["entries"])

    def epsilon(self, delta: float | None = None) -> float:
        """The site's epsilon: every history in the ledger composed (what the budget is checked against)."""
        self._refresh()
        return _epsilon(_all_history(self._doc), self.delta if delta is None else delta)

    def dataset_epsilon(self, delta: float | None = None) -> float:
        """This dataset's own history alone (for reports; a patient in several versions has spent more)."""
        return _epsilon(self._refresh()["history"], self.delta if delta is None else delta)

    def projected_epsilon(self, mechanisms) -> float:
        """Epsilon if these (noise_multiplier, sample_rate, steps) were added; writes nothing."""
        self._refresh()
        history = [list(h) for h in _all_history(self._doc)]
        for sigma, q, steps in mechanisms:
            history.append([float(sigma), float(q), int(steps)])
        return _epsilon(history, self.delta)

    def check_budget(self, mechanisms) -> None:
        if self.max_epsilon is None:
            return
        projected = self.projected_epsilon(mechanisms)
        if projected > self.max_epsilon:
            raise BudgetExhausted(
                f"the site has spent epsilon={self.epsilon():.4f} (delta={self.delta:g}, every dataset's history "
                f"composed); this would take it to {projected:.4f}, over the site's max-epsilon={self.max_epsilon:g}"
            )

    def charge(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int = 1,
        kind: str = "train",
        label: str = "",
        round: int | None = None,
        run_id: str | None = None,
    ) -> float:
        """Add a Gaussian mechanism to this dataset's history and write the ledger; return the site's epsilon.

        Refused with BudgetExhausted (nothing written) if it would take the site past max_epsilon.
        """
        sigma, q, steps = float(noise_multiplier), float(sample_rate), int(steps)
        if not _valid_mechanism(sigma, q, steps):
            raise ValueError(f"not a valid Gaussian mechanism: sigma={sigma}, q={q}, steps={steps}")
        if kind not in ("train", "release"):
            raise ValueError(f"kind must be 'train' or 'release', got {kind!r}")
        with _locked(self.path):
            ds = self._refresh()
            before = _all_history(self._doc)
            eps = _epsilon(before + [[sigma, q, steps]], self.delta)
            if self.max_epsilon is not None and eps > self.max_epsilon:
                raise BudgetExhausted(
                    f"the site has spent epsilon={_epsilon(before, self.delta):.4f} (delta={self.delta:g}, every "
                    f"dataset's history composed); this {kind} would take it to {eps:.4f}, over the site's "
                    f"max-epsilon={self.max_epsilon:g}"
                )
            history = [list(h) for h in ds["history"]]
            _append_mechanism(history, sigma, q, steps)
            entries = ds["entries"]
            last = entries[-1] if entries else None
            now = _now()
            same_run = last is not None and kind == "train" and all(
                last.get(k) == v for k, v in
                (("kind", kind), ("label", label), ("round", round), ("run_id", run_id), ("sigma", sigma),
                 ("q", q), ("delta", self.delta))
            )
            if same_run:  # consecutive steps of one round: one entry, not thousands
                last["steps"] += steps
                last["epsilon_after"] = eps
                last["time"] = now
            else:
                entries.append({"kind": kind, "label": label, "round": round, "run_id": run_id, "sigma": sigma,
                                "q": q, "steps": steps, "delta": self.delta, "epsilon_after": eps,
                                "started": now, "time": now})
            ds["history"] = history
            self._write(self.path, self._doc)
        return eps

    def optimizer_hook(self, noise_multiplier: float, sample_rate: float, round=None, run_id=None):
        """A callable for `DPOptimizer.attach_step_hook` that charges each noised step.

        Opacus 1.6 calls the step hook in `DPOptimizer.pre_step` after `add_noise()` and
        before the parameter update, and not on steps skipped by BatchMemoryManager (those
        only clip and accumulate): one call per logical batch. Like Opacus' own accountant
        hook, the charged rate is `sample_rate * optimizer.accumulated_iterations` (several
        backward passes before one step form one bigger batch) and the sigma is the one the
        optimizer really used. If the charge is refused, the exception leaves the optimizer
        before the update, so the noised gradient never reaches the weights.
        """
        declared = float(noise_multiplier)

        def hook(optimizer) -> None:
            sigma = float(getattr(optimizer, "noise_multiplier", declared))
            q = min(1.0, sample_rate * int(getattr(optimizer, "accumulated_iterations", 1)))
            self.charge(sigma, q, 1, kind="train", round=round, run_id=run_id)

        return hook

    def release(
        self,
        value,
        sensitivity: float,
        noise_multiplier: float,
        label: str,
        round=None,
        run_id=None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """THE gate for statistics leaving the site: Gaussian noise of std noise_multiplier *
        sensitivity on every element, charged as (noise_multiplier, q=1, 1 step).

        `sensitivity` is the L2 sensitivity of the whole vector to one patient. The charge is
        written before the noised value is returned; if it is refused, nothing is released.
        The noise comes from OS entropy; `rng` exists for tests that must be reproducible and is never
        set by the client. (numpy's sampler is not hardened against floating-point attacks; fine for
        aggregates.)
        """
        if not (math.isfinite(sensitivity) and sensitivity > 0):
            raise ValueError(f"sensitivity must be positive, got {sensitivity}")
        x = np.asarray(value, dtype=np.float64)
        self.check_budget([(noise_multiplier, 1.0, 1)])
        rng = rng if rng is not None else os_entropy_rng()
        noised = x + rng.normal(0.0, noise_multiplier * sensitivity, size=x.shape)
        self.charge(noise_multiplier, 1.0, 1, kind="release", label=label, round=round, run_id=run_id)
        return noised

    def noised_once(self, key: str, value, sensitivity: float, noise_multiplier: float, label: str,
                    rng: np.random.Generator | None = None) -> np.ndarray:
        """`value` noised and charged the first time `key` is asked for, then the same noised value forever.

        For quantities the site uses again and again (its noised patient count, the counts behind a logit
        offset): re-noising them each round would charge each time and let averaging remove the noise.
        The key must name everything the value depends on (dataset fingerprint, split seed, what).
        """
        with _locked(self.path):
            self._refresh()
            stored = self._doc.get("noised", {}).get(key)
        if stored is not None:
            return np.asarray(stored["value"], dtype=np.float64).reshape(np.shape(value))
        noised = self.release(value, sensitivity, noise_multiplier, label=label, rng=rng)
        with _locked(self.path):
            self._refresh()
            stored = self._doc.get("noised", {}).get(key)
            if stored is not None:  # another process noised it meanwhile: its value is the one that leaves
                return np.asarray(stored["value"], dtype=np.float64).reshape(np.shape(value))
            self._doc.setdefault("noised", {})[key] = {"value": noised.ravel().tolist(), "label": label,
                                                      "time": _now()}
            self._write(self.path, self._doc)
        return noised

    def summary(self) -> dict:
        """The site's spend (every history composed) plus this dataset's own and the others'."""
        self._refresh()
        out = _dataset_summary(self.fingerprint, self._ds, self.delta)
        out["epsilon_dataset"] = out.pop("epsilon")
        out["epsilon"] = _epsilon(_all_history(self._doc), self.delta)
        out.update(site=self._doc.get("site"), path=str(self.path), max_epsilon=self.max_epsilon, note=RDP_NOTE)
        out["other_fingerprints"] = {
            fp: {"epsilon": _epsilon(ds["history"], self.delta), "created": ds.get("created"),
                 "n_entries": len(ds["entries"])}
            for fp, ds in self._doc["datasets"].items() if fp != self.fingerprint
        }
        out["epsilon_all_fingerprints"] = out["epsilon"]
        return out


def os_entropy_rng() -> np.random.Generator:
    """A numpy generator seeded from the OS (os.urandom): nothing the server knows can reproduce its draws."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
