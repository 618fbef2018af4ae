"""`equifed-server`: the consortium's aggregation server.

    equifed-server setup --dir CONSORTIUM --host server.example.org      # CA key -> CONSORTIUM-ca-offline/ca.key
    equifed-server register --dir CONSORTIUM --site st_aurelia --public-key st_aurelia.pub   # per hospital
    equifed-server start --dir CONSORTIUM --out runs/study1 --port 9092 --rounds 20
    equifed-server start --dir CONSORTIUM --out runs/study1 --port 9092 --rounds 20 --resume   # after a crash

`start` runs Flower's SuperLink with TLS, SuperNode authentication (only the registered
hospitals' keys get in) and a database file, submits the equifed app with `flwr run`
(no dependency installation at run time), prints each round, and exits non-zero unless
Flower reports the run `finished:completed` (`flwr run --stream` itself exits 0 on failure).

Each hospital makes its own key pair (`equifed-client keygen`) and sends only the public key;
the consortium sends back only ca.crt and the server address. `start` refuses to run while the
CA's private key sits in the consortium folder.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
from pathlib import Path

import pandas as pd

from core_models.config import ConfigError, RunConfig, app_defaults
from core_models.devices import DeviceUnavailable, check_available
from core_models.processes import APP_DIR, port_is_free
from core_models.run_files import CHECKPOINTS, LATEST_CHECKPOINT, METRICS_CSV, PRIVACY_REGISTRY_JSON
from server.deploy import (ConsortiumError, ca_keys_in_folder, default_ca_key_path, deployment_superlink,
                           hospital_private_keys_in_folder, load_index, register_site, setup_consortium,
                           sync_allow_list)
from server.console import (add_run_arguments, annotate_summary, follow_run, nothing_trained, save_overrides,
                            settle_overrides)


def _warn_hospital_keys(folder: Path) -> None:
    for key in hospital_private_keys_in_folder(folder):
        print(f"warning: {key} is a hospital's private key, made by an older equifed setup: the consortium must "
              f"not hold it. Have that hospital run `equifed-client keygen`, register the new public key with "
              f"`equifed-server register --replace`, then delete {key.name}", file=sys.stderr)


def _sync(folder: Path, index: dict) -> int:
    """Put the allow-list into the SuperLink's database with a SuperLink of our own."""
    link = deployment_superlink(folder)
    try:
        link.start()
        added = sync_allow_list(link, folder)
    except (RuntimeError, TimeoutError) as err:
        print(f"error: could not register the hospitals' keys: {err}", file=sys.stderr)
        return 1
    finally:
        link.stop()
    print(f"allow-list: {len(index['sites'])} site key(s) in {link.database}"
          + (f" ({', '.join(added)} new)" if added else ""))
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    try:
        index, facts = setup_consortium(Path(args.dir), args.host, Path(args.ca_key) if args.ca_key else None)
    except ConsortiumError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = Path(args.dir).resolve()
    print(f"consortium folder {folder}")
    print(f"  CA certificate      {folder / 'ca.crt'}   (send this, and the server address, to each hospital)")
    if facts["ca_key_moved_from"]:
        print(f"  CA private key      moved out of the server folder ({facts['ca_key_moved_from']})")
    if facts["ca_created"] or facts["ca_key_moved_from"] or facts["server_cert_issued"]:
        print(f"  CA private key      {facts['ca_key']}   keep this offline: move it off this machine; it is needed "
              f"again only to re-issue the server certificate (setup --host ... --ca-key PATH)")
    print(f"  server certificate  {folder / 'server.crt'}  valid for {', '.join(index['hosts'])}"
          + ("" if facts["server_cert_issued"] else " (kept)"))
    print(f"  sites               {len(index['sites'])} registered; add each hospital with `equifed-server register "
          f"--dir {args.dir} --site NAME --public-key NAME.pub` (the hospital makes it with `equifed-client keygen`)")
    _warn_hospital_keys(folder)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    try:
        entry, what = register_site(folder, args.site, Path(args.public_key), replace=args.replace)
        index = load_index(folder)
    except ConsortiumError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"site {args.site}: public key {entry['fingerprint']} {what} ({folder / entry['public_key']})")
    print(f"  compare this fingerprint with the one `equifed-client keygen` printed at the hospital; send the "
          f"hospital {folder / 'ca.crt'} and the server address")
    if args.no_register:
        print("  the key goes into the SuperLink's allow-list at the next `equifed-server start`")
        return 0
    return _sync(folder, index)


class Terminated(Exception):
    """SIGTERM: unwinds like Ctrl-C, so the finally blocks stop the SuperLink."""


def _raise_on_sigterm() -> None:
    def handler(*_):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def _lock_state(folder: Path):
    """Hold state/server.lock for this process's life: two servers on one state folder would share its
    database and log. Returns the open lock file, or None when another server holds it."""
    state = folder / "state"
    state.mkdir(parents=True, exist_ok=True)
    fh = open(state / "server.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "?"
        fh.close()
        print(f"error: another equifed-server (pid {owner}) is using {state}; stop it first "
              f"(two servers on one consortium folder would share its database)", file=sys.stderr)
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def _last_round(out: Path) -> int:
    metrics = out / METRICS_CSV
    if not metrics.exists() or metrics.stat().st_size == 0:
        return -1
    return int(pd.read_csv(metrics)["round"].max())


def _check_folder(folder: Path) -> dict | None:
    """The consortium index, or None after saying what is wrong with the server folder."""
    try:
        index = load_index(folder)
    except ConsortiumError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    ca_keys = ca_keys_in_folder(folder)
    if ca_keys:
        print(f"error: {ca_keys[0]} is the consortium's CA private key, inside the server folder {folder}: anyone "
              f"who reaches this server could issue certificates every hospital trusts. Move it offline (e.g. to "
              f"{default_ca_key_path(folder)}, then off this machine) and start again; the server does not need it",
              file=sys.stderr)
        return None
    if not index["sites"]:
        print(f"error: no hospital is registered in {folder}; add each with `equifed-server register`",
              file=sys.stderr)
        return None
    _warn_hospital_keys(folder)
    return index


def _check_run(args: argparse.Namespace, out: Path) -> dict | None:
    """The run's checked overrides, or None after saying why the run cannot start (bad -c, a run already in
    `out` without --resume, a busy port)."""
    checkpoint = out / CHECKPOINTS / LATEST_CHECKPOINT
    try:  # every key and value checked before anything is written or started
        defaults = app_defaults(APP_DIR / "pyproject.toml")
        overrides = settle_overrides(out, args.run_config, defaults, rounds=args.rounds,
                                     resuming=args.resume and checkpoint.exists(), force=args.force_config,
                                     say=lambda line: print(f"equifed-server: {line}", flush=True))
        cfg = RunConfig.from_flower({**defaults, **overrides})
        cfg.server.check_holdout()  # holdout-path only from -c
        if cfg.server.holdout_path:  # this machine scores the holdout, on the run's device (the sites: on theirs)
            check_available(cfg.train.device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    except DeviceUnavailable as err:
        print(f"error: run config 'device': {err} (this server scores holdout-path on it)", file=sys.stderr)
        return None
    if not args.resume and checkpoint.exists():
        print(f"error: {out} already holds a run (checkpoints/latest.pt); continue it with --resume "
              f"or choose another --out", file=sys.stderr)
        return None
    if args.resume and not checkpoint.exists():
        print(f"equifed-server: no checkpoint in {out}: the run starts from round 1", flush=True)
    if not port_is_free(args.host, args.port):
        print(f"error: port {args.port} on {args.host} is already in use (another server, or another program); "
              f"stop it or choose --port", file=sys.stderr)
        return None
    return overrides


def _connect(link, args: argparse.Namespace, folder: Path, n_sites: int) -> bool:
    """Start the SuperLink, bring its allow-list and runs up to date and wait for the hospitals; False when
    fewer than --min-sites connected."""
    link.start()
    print(f"equifed-server: SuperLink listening on {args.host}:{link.port} (TLS, SuperNode authentication, "
          f"database {link.database})", flush=True)
    added = sync_allow_list(link, folder)
    if added:
        print(f"equifed-server: registered {', '.join(added)}", flush=True)
    stale = link.stop_unfinished_runs()
    if stale:
        print(f"equifed-server: stopped run(s) {', '.join(map(str, stale))} left unfinished by an earlier "
              f"server process", flush=True)
    want = min(args.wait_for_sites or n_sites, n_sites)
    print(f"equifed-server: waiting for {want} of {n_sites} hospital(s) to connect", flush=True)
    try:
        link.wait_for_nodes(want, timeout=args.connect_timeout)
    except TimeoutError as err:
        online = sum(1 for n in link.nodes() if n.get("status") == "online")
        if online < args.min_sites:
            print(f"error: {err}; need at least --min-sites {args.min_sites}", file=sys.stderr)
            return False
        print(f"equifed-server: {err}; starting with {online}", flush=True)
    return True


def cmd_start(args: argparse.Namespace) -> int:
    folder, out = Path(args.dir).resolve(), Path(args.out).resolve()
    index = _check_folder(folder)
    overrides = _check_run(args, out) if index is not None else None
    lock = _lock_state(folder) if overrides is not None else None
    if lock is None:
        return 2
    out.mkdir(parents=True, exist_ok=True)
    save_overrides(out, overrides)  # on a resume: the saved ones with the changes just allowed
    run_config = {"out-dir": str(out), "resume": bool(args.resume), "min-train-nodes": args.min_sites,
                  "registry-path": str(folder / "state" / PRIVACY_REGISTRY_JSON),  # outlives any one run
                  **overrides}
    _raise_on_sigterm()
    link = deployment_superlink(folder, host=args.host, port=args.port)
    try:
        if not _connect(link, args, folder, len(index["sites"])):
            return 2
        run_id, status = follow_run(
            link, run_config, out, timeout=args.timeout, printed=_last_round(out) if args.resume else -1,
            announce=lambda rid: print(f"equifed-server: run {rid} started ({'resumed' if args.resume else 'new'}), "
                                       f"results in {out}", flush=True))
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (Terminated, KeyboardInterrupt):
        print(f"equifed-server: stopped; the run's last completed round is checkpointed in {out}: continue it "
              f"with the same command and --resume", file=sys.stderr, flush=True)
        return 143
    finally:
        link.stop()
        lock.close()
    summary = annotate_summary(out, flower_run_id=run_id, flower_status=status.get("status"))
    if status.get("status") != "finished:completed":
        print(f"equifed-server: run {run_id} FAILED ({link.outcome(status)}); "
              f"Flower log: {out / 'flower.log'}", file=sys.stderr)
        return 1
    failed = nothing_trained(summary)
    if failed:
        print(f"equifed-server: run {run_id} FAILED: {failed}; results in {out}", file=sys.stderr)
        return 1
    print(f"equifed-server: run {run_id} completed; results in {out}", flush=True)
    for line in (summary or {}).get("notes") or []:
        print(f"equifed-server: note: {line}", flush=True)
    for line in (summary or {}).get("warnings", []):
        print(f"equifed-server: WARNING: {line}", file=sys.stderr, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equifed-server", description="equifed aggregation server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="create the CA and the server certificate (the CA key goes outside --dir)")
    p.add_argument("--dir", required=True, help="consortium folder (created; an existing CA and certificate are kept)")
    p.add_argument("--host", action="append", default=[],
                   help="a host name or IP address the hospitals dial (repeat; 127.0.0.1 and localhost always)")
    p.add_argument("--ca-key", default=None, metavar="PATH",
                   help="where the CA private key is written (or read, to re-issue the server certificate for a "
                        "new --host); must lie outside --dir; default: <dir>-ca-offline/ca.key. Keep it offline")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("register", help="put a hospital's public key (from `equifed-client keygen`) on the allow-list")
    p.add_argument("--dir", required=True, help="consortium folder made by `setup`")
    p.add_argument("--site", required=True, help="the hospital's name (as it passes to `equifed-client start`)")
    p.add_argument("--public-key", required=True, metavar="FILE",
                   help="the <site>.pub the hospital sent (OpenSSH EC public key; a private key is refused)")
    p.add_argument("--replace", action="store_true",
                   help="the site is registered with another key: replace it (the old key loses access)")
    p.add_argument("--no-register", action="store_true",
                   help="only write consortium.json; the key enters the SuperLink's database at the next `start` "
                        "(use this while the server runs)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("start", help="start the SuperLink and run the equifed app")
    p.add_argument("--dir", required=True, help="consortium folder made by `setup`")
    p.add_argument("--out", required=True, help="run folder (metrics, per-site table, checkpoints)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument("--port", type=int, default=9092, help="port the hospitals dial (default 9092)")
    add_run_arguments(p)
    p.add_argument("--min-sites", type=int, default=2,
                   help="a round goes on with this many sites; fewer connected and the round waits")
    p.add_argument("--wait-for-sites", type=int, default=0,
                   help="before starting, wait for this many hospitals (default: all registered)")
    p.add_argument("--connect-timeout", type=float, default=600,
                   help="stop waiting for hospitals after this many seconds (then start if --min-sites are in)")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="give up on the run after this many seconds")
    p.set_defaults(func=cmd_start)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
