"""`equifed-client`: the hospital's own command line.

Subcommands register themselves in build_parser() with a `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import json
import sys

from client.ledger import LedgerError, ledger_path, ledger_report


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def _print_ledger(report: dict) -> None:
    print(f"privacy ledger of site {report['site']}: {report['path']}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equifed-client", description="equifed hospital client")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ledger", help="show the site's privacy ledger (epsilon spent per dataset)")
    p.add_argument("--data", required=True, help="the site's data folder (holds manifest.csv and .equifed/)")
    p.add_argument("--delta", type=float, default=None,
                   help="report epsilon at this delta (default: the delta stored with each dataset)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ledger)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
