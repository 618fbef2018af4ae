"""`equifed-simulate SCENARIO.toml --out DIR`: generate (or reuse) a synthetic consortium
and train it federatedly through Flower's simulation engine on a SuperLink we own.
`equifed-simulate --sites DIR [--holdout DIR] --out DIR`: the same run on existing site folders
(e.g. from `equifed-partition`), with nothing generated. `--baselines local,central` then trains each site's
model alone and one on the pooled sites with the same settings (simulations/baselines.py) and writes
baselines.csv: what a hospital gains by joining.

`--superlink HOST:PORT` submits the run to a SuperLink that is already running (in simulation mode, e.g. with a
Ray cluster as its engine) instead of starting one; it is followed the same way and never stopped. Its ServerApp
and ClientApps must see this machine's paths (the run folder, the sites' data): the same machine or a shared
file system.

Exits non-zero when the run fails (Flower's own `flwr run --stream` exits 0 then). A site that
failed is named with its last error (from its own .equifed/client_errors.log: simulation only).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import pandas as pd

from client.site import STATE_DIR, list_sites
from core_models.config import RECIPES, ConfigError, RunConfig, app_defaults, auto_settings
from core_models.devices import DeviceUnavailable, check_available
from core_models.processes import APP_DIR
from core_models.protocol import EPSILON
from server.console import add_run_arguments, annotate_summary, follow_run, nothing_trained, save_overrides, settle_overrides
from server.run_page import write_run_page
from server.superlink import ExistingSuperLink, LocalSuperLink, parse_address
from simulations.generator import FAIRNESS_RUN_CONFIG, generate_consortium
from simulations.scenario import ScenarioError, load_scenario

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "default.toml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="equifed-simulate", description=__doc__.split("\n\n")[0],
        epilog="With --sites no scenario is read and nothing is generated: give one or the other. The sites' "
               "images are resized to run config image-size (default 64; e.g. -c image-size=28 for 28x28 MedMNIST) "
               "and labels must lie in 0..num-classes-1 (default 2 classes: -c num-classes=K).")
    parser.add_argument("scenario", nargs="?", default=None,
                        help="scenario TOML (default: the embedded 4-hospital consortium); not with --sites")
    parser.add_argument("--sites", metavar="DIR",
                        help="train on these site folders as they are: every subfolder of DIR with a manifest.csv "
                             "(except DIR/holdout) is a site")
    parser.add_argument("--holdout", metavar="DIR",
                        help="with --sites: labelled held-out folder (manifest.csv) scoring the global model each "
                             "round (default: DIR/holdout when it has a manifest.csv; else none)")
    parser.add_argument("--out", default="runs/demo", help="run folder (results, and data/ for a scenario)")
    add_run_arguments(parser)
    parser.add_argument("--baselines", metavar="MODES", default="",
                        help="after the run, train each site's model alone (local) and one on every site's "
                             "training rows pooled (central: simulation only), with the run's model, rounds x local "
                             "epochs and DP settings; write baselines.csv (each model on the holdout and on every "
                             "site's own rows) and print the benefit of joining, e.g. --baselines local,central")
    parser.add_argument("--timeout", type=float, default=3600, help="give up on the run after this many seconds")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--overwrite-data", action="store_true", help="regenerate data even if the scenario changed")
    link = parser.add_argument_group("an existing SuperLink (default: start one of our own on loopback)")
    link.add_argument("--superlink", metavar="HOST:PORT",
                      help="submit the run to this SuperLink (its Control API; a simulation-mode SuperLink, e.g. "
                           "on a Ray cluster) instead of starting one; it is never stopped. Its apps must see this "
                           "machine's paths (the same machine or a shared file system)")
    security = link.add_mutually_exclusive_group()
    security.add_argument("--root-certificates", metavar="PEM",
                          help="with --superlink: TLS, trusting this CA certificate (default: the system's store)")
    security.add_argument("--insecure", action="store_true",
                          help="with --superlink: plain HTTP, no TLS (loopback or a trusted network only)")
    args = parser.parse_args(argv)
    if (args.root_certificates or args.insecure) and not args.superlink:
        parser.error("--root-certificates and --insecure go with --superlink (our own SuperLink is on loopback)")
    if args.superlink:
        try:
            parse_address(args.superlink)
        except ValueError as err:
            parser.error(f"--superlink: {err}")
        if args.root_certificates and not Path(args.root_certificates).is_file():
            parser.error(f"--root-certificates {args.root_certificates}: no such file")
    if args.sites is not None and args.scenario is not None:
        parser.error("give a scenario or --sites, not both (--sites trains on existing folders, nothing is generated)")
    if args.sites is not None and args.overwrite_data:
        parser.error("--overwrite-data regenerates a scenario's data; with --sites nothing is generated")
    if args.holdout is not None and args.sites is None:
        parser.error("--holdout goes with --sites (a scenario generates its own holdout)")
    return args


class UsageError(ValueError):
    """Bad command-line input found after parsing (exit 2)."""


def existing_sites(sites: str, holdout: str | None) -> tuple[list[Path], Path | None]:
    """The site folders of `--sites` (listed as the clients list them) and the holdout folder."""
    root = Path(sites).resolve()
    if not root.is_dir():
        raise UsageError(f"--sites {sites}: no such folder")
    found = list_sites(root)
    if not found:
        raise UsageError(f"--sites {sites}: no subfolder with a manifest.csv (one folder per site)")
    if holdout is None:
        default = root / "holdout"
        return found, default if (default / "manifest.csv").is_file() else None
    path = Path(holdout).resolve()
    if not (path / "manifest.csv").is_file():
        raise UsageError(f"--holdout {holdout}: no manifest.csv in that folder")
    if any(path == site.resolve() for site in found):
        raise UsageError(f"--holdout {holdout} is also one of the sites in {sites} (every subfolder with a "
                         f"manifest.csv trains): move it out of {sites} or name it holdout")
    return found, path


def channel_mismatch(sites: str, in_channels: int) -> tuple[str | None, str | None]:
    """(error, note) comparing run config in-channels with the channels `equifed-partition` recorded for the site
    folders (partition.json; nothing to compare for folders it did not write): colour sites in a grey run would
    have every image refused, so that is an error saying what to set; grey sites in an RGB run train (each image
    replicated to 3 channels, e.g. for an RGB pretrained network), so that is a note."""
    try:
        channels = json.loads((Path(sites) / "partition.json").read_text()).get("channels")
    except (OSError, ValueError, AttributeError):
        return None, None
    if channels == 3 and in_channels == 1:
        return (f"the sites in {sites} hold colour (RGB) images (partition.json: channels 3) but run config "
                f"in-channels is 1, which refuses colour PNGs: add -c in-channels=3"), None
    if channels == 1 and in_channels == 3:
        return None, (f"the sites in {sites} hold grey images (partition.json: channels 1): in-channels=3 "
                      f"replicates each to 3 channels (-c in-channels=1 trains on grey)")
    return None, None


def sites_without_test(site_dirs: list[Path]) -> list[str]:
    """Sites whose manifest fixes a split with no test rows (e.g. from equifed-partition: the test rows are the
    holdout). Unreadable manifests are left to the site's own client, which reports them."""
    names = []
    for site in site_dirs:
        try:
            split = pd.read_csv(site / "manifest.csv", usecols=lambda c: c.strip() == "split", dtype=str)
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if len(split.columns) == 1:
            values = split.iloc[:, 0]
            if values.notna().all() and not values.str.strip().eq("test").any():
                names.append(site.name)
    return names


def error_log_sizes(site_dirs: list[Path]) -> dict[Path, int]:
    """Where each site's error log ends before the run, so that only this run's errors are reported."""
    sizes = {}
    for site in site_dirs:
        log = site / STATE_DIR / "client_errors.log"
        sizes[site] = log.stat().st_size if log.exists() else 0
    return sizes


def site_failures(site_dirs: list[Path], before: dict[Path, int]) -> list[str]:
    """One line per site that logged an error during the run: its name, how often, and the last error
    (the final line of the last traceback). Simulation only: in a deployment the log stays at the hospital."""
    lines = []
    for site in site_dirs:
        log = site / STATE_DIR / "client_errors.log"
        if not log.exists():
            continue
        start = before.get(site, 0)
        with open(log, "rb") as fh:
            if log.stat().st_size >= start:
                fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
        entries = [e for e in re.split(r"(?m)^--- ", text)[1:] if e.strip()]  # the ClientApp's "--- handler" entries
        if not entries:
            continue
        last = [line.strip() for line in entries[-1].splitlines() if line.strip()]
        during = f" during {last[0]}" if len(last) > 1 else ""
        lines.append(f"equifed: site {site.name} failed {len(entries)} time(s); last error{during}: {last[-1]} "
                     f"(traceback in {log})")
    return lines


def collect_rejections(site_dirs: list[Path], out: Path) -> int:
    """Merge the sites' local rejection lists into the run folder (simulation only:
    in a deployment each hospital keeps its own list)."""
    frames = []
    for site in site_dirs:
        path = site / ".equifed" / "rejected.csv"
        if path.exists():
            frame = pd.read_csv(path)
            if not frame.empty:
                frames.append(frame.assign(site=site.name))
    merged = pd.concat(frames) if frames else pd.DataFrame(columns=["image_path", "row", "reason", "site"])
    merged.to_csv(out / "rejected.csv", index=False)
    return len(merged)


def _error(message: str) -> int:
    print(f"equifed-simulate: error: {message}", file=sys.stderr)
    return 2


def _prepare_sites(args: argparse.Namespace, out: Path, t0: float):
    """(site folders, holdout or None, their data root, the run config the data imply) from --sites or the
    scenario (generated into out/data). UsageError or ScenarioError before anything is written."""
    if args.sites is not None:
        sites, holdout = existing_sites(args.sites, args.holdout)
        out.mkdir(parents=True, exist_ok=True)
        data_dir = Path(args.sites).resolve()
        print(f"equifed: {len(sites)} site folder(s) in {data_dir} -> {out}: {', '.join(s.name for s in sites)}; "
              f"holdout: {holdout or 'none'}", flush=True)
        return sites, holdout, data_dir, {}  # the run config's own image-size (pyproject) unless -c overrides it
    scenario = load_scenario(Path(args.scenario or DEFAULT_SCENARIO))
    out.mkdir(parents=True, exist_ok=True)
    print(f"equifed: scenario {scenario.name!r} -> {out}", flush=True)
    data_dir = out / "data"
    sites = generate_consortium(scenario, data_dir, overwrite=args.overwrite_data)
    holdout = data_dir / "holdout"
    holdout = holdout if (holdout / "manifest.csv").exists() else None
    print(f"equifed: {len(sites)} sites ready in {time.time() - t0:.1f}s: {', '.join(s.name for s in sites)}",
          flush=True)
    return sites, holdout, data_dir, {"image-size": scenario.image_size}


def _run_config(args, out: Path, sites, holdout, data_dir: Path, implied: dict, overrides: dict) -> dict:
    run_config = {"data-root": str(data_dir), "holdout-path": str(holdout) if holdout else "", **implied,
                  "out-dir": str(out), "min-train-nodes": len(sites), "resume": bool(args.resume)}
    no_test = sites_without_test(sites)
    if no_test and "fraction-evaluate" not in overrides:
        run_config["fraction-evaluate"] = 0.0
        print(f"equifed: {', '.join(no_test)} ha{'s' if len(no_test) == 1 else 've'} no test split (manifest split "
              f"column): per-site evaluation is off; the holdout scores the global model", flush=True)
    return {**run_config, **overrides}


def _report(out: Path, summary: dict, n_rejected: int, t0: float) -> None:
    print(
        f"equifed: done in {time.time() - t0:.0f}s; holdout AUROC "
        f"{_fmt(summary.get('initial_holdout_auroc'))} -> {_fmt(summary.get('final_holdout_auroc'))}; "
        f"{n_rejected} rejected image(s); results in {out}",
        flush=True,
    )
    print_findings(out)
    for line in summary.get("notes") or []:
        print(f"equifed: note: {line}", flush=True)
    for line in summary.get("warnings", []):
        print(f"equifed: WARNING: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.time()
    # generated sites name their fairness columns as a user names theirs; a user's -c wins
    generated = {} if args.sites is not None else dict(FAIRNESS_RUN_CONFIG)
    resuming = args.resume and (out / "checkpoints" / "latest.pt").exists()
    if not args.resume and (out / "checkpoints" / "latest.pt").exists():  # its sites' ledgers hold that run's spend
        return _error(f"{out} already holds a run (checkpoints/latest.pt); continue it with --resume or choose "
                      f"another --out")
    try:  # every key and value checked before any data are generated or any process started
        defaults = app_defaults(APP_DIR / "pyproject.toml")
        overrides = settle_overrides(out, args.run_config, defaults, rounds=args.rounds, resuming=resuming,
                                     force=args.force_config, implied=generated,
                                     say=lambda line: print(f"equifed: {line}", flush=True))
        if not args.superlink:  # our own simulation trains on this machine: a card it lacks stops the run here
            check_available(str({**defaults, **overrides}["device"]))
    except ConfigError as err:
        return _error(str(err))
    except DeviceUnavailable as err:
        return _error(f"run config 'device': {err}")
    try:  # a scenario or folder error is the user's input: said in one line, exit 2, nothing written
        sites, holdout, data_dir, implied = _prepare_sites(args, out, t0)
    except (UsageError, ScenarioError) as err:
        return _error(str(err))
    run_config = _run_config(args, out, sites, holdout, data_dir, {**implied, **generated}, overrides)
    try:
        cfg = RunConfig.from_flower({**defaults, **run_config})
        cfg.server.check_holdout()
    except ConfigError as err:
        return _error(str(err))
    resolved = auto_settings({**defaults, **run_config})
    if resolved:
        print(f"equifed: {recipe_line(resolved, cfg)}", flush=True)
    modes = [m.strip() for m in args.baselines.split(",") if m.strip()]
    if args.baselines:
        from simulations.baselines import check_request as check_baselines  # (torch, Opacus: only when asked)

        try:
            check_baselines(modes, cfg)
        except ValueError as err:
            return _error(str(err))
        if holdout is None:
            return _error("--baselines scores every model on the holdout: give --holdout DIR (or DIR/holdout)")
    if args.sites is not None:
        mismatch, note = channel_mismatch(args.sites, cfg.train.in_channels)
        if mismatch:
            return _error(mismatch)
        if note:
            print(f"equifed: {note}", flush=True)

    save_overrides(out, overrides)  # on a resume: the saved ones with the changes just allowed
    (out / "summary.json").unlink(missing_ok=True)  # written anew when the run completes
    if not args.resume:
        for stale in ("metrics.csv", "per_site.csv", "baselines.csv"):
            (out / stale).unlink(missing_ok=True)
    errors_before = error_log_sizes(sites)
    existing = bool(args.superlink)
    try:
        with _superlink(args, out) as link:
            run_id, status = follow_run(
                link, run_config, out, timeout=args.timeout,
                federation={"num-supernodes": len(sites), "client-resources-num-cpus": args.cpus_per_client},
                announce=lambda rid: print(f"equifed: run {rid} started on "
                                           f"{'the existing ' if existing else ''}SuperLink {link.address}",
                                           flush=True))
    except (RuntimeError, TimeoutError) as err:
        if not existing:
            raise
        print(f"equifed-simulate: error: SuperLink {args.superlink}: {err}", file=sys.stderr, flush=True)
        return 1
    n_rejected = collect_rejections(sites, out)
    summary = annotate_summary(out, flower_run_id=run_id, flower_status=status.get("status"),
                               rejected_images=n_rejected, auto_settings=resolved,
                               **({"superlink": args.superlink} if existing else {}))
    if summary is not None:  # the page again, with the rejected files just gathered from the sites
        try:
            write_run_page(out)
        except OSError as err:
            print(f"equifed: WARNING: the run page could not be written: {err}", file=sys.stderr, flush=True)
    for line in site_failures(sites, errors_before):
        print(line, file=sys.stderr, flush=True)
    if status.get("status") != "finished:completed":
        print(f"equifed: run {run_id} FAILED ({link.outcome(status)}); Flower log: {out / 'flower.log'}", file=sys.stderr)
        return 1
    failed = nothing_trained(summary)
    if failed:
        print(f"equifed: run {run_id} FAILED: {failed}; results in {out}", file=sys.stderr)
        return 1
    _report(out, summary or {}, n_rejected, t0)
    if modes:
        _baselines(cfg, sites, holdout, modes, out)
    return 0


def _superlink(args: argparse.Namespace, out: Path) -> ExistingSuperLink | LocalSuperLink:
    """--superlink: the SuperLink that is already running (never stopped here); else one of our own."""
    if args.superlink:
        return ExistingSuperLink(args.superlink, root_certificates=args.root_certificates, insecure=args.insecure)
    return LocalSuperLink(log_path=out / "superlink.log")


def _baselines(cfg: RunConfig, sites: list[Path], holdout: Path, modes: list[str], out: Path) -> None:
    """--baselines: the local-only and centralised models beside the run's final model; baselines.csv."""
    import torch

    from simulations.baselines import BASELINES_CSV, benefit_lines, run_baselines

    t0 = time.time()
    print(f"equifed: baselines ({', '.join(modes)}): training in this process with the run's settings ...",
          flush=True)
    federated = torch.load(out / "final_model.pt", weights_only=True)
    table = run_baselines(cfg, sites, holdout, modes, out, federated, federated_epsilon=_ledger_epsilon(out))
    for line in benefit_lines(table):
        print(f"equifed: {line}", flush=True)
    print(f"equifed: baselines in {time.time() - t0:.0f}s: {out / BASELINES_CSV}", flush=True)


def _ledger_epsilon(out: Path) -> float:
    """The largest epsilon a site's ledger reported in the run (inf: trained without DP; nan: not reported)."""
    try:
        rows = pd.read_csv(out / "per_site.csv")
    except (OSError, ValueError, pd.errors.ParserError):
        return float("nan")
    if EPSILON not in rows.columns or not rows[EPSILON].notna().any():
        return float("nan")
    return float(rows[EPSILON].max())


def recipe_line(resolved: dict, cfg: RunConfig) -> str:
    """What the training keys left at "auto" became (core_models.config.resolve_auto), in one line."""
    measured = (cfg.train.model, cfg.dp.enabled) in RECIPES
    which = f"the {'DP ' if cfg.dp.enabled else ''}recipe of {cfg.train.model}" if measured else "the defaults"
    return (f"training keys left at auto ({which}): " + ", ".join(f"{k} {v}" for k, v in resolved.items())
            + "; set any of them with -c KEY=VALUE")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def calibration_line(fit: dict) -> str:
    """calibration.json in one line."""
    sites = ", ".join(fit.get("sites", [])) or "no site"
    if not fit.get("fitted"):
        return f"calibration (round {fit.get('round')}): none ({fit.get('reason')})"
    bias = f", bias {fit['bias']:+.3f}" if fit.get("kind") == "platt" else ""
    return (f"calibration (round {fit.get('round')}, from the validation splits (training too under DP) of {sites}, about "
            f"{fit['records']:.0f} patients' counts): temperature {fit['temperature']:.3f}{bias}; calibrated_model.pt")


def print_findings(out: Path) -> None:
    """The last round's shift verdicts, the audit's verdict and each site's privacy spend, when the run made them."""
    shift = out / "shift.csv"
    if shift.exists():
        table = pd.read_csv(shift)
        last = table[table["round"] == table["round"].max()]
        verdicts = ", ".join(f"{r.site}: {r.shift}" for r in last.itertuples() if isinstance(r.shift, str))
        print(f"equifed: dataset shift (round {int(last['round'].iloc[0])}, each site vs the rest): {verdicts}; "
              f"see {shift.name}, shift.png", flush=True)
    audit = out / "fairness_audit.json"
    if audit.exists():
        verdict = json.loads(audit.read_text()).get("verdict", {})
        print(f"equifed: fairness audit: {verdict.get('text', 'no verdict')} See {out / 'fairness_audit.html'}",
              flush=True)
    calibration = out / "calibration.json"
    if calibration.exists():
        print(f"equifed: {calibration_line(json.loads(calibration.read_text()))}", flush=True)
    per_site = out / "per_site.csv"
    if per_site.exists():
        rows = pd.read_csv(per_site)
        if EPSILON in rows.columns and rows[EPSILON].notna().any():
            ledger = rows[rows[EPSILON] < float("inf")].groupby("site")[EPSILON].max()
            no_dp = rows["phase"].eq("train") & rows[EPSILON].eq(float("inf"))
            if len(ledger):
                print("equifed: epsilon on each site's ledger (at the site's own delta): "
                      + ", ".join(f"{site} {eps:.2f}" for site, eps in ledger.items())
                      + ("; training ran without DP, so the model weights carry no epsilon guarantee" if no_dp.any()
                         else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
