"""`equifed-client`: the hospital's own command line.

Subcommands register themselves in build_parser() with a `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def _print_ledger(report: dict) -> None:
    print(f"privacy ledger of site {report['site']}: {report['path']}")
    print(f"site epsilon = {report['epsilon']:.4f} at delta = {report['delta']:g} "
          f"(every dataset's history composed: what the budget is checked against)")
    for ds in report["datasets"]:
        print()
        print(f"dataset {ds['fingerprint'][:16]}  (created {ds['created']}, last used {_fmt(ds['last_used'])})")
        print(f"  epsilon = {ds['epsilon']:.4f} at delta = {ds['delta']:g}")
        print(f"    from training: {ds['epsilon_train']:.4f} ({ds['train_steps']} noised steps)")
        print(f"    from releases: {ds['epsilon_release']:.4f} ({ds['releases']} released statistics)")
        header = ("round", "kind", "label", "run", "sigma", "q", "steps", "eps after", "time (UTC)")
        rows = [
            (_fmt(e["round"]), e["kind"], e["label"] or "-", _fmt(e["run_id"]), f"{e['sigma']:.4g}",
             f"{e['q']:.4g}", str(e["steps"]), f"{e['epsilon_after']:.4f}", e["time"])
            for e in ds["entries"]
        ]
        if not rows:
            print("  (no charges yet)")
            continue
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()
    print(f"note: {report['note']}")


def cmd_ledger(args: argparse.Namespace) -> int:
    """Show what every dataset of this site has spent, ever. Read-only."""
    from client.ledger import LedgerError, ledger_path, ledger_report  # opacus: slow to import, only needed here

    try:
        report = ledger_report(args.data, delta=args.delta)
    except FileNotFoundError:
        print(f"no privacy ledger at {ledger_path(args.data)}: this site has not trained or released "
              f"anything with differential privacy yet", file=sys.stderr)
        return 2
    except LedgerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_ledger(report)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the data folder as `start` does, print the summary; nothing is sent."""
    from client.supernode import DataFolderError, check_data

    try:
        summary = check_data(args.data, site=args.site, image_size=args.image_size, seed=args.seed)
    except DataFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """Validate the data folder, then run this hospital's SuperNode against the server."""
    from client.supernode import run_site

    return run_site(args.site, args.data, args.server, args.ca, args.key, image_size=args.image_size,
                    seed=args.seed, max_epsilon=args.max_epsilon, audit_log=args.audit_log,
                    runtime_port=args.runtime_port, max_wait=args.max_wait, auth_retries=args.auth_retries,
                    log_file=args.log_file)


def add_deployment_commands(sub) -> None:
    def data_args(p, site_required: bool) -> None:
        p.add_argument("--data", required=True, help="the site's data folder (holds manifest.csv)")
        p.add_argument("--site", required=site_required, help="this hospital's name (as registered)")
        p.add_argument("--image-size", type=int, default=64, help="image size the consortium trains at")
        p.add_argument("--seed", type=int, default=0, help="split seed the consortium uses")

    p = sub.add_parser("check", help="validate the site's data folder and print a summary")
    data_args(p, site_required=False)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("start", help="validate the data, then connect this hospital to the consortium")
    data_args(p, site_required=True)
    p.add_argument("--server", required=True, help="the consortium server, HOST:PORT")
    p.add_argument("--ca", required=True, help="the consortium's CA certificate (ca.crt)")
    p.add_argument("--key", required=True, help="this hospital's private key (<site>.key from `keygen`)")
    p.add_argument("--max-epsilon", type=float, default=None,
                   help="this site's privacy budget (the smaller of this and site.toml applies)")
    p.add_argument("--audit-log", default=None,
                   help="append a JSON line describing every message this site sends")
    p.add_argument("--runtime-port", type=int, default=None,
                   help="local port of the SuperNode's runtime API (default: a free one)")
    p.add_argument("--max-wait", type=float, default=3600,
                   help="give up when the server stays unreachable this many seconds")
    p.add_argument("--auth-retries", type=int, default=2,
                   help="retries after the server refuses the key (it may be registered a moment later)")
    p.add_argument("--log-file", default=None, help="also write the SuperNode's output here")
    p.set_defaults(func=cmd_start)


SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the names `equifed-server register` accepts


def make_site_keys(folder: Path, site: str) -> tuple[Path, Path, str]:
    """This hospital's SuperNode key pair, made here: EC P-384 in OpenSSH format (what Flower's
    `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read).
    `<site>.key` is created owner-only (0600) and never overwritten; `<site>.pub` is what the
    consortium registers. Returns (key, pub, fingerprint); FileExistsError if a key is there."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = folder / f"{site}.key", folder / f"{site}.pub"
    if key_path.exists() or pub_path.exists():
        raise FileExistsError(key_path if key_path.exists() else pub_path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # born owner-only, never replaced
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    pub_path.write_bytes(public + f" equifed-site-{site}\n".encode())
    return key_path, pub_path, "SHA256:" + hashlib.sha256(public).hexdigest()


def cmd_keygen(args: argparse.Namespace) -> int:
    """Make this hospital's key pair; only the public key is sent to the consortium."""
    if not SITE_NAME.match(args.site):
        print(f"error: site name {args.site!r}: use letters, digits, '_', '-' or '.'", file=sys.stderr)
        return 2
    try:
        key, pub, fingerprint = make_site_keys(Path(args.out), args.site)
    except FileExistsError as err:
        print(f"error: {err} already exists; it is not overwritten (a registered key would stop working). "
              f"Choose another --out, or delete the old pair first if you mean to replace it", file=sys.stderr)
        return 2
    print(f"site {args.site}: new SuperNode key pair (EC P-384, OpenSSH format)")
    print(f"  private key  {key.resolve()}  (owner-only; it never leaves this hospital: "
          f"`equifed-client start --key {key}`)")
    print(f"  public key   {pub.resolve()}")
    print(f"  fingerprint  {fingerprint}")
    print(f"send the consortium {pub.name} (only that file; it is public) and confirm the fingerprint with them over "
          f"another channel; they send back ca.crt and the server address")
    return 0


def add_keygen_command(sub) -> None:
    p = sub.add_parser("keygen", help="make this hospital's SuperNode key pair; send only the .pub to the consortium")
    p.add_argument("--site", required=True, help="this hospital's name (as the consortium registers it)")
    p.add_argument("--out", required=True, help="folder for <site>.key (owner-only) and <site>.pub")
    p.set_defaults(func=cmd_keygen)


def cmd_adapt(args: argparse.Namespace) -> int:
    """Prior adaptation of a new site from unlabelled images (client/adapt.py)."""
    from client.adapt import main as adapt_main

    return adapt_main(args)


def add_adapt_command(sub) -> None:
    p = sub.add_parser("adapt", help="estimate this site's label prior from unlabelled images and correct the "
                                     "global model's probabilities for it")
    p.add_argument("--data", required=True, help="the site's data folder (manifest.csv; labels optional)")
    p.add_argument("--model", required=True, help="the global model (final_model.pt or a round checkpoint)")
    p.add_argument("--consortium-stats", required=True,
                   help="the consortium's released shift statistics (shift_consortium.json of a run folder)")
    p.add_argument("--out", required=True, help="folder for adapted_predictions.csv and prior.json")
    p.add_argument("--image-size", type=int, default=None, help="default: the consortium's image size")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap interval")
    p.set_defaults(func=cmd_adapt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equifed-client", description="equifed hospital client")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ledger", help="show the site's privacy ledger (epsilon spent per dataset)")
    p.add_argument("--data", required=True, help="the site's data folder (holds manifest.csv and .equifed/)")
    p.add_argument("--delta", type=float, default=None,
                   help="report epsilon at this delta (default: the delta stored with each dataset)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ledger)

    add_keygen_command(sub)
    add_deployment_commands(sub)
    add_adapt_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 the job failed, 2 bad input or set-up (said in one line)."""
    args = build_parser().parse_args(argv)
    data = getattr(args, "data", None)
    if data is not None and not Path(data).is_dir():  # a misspelt folder is said as such, before anything else
        print(f"error: no folder {data} (the site's data folder, holding manifest.csv)", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
