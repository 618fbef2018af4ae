"""What the server-side commands (`equifed-server start`, `equifed-simulate`) share on the console:
`-c KEY=VALUE` run-config overrides, the run submitted and followed round by round, its outcome in summary.json."""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from core_models.config import ConfigError, check_overrides, schema
from core_models.processes import app_snapshot
from core_models.run_files import FLOWER_LOG, METRICS_CSV, PER_SITE_CSV, SAVED_OVERRIDES, SUMMARY_JSON
from server.tracking import INSTALL_HINT, store_uri

# Overrides a resume may change without changing what the experiment is: how long it runs and waits, where
# results go, what is reported. Any other difference (strategy, learning rate, DP, ...) is refused.
RESUME_MAY_CHANGE = frozenset({"num-server-rounds", "round-timeout", "resume", "out-dir", "statistics",
                               "fraction-evaluate", "min-train-nodes", "patience", "calibrate",
                               "tracking-uri", "tracking-experiment"})
SAVED_CONFIG = SAVED_OVERRIDES


def parse_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> run-config dict. A key the run config types as text keeps its text as given
    (`fair-covariate-edges=45`); any other value that reads as a number or true/false gets that type."""
    types = schema()
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"-c/--run-config expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if types.get(key) is not str:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
            if value in ("true", "false"):
                value = value == "true"
        out[key] = value
    return out


def settle_overrides(out: Path, items: list[str], defaults: dict, *, rounds: int | None = None,
                     resuming: bool = False, force: bool = False, implied: dict | None = None,
                     say=print) -> dict:
    """The run's overrides, every key and value checked before any work starts (ConfigError otherwise), with
    their run-config types. On a resume, the run's saved overrides with the given ones applied where they do not
    change the experiment (each change said through `say`)."""
    overrides = parse_overrides(items)
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    typed = check_overrides({**(implied or {}), **overrides}, defaults)
    overrides = {name: typed[name] for name in overrides}
    if overrides.get("pretrained-path"):  # the ServerApp runs in another folder: the file, absolute, checked now
        path = Path(str(overrides["pretrained-path"])).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"pretrained-path {overrides['pretrained-path']!r}: no such file")
        overrides["pretrained-path"] = str(path)
    if overrides.get("tracking-uri"):  # likewise: a folder, absolute (an MLflow URI as given)
        overrides["tracking-uri"] = tracking_location(str(overrides["tracking-uri"]))
    if resuming:
        if not (out / SAVED_CONFIG).exists():
            say(f"no {SAVED_CONFIG} in {out}: the run resumes with the app's defaults and the -c given now, "
                f"which may not be the settings it started with")
        overrides, changes = resume_overrides(out, overrides, defaults, force=force)
        for line in changes:
            say(f"resume changes {line}")
    if overrides.get("tracking-uri") and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"tracking-uri {overrides['tracking-uri']!r} asks for MLflow tracking, but MLflow is not "
                          f"installed: {INSTALL_HINT}")
    return overrides


def tracking_location(value: str) -> str:
    """run config tracking-uri as the ServerApp (in another folder) must get it: a folder made absolute, an
    MLflow URI (http://, sqlite:///, file:) as given."""
    value = value.strip()
    return value if store_uri(value) == value else str(Path(value).expanduser().resolve())


class _TrackingFolder(argparse.Action):
    """--mlflow DIR: the same as -c tracking-uri=DIR (made absolute when the overrides are settled)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.run_config = [*(getattr(namespace, "run_config", None) or []), f"tracking-uri={values}"]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command that runs the app takes: rounds, -c overrides, and resuming the run folder."""
    parser.add_argument("--rounds", type=int, help="number of federated rounds (run config num-server-rounds)")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="override any [tool.flwr.app.config] key, e.g. -c strategy=fedprox")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run folder's last checkpoint, with the settings the run was started "
                             "with (a -c given again may change only rounds, timeouts and reporting)")
    parser.add_argument("--force-config", action="store_true",
                        help="with --resume: apply every -c given, even one that changes the experiment")
    parser.add_argument("--mlflow", metavar="DIR", action=_TrackingFolder,
                        help="log the run to MLflow: a folder (MLflow's file store; `mlflow ui --backend-store-uri "
                             "DIR` shows it) or an MLflow tracking URI; the same as -c tracking-uri=DIR. Needs "
                             "equifed[tracking]")


class RoundPrinter:
    """Prints each new round of per_site.csv / metrics.csv as the server writes them."""

    def __init__(self, out: Path):
        self.out = out
        self.printed = -1

    def __call__(self) -> None:
        from server.results import round_table
        from server.site_rows import SiteRow

        metrics, per_site = self.out / METRICS_CSV, self.out / PER_SITE_CSV
        if not metrics.exists() or not per_site.exists():
            return
        try:
            glob = pd.read_csv(metrics).to_dict("records")
            sites = pd.read_csv(per_site).to_dict("records") if per_site.stat().st_size > 1 else []
            sites = [SiteRow.from_row(r) for r in sites]
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            return  # caught mid-write; next poll
        for row in glob:
            r = int(row["round"])
            if r > self.printed:
                print(round_table(r, sites, row), flush=True)
                self.printed = r


def follow_run(link, run_config: dict, out: Path, *, timeout: float, announce: Callable[[int], None],
               federation: dict | None = None, printed: int = -1) -> tuple[int, dict]:
    """Submit the app (a snapshot: edits to the tree meanwhile cannot break its build) with `run_config`, print
    each round after `printed` as the server writes it, keep Flower's log as flower.log; (run id, final status)."""
    summary = out / SUMMARY_JSON
    submitted = time.time()
    with tempfile.TemporaryDirectory(prefix="equifed-app-") as tmp:
        run_id = link.submit(app_snapshot(Path(tmp) / "app"), run_config, federation)
    announce(run_id)
    printer = RoundPrinter(out)
    printer.printed = printed

    def ending() -> bool:  # the ServerApp writes summary.json last: Flower marks the run finished right after
        try:
            return summary.stat().st_mtime >= submitted - 1
        except OSError:
            return False

    status = link.wait(run_id, timeout=timeout, on_poll=printer, ending=ending)
    printer()
    (out / FLOWER_LOG).write_text(link.logs(run_id))
    return run_id, status


def annotate_summary(out: Path, **fields) -> dict | None:
    """summary.json (which the ServerApp writes when the run completes) with the command's own facts added;
    None when the run wrote none."""
    path = out / SUMMARY_JSON
    if not path.exists():
        return None
    summary = {**json.loads(path.read_text()), **fields}
    path.write_text(json.dumps(summary, indent=2))
    return summary


def nothing_trained(summary: dict | None) -> str | None:
    """Why a run that Flower completed did not do its job: no site trained in any round (each refused, ran out
    of budget or failed; per_site.csv has their replies), so the model is the one it started from. None if it
    trained."""
    if summary and summary.get("sites_trained") == 0:
        return "no site trained in any round (per_site.csv has each site's reply); the model is the one it started from"
    return None


def save_overrides(out: Path, overrides: dict) -> None:
    """The run-config overrides a new run was started with, kept so that --resume continues the same run."""
    (out / SAVED_CONFIG).write_text(json.dumps(overrides, indent=2, sort_keys=True))


def resume_overrides(out: Path, given: dict, defaults: dict, force: bool = False) -> tuple[dict, list[str]]:
    """The saved overrides of the run in `out`, with `given` applied where they do not change the experiment.

    Returns (overrides, lines describing each difference). Raises ConfigError naming every key whose new value
    would change the experiment, unless `force`."""
    path = out / SAVED_CONFIG
    saved = json.loads(path.read_text()) if path.exists() else {}
    merged, notes, refused = dict(saved), [], []
    for name, value in given.items():
        before = saved.get(name, defaults.get(name))
        if before == value:
            continue
        line = f"{name}: {before!r} -> {value!r}"
        if name in RESUME_MAY_CHANGE or force:
            merged[name] = value
            notes.append(line)
        else:
            refused.append(line)
    if refused:
        raise ConfigError("--resume continues the run with its saved settings; these overrides would change the "
                          f"experiment: {'; '.join(refused)} (drop them, or pass --force-config)")
    return merged, notes
