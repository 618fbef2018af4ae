"""The site's privacy ledger as an object: one dataset's history, charged and checked against the whole file.

Every charge is on disk (locked, atomic, witnessed) before its result can be used, and the budget is checked
on the composition of every history in the file, so changing the data never grants a fresh budget.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import numpy as np

from client.ledger.accounting import append_mechanism, epsilon_of
from client.ledger.fingerprint import dataset_fingerprint
from client.ledger.report import RDP_NOTE, dataset_summary
from client.ledger.storage import (
    DEFAULT_DELTA,
    WITNESS_FILE,
    LedgerError,
    all_history,
    check_against_witness,
    empty_dataset,
    empty_ledger,
    ledger_path,
    load_ledger_file,
    locked,
    now,
    site_delta_of,
    valid_mechanism,
    write_ledger,
    write_witness,
)

log = logging.getLogger(__name__)


def _tightest(*deltas: float | None) -> float:
    """The smallest of the deltas given (DEFAULT_DELTA when none is)."""
    given = [float(d) for d in deltas if d is not None]
    return min(given) if given else DEFAULT_DELTA


class BudgetExhausted(RuntimeError):
    """A charge would take this dataset's epsilon over the site's max_epsilon."""


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
        to the old ones, which keep counting against the budget. The ledger keeps one delta for the site, the one
        it was first opened with (the client passes the site policy's); a later `delta` can tighten it, never
        loosen it, so no setting of a run (which can change what the site's data look like) moves the delta the
        budget is checked at. Without any, 1e-5. `max_epsilon` comes from the site's own policy each time.
        """
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"site data folder {data_dir} does not exist")
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        fp = fingerprint if fingerprint is not None else dataset_fingerprint(data_dir)
        path = ledger_path(data_dir)
        with locked(path):
            doc = load_ledger_file(path) if path.exists() else None
            check_against_witness(path, doc)
            if doc is None:
                doc = empty_ledger(data_dir.resolve().name)
            site_delta = _tightest(delta, site_delta_of(doc))
            changed = doc.get("delta") != site_delta
            doc["delta"] = site_delta
            if fp not in doc["datasets"]:
                doc["datasets"][fp] = empty_dataset(site_delta)
                changed = True
            if changed:
                cls._write(path, doc)
            elif not path.with_name(WITNESS_FILE).exists():
                write_witness(path.with_name(WITNESS_FILE), doc)  # a ledger from before witnesses
        return cls(path, fp, site_delta, max_epsilon, doc)

    @staticmethod
    def _write(path: Path, doc: dict) -> None:
        write_ledger(path, doc)

    def _refresh(self) -> dict:
        """The file on disk is the truth (another ledger object or process may have charged)."""
        try:
            doc = load_ledger_file(self.path)
        except FileNotFoundError:
            doc = None
        check_against_witness(self.path, doc)
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
        return epsilon_of(all_history(self._doc), self.delta if delta is None else delta)

    def dataset_epsilon(self, delta: float | None = None) -> float:
        """This dataset's own history alone (for reports; a patient in several versions has spent more)."""
        return epsilon_of(self._refresh()["history"], self.delta if delta is None else delta)

    def projected_epsilon(self, mechanisms) -> float:
        """Epsilon if these (noise_multiplier, sample_rate, steps) were added; writes nothing."""
        self._refresh()
        history = [list(h) for h in all_history(self._doc)]
        for sigma, q, steps in mechanisms:
            history.append([float(sigma), float(q), int(steps)])
        return epsilon_of(history, self.delta)

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
        if not valid_mechanism(sigma, q, steps):
            raise ValueError(f"not a valid Gaussian mechanism: sigma={sigma}, q={q}, steps={steps}")
        if kind not in ("train", "release"):
            raise ValueError(f"kind must be 'train' or 'release', got {kind!r}")
        with locked(self.path):
            ds = self._refresh()
            before = all_history(self._doc)
            eps = epsilon_of(before + [[sigma, q, steps]], self.delta)
            if self.max_epsilon is not None and eps > self.max_epsilon:
                raise BudgetExhausted(
                    f"the site has spent epsilon={epsilon_of(before, self.delta):.4f} (delta={self.delta:g}, every "
                    f"dataset's history composed); this {kind} would take it to {eps:.4f}, over the site's "
                    f"max-epsilon={self.max_epsilon:g}"
                )
            history = [list(h) for h in ds["history"]]
            append_mechanism(history, sigma, q, steps)
            entries = ds["entries"]
            last = entries[-1] if entries else None
            stamp = now()
            same_run = last is not None and kind == "train" and all(
                last.get(k) == v for k, v in
                (("kind", kind), ("label", label), ("round", round), ("run_id", run_id), ("sigma", sigma),
                 ("q", q), ("delta", self.delta))
            )
            if same_run:  # consecutive steps of one round: one entry, not thousands
                last["steps"] += steps
                last["epsilon_after"] = eps
                last["time"] = stamp
            else:
                entries.append({"kind": kind, "label": label, "round": round, "run_id": run_id, "sigma": sigma,
                                "q": q, "steps": steps, "delta": self.delta, "epsilon_after": eps,
                                "started": stamp, "time": stamp})
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
        Non-finite entries are replaced by 0 (a value that does not depend on the data) before the noise, and
        counted in the site's log only. The noise comes from OS entropy; `rng` exists for tests that must be reproducible and is never
        set by the client. (numpy's sampler is not hardened against floating-point attacks; fine for
        aggregates.)
        """
        if not (math.isfinite(sensitivity) and sensitivity > 0):
            raise ValueError(f"sensitivity must be positive, got {sensitivity}")
        x = np.asarray(value, dtype=np.float64)
        bad = ~np.isfinite(x)
        if bad.any():  # a NaN or inf would pass through the noise exactly: it leaves as 0 + noise instead
            log.warning("release %s: %d non-finite value(s) replaced by 0 before the noise", label, int(bad.sum()))
            x = np.where(bad, 0.0, x)
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
        with locked(self.path):
            self._refresh()
            stored = self._doc.get("noised", {}).get(key)
        if stored is not None:
            return np.asarray(stored["value"], dtype=np.float64).reshape(np.shape(value))
        noised = self.release(value, sensitivity, noise_multiplier, label=label, rng=rng)
        with locked(self.path):
            self._refresh()
            stored = self._doc.get("noised", {}).get(key)
            if stored is not None:  # another process noised it meanwhile: its value is the one that leaves
                return np.asarray(stored["value"], dtype=np.float64).reshape(np.shape(value))
            self._doc.setdefault("noised", {})[key] = {"value": noised.ravel().tolist(), "label": label,
                                                      "time": now()}
            self._write(self.path, self._doc)
        return noised

    def summary(self) -> dict:
        """The site's spend (every history composed) plus this dataset's own and the others'."""
        self._refresh()
        out = dataset_summary(self.fingerprint, self._ds, self.delta)
        out["epsilon_dataset"] = out.pop("epsilon")
        out["epsilon"] = epsilon_of(all_history(self._doc), self.delta)
        out.update(site=self._doc.get("site"), path=str(self.path), max_epsilon=self.max_epsilon, note=RDP_NOTE)
        out["other_fingerprints"] = {
            fp: {"epsilon": epsilon_of(ds["history"], self.delta), "created": ds.get("created"),
                 "n_entries": len(ds["entries"])}
            for fp, ds in self._doc["datasets"].items() if fp != self.fingerprint
        }
        out["epsilon_all_fingerprints"] = out["epsilon"]
        return out


def os_entropy_rng() -> np.random.Generator:
    """A numpy generator seeded from the OS (os.urandom): nothing the server knows can reproduce its draws."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
