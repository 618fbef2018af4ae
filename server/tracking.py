"""Experiment tracking in MLflow, the tracker hospital ML teams already run (optional: `equifed[tracking]`, which
installs mlflow-skinny).

One MLflow run per equifed run: the run config as parameters, each round's global metrics and each site's
(`site/<name>/<metric>`, the site's ledger epsilon as `site/<name>/epsilon`) at step = the round, and at the end
the models with their cards and the reports. It talks to MLflow through `MlflowClient` only (no global active run
in the ServerApp's process). Only what the run folder already holds is sent: the sites' noised or withheld
values as they are, never their data.

After `start`, a tracking server that fails never ends a training run: the failure is logged and kept in
`failures` (for summary.json), and the round goes on.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path

from flwr.common import log

INSTALL_HINT = "pip install 'equifed[tracking]' (or: pip install mlflow-skinny)"
# what an MLflow run gets from a run folder: the models with their cards, and the reports (not the
# checkpoints, the logs or anything under data/)
MODELS = ("final_model.pt", "best_model.pt", "calibrated_model.pt", "final_model_detector.pt",
          "best_model_detector.pt")
REPORTS = ("index.html", "summary.json", "metrics.csv", "per_site.csv", "learning_curve.png", "shift.csv",
           "shift.png", "shift_consortium.json", "fairness_audit.html", "fairness_audit.json", "calibration.json")
END_STATUS = {"completed": "FINISHED", "failed": "FAILED", "killed": "KILLED"}  # equifed's -> MLflow's
_NOT_METRICS = {"round", "phase", "site", "status", "node", "error", "noised", "withheld"}
# MLflow's names: letters, digits, _ - . space, ":" (not on Windows) and "/" (which nests: never inside a part)
_BAD = re.compile(r"[^\w.\- ]")
_MAX_KEY = 250
_MAX_PART = 100
_MAX_PARAM_VALUE = 6000
_BATCH = 100  # MLflow's limit on params per log_batch call (metrics: 1000)


class TrackingUnavailable(RuntimeError):
    """Tracking was asked for, and MLflow is not installed or refused the store."""


def _mlflow():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise TrackingUnavailable(f"experiment tracking was asked for, but MLflow is not installed ({err}); "
                                  f"{INSTALL_HINT}") from err
    return MlflowClient


def store_uri(tracking_uri: str) -> str:
    """A local folder (no scheme) becomes MLflow's file store in it, absolute; a URI (http(s)://, sqlite:///,
    file:, databricks) is used as given."""
    text = str(tracking_uri).strip()
    if not text:
        raise TrackingUnavailable("an empty tracking URI; give a folder or an MLflow URI")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text):  # a scheme (two letters at least: not a drive letter)
        return text
    return Path(text).expanduser().resolve().as_uri()


def name_part(text: str) -> str:
    """One segment of a metric or parameter name that MLflow accepts: disallowed characters (and "/", which
    would nest) become "_", a segment of dots becomes underscores; a name changed on the way gets a short hash
    of the original, so two sites never share a name (a long one is cut, so the key keeps its metric's name)."""
    clean = _BAD.sub("_", str(text))[:_MAX_PART]
    if not clean.strip("."):  # "", ".", "..": names MLflow reads as paths
        clean = "_" * max(len(clean), 1)
    if clean != str(text):
        clean = f"{clean}-{hashlib.sha256(str(text).encode()).hexdigest()[:6]}"
    return clean


def metric_key(*parts: str) -> str:
    return "/".join(name_part(p) for p in parts)[:_MAX_KEY]


class MlflowTracker:
    """`start(config)` once, `log_round(...)` after each round, `log_artifacts(out_dir)` and `end(status)` at the
    end. Constructing it checks that MLflow is installed (TrackingUnavailable otherwise). `artifact_location`:
    where a new experiment keeps its artifacts (a database store's default is ./mlruns of the working folder)."""

    def __init__(self, tracking_uri: str, experiment: str = "equifed", run_name: str | None = None,
                 artifact_location: str | None = None):
        client_class = _mlflow()
        self.uri = store_uri(tracking_uri)
        if self.uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch: naming one opts in,
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # unless the environment says otherwise
        self.experiment, self.run_name, self.artifact_location = experiment, run_name, artifact_location
        try:
            self.client = client_class(tracking_uri=self.uri)
        except Exception as err:
            raise TrackingUnavailable(f"MLflow tracking at {self.uri}: {type(err).__name__}: {err}") from err
        self.run_id: str | None = None
        self.failures: list[dict] = []

    def start(self, config: Mapping) -> str:
        """Create the MLflow run and log the run config as parameters; returns the MLflow run id. Raises (a
        TrackingUnavailable naming the store) when the store cannot be used: better before training starts."""
        from mlflow.entities import Param

        try:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (found.experiment_id if found else
                             self.client.create_experiment(self.experiment, artifact_location=self.artifact_location))
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags={"equifed": "1"})
            self.run_id = run.info.run_id
            params = [Param(metric_key(str(k)), str(v)[:_MAX_PARAM_VALUE]) for k, v in sorted(config.items())]
            for i in range(0, len(params), _BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + _BATCH])
        except Exception as err:
            raise TrackingUnavailable(f"MLflow tracking at {self.uri}: {type(err).__name__}: {err}") from err
        return self.run_id

    def log_round(self, server_round: int, global_row: Mapping, site_rows: list[Mapping]) -> None:
        """The round's global metrics (metrics.csv's row) and each site's rows of that round (per_site.csv's):
        finite numbers only (a withheld value is NaN: nothing is logged for it)."""
        self._safely("round", lambda: self._log_round(server_round, global_row, site_rows), server_round)

    def _log_round(self, server_round: int, global_row: Mapping, site_rows: list[Mapping]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values: dict[str, float] = {}
        for key, value in global_row.items():
            if key != "round":
                _put(values, metric_key(str(key)), value)
        ledger: dict[str, float] = {}
        for row in site_rows:
            if _number(row.get("round")) != server_round or row.get("status") != "ok":
                continue
            site, phase = str(row.get("site")), str(row.get("phase"))
            if phase in ("train", "evaluate"):
                for key, value in row.items():
                    if key in _NOT_METRICS or str(key).startswith("epsilon"):
                        continue
                    name = key if phase == "train" or str(key).startswith("eval-") else f"eval-{key}"
                    _put(values, metric_key("site", site, str(name)), value)
            eps = _number(row.get("epsilon"))
            if math.isfinite(eps):  # inf: trained without DP, no guarantee to log
                ledger[site] = max(eps, ledger.get(site, 0.0))  # the ledger after the round's last request
        for site, eps in ledger.items():
            values[metric_key("site", site, "epsilon")] = eps
        sites = {str(r.get("site")) for r in site_rows if _number(r.get("round")) == server_round}
        for site in sites:
            trained = any(r.get("site") == site and r.get("phase") == "train" and r.get("status") == "ok"
                          for r in site_rows if _number(r.get("round")) == server_round)
            values[metric_key("site", site, "trained")] = 1.0 if trained else 0.0
        metrics = [Metric(k, v, now, int(server_round)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self._run(), metrics=metrics[i:i + 1000])

    def log_artifacts(self, out_dir: Path) -> list[str]:
        """The run folder's models (each with its card) under `models/`, its reports under `reports/`; returns
        what was sent."""
        sent: list[str] = []

        def send() -> None:
            folder = Path(out_dir)
            for name in MODELS:
                path = folder / name
                if path.exists():
                    for part in (path, path.with_suffix(".json")):
                        if part.exists():
                            self.client.log_artifact(self._run(), str(part), artifact_path="models")
                            sent.append(f"models/{part.name}")
            for name in REPORTS:
                if (folder / name).exists():
                    self.client.log_artifact(self._run(), str(folder / name), artifact_path="reports")
                    sent.append(f"reports/{name}")

        self._safely("artifacts", send)
        return sent

    def end(self, status: str = "completed") -> None:
        """Close the MLflow run: completed (also a run patience stopped) -> FINISHED, killed -> KILLED, anything
        else -> FAILED."""
        self._safely("end", lambda: self.client.set_terminated(self._run(), status=END_STATUS.get(status, "FAILED")))

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("the tracker was not started")
        return self.run_id

    def _safely(self, what: str, step, server_round: int | None = None) -> None:
        """Run `step`; a failure is logged and kept (as summary.json's analysis_failures are), never raised."""
        try:
            step()
        except Exception as err:  # noqa: BLE001  tracking never ends a training run
            self.failures.append({"round": server_round, "analysis": f"tracking {what}",
                                  "error": f"{type(err).__name__}: {err}"})
            log(WARNING, "equifed tracking: %s not logged to %s (%s: %s); training goes on", what, self.uri,
                type(err).__name__, err)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _put(values: dict[str, float], key: str, value) -> None:
    if isinstance(value, bool):
        value = float(value)
    number = _number(value) if not isinstance(value, str) or value.strip() else math.nan
    if math.isfinite(number):
        values[key] = number
