"""``equifed-audit``: the causal fairness audit of any model's predictions, as an HTML report plus JSON.

    equifed-audit --predictions preds.csv --graph synthetic --out audit/ [--site-column site] [--run-dir runs/x]

The CSV needs one column per observed node of the graph spec (a shipped name such as ``synthetic`` or a TOML path).
Exits 2 with a one-line message on bad input (missing file or column, invalid graph, unusable data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from fairness.graph import GraphError, load_graph_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="equifed-audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--predictions", required=True, help="CSV with the score, label, sensitive and mediator columns")
    p.add_argument("--graph", required=True, help="graph spec: a TOML path or a shipped name (e.g. synthetic)")
    p.add_argument("--out", required=True, help="folder for fairness_audit.html and fairness_audit.json")
    p.add_argument("--columns", default="", help="remap node=column pairs, comma-separated (e.g. A=sex,Yhat=prob)")
    p.add_argument("--site-column", default=None, help="per-site effects (forest plot) by this column")
    p.add_argument("--run-dir", default=None, help="a federated run folder: epsilon per site and shift summary")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--specificity", type=float, default=0.8, help="operating point of the group metrics")
    p.add_argument("--no-dowhy", action="store_true", help="skip DoWhy's refuters and independence tests")
    p.add_argument("--no-placebo", action="store_true", help="skip the permuted-A placebo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"equifed-audit: error: {msg}", file=sys.stderr)
        return 2

    if args.n_boot < 10:
        return fail(f"--n-boot must be at least 10, got {args.n_boot}")
    if not 0 < args.alpha < 1 or not 0 < args.specificity < 1:
        return fail("--alpha and --specificity must lie strictly between 0 and 1")
    path = Path(args.predictions)
    if not path.is_file():
        return fail(f"predictions file not found: {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        return fail(f"cannot read {path} as CSV: {err}")
    if frame.empty:
        return fail(f"{path} has no rows")
    try:
        spec = load_graph_spec(args.graph)
        if args.columns:
            pairs = [kv.split("=", 1) for kv in args.columns.split(",") if kv.strip()]
            if any(len(kv) != 2 for kv in pairs):
                return fail(f"--columns must be node=column pairs, got {args.columns!r}")
            spec = spec.with_columns({k.strip(): v.strip() for k, v in pairs})
        from fairness.audit import run_audit
        from fairness.report import run_context, write_report

        audit = run_audit(frame, spec, n_boot=args.n_boot, seed=args.seed, alpha=args.alpha,
                          specificity=args.specificity, placebo=not args.no_placebo, dowhy=not args.no_dowhy,
                          site_column=args.site_column)
        context = run_context(args.run_dir) if args.run_dir else None
        if args.run_dir and not Path(args.run_dir).is_dir():
            return fail(f"run folder not found: {args.run_dir}")
        paths = write_report(audit, args.out, context=context)
    except (GraphError, ValueError) as err:  # GraphError covers spec, column and estimation errors
        return fail(str(err))
    print(audit["verdict"]["text"])
    print(f"report: {paths['html']}\njson:   {paths['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
