"""`equifed-simulate SCENARIO.toml --out DIR`: generate (or reuse) a synthetic consortium
and train it federatedly through Flower's simulation engine on a SuperLink we own.

Exits non-zero when the run fails (Flower's own `flwr run --stream` exits 0 then).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from server.superlink import LocalSuperLink, app_snapshot
from simulations.generator import generate_consortium
from simulations.scenario import load_scenario

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "default.toml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="equifed-simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default=str(DEFAULT_SCENARIO), help="scenario TOML (default: the embedded 4-hospital consortium)")
    parser.add_argument("--out", default="runs/demo", help="run folder (data/ and results are written here)")
    parser.add_argument("--rounds", type=int, help="number of federated rounds (run config num-server-rounds)")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="override any [tool.flwr.app.config] key, e.g. -c strategy=fedprox")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--timeout", type=float, default=3600, help="give up on the run after this many seconds")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--overwrite-data", action="store_true", help="regenerate data even if the scenario changed")
    return parser.parse_args(argv)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--run-config expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        if value in ("true", "false"):
            value = value == "true"
        out[key.strip()] = value
    return out


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


class RoundPrinter:
    """Prints each new round of per_site.csv / metrics.csv as the server writes them."""

    def __init__(self, out: Path):
        self.out = out
        self.printed = -1

    def __call__(self) -> None:
        from server.results import round_table

        metrics, per_site = self.out / "metrics.csv", self.out / "per_site.csv"
        if not metrics.exists() or not per_site.exists():
            return
        try:
            glob = pd.read_csv(metrics).to_dict("records")
            sites = pd.read_csv(per_site).to_dict("records") if per_site.stat().st_size > 1 else []
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            return  # caught mid-write; next poll
        for row in glob:
            r = int(row["round"])
            if r > self.printed:
                print(round_table(r, sites, row), flush=True)
                self.printed = r


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(Path(args.scenario))
    print(f"equifed: scenario {scenario.name!r} -> {out}", flush=True)
    t0 = time.time()
    data_dir = out / "data"
    sites = generate_consortium(scenario, data_dir, overwrite=args.overwrite_data)
    holdout = data_dir / "holdout"
    print(f"equifed: {len(sites)} sites ready in {time.time() - t0:.1f}s: {', '.join(s.name for s in sites)}", flush=True)

    run_config = {
        "data-root": str(data_dir),
        "holdout-path": str(holdout) if (holdout / "manifest.csv").exists() else "",
        "image-size": scenario.image_size,
        "out-dir": str(out),
        "min-train-nodes": len(sites),
        "resume": bool(args.resume),
    }
    if args.rounds is not None:
        run_config["num-server-rounds"] = args.rounds
    run_config.update(_parse_overrides(args.run_config))
    federation = {"num-supernodes": len(sites), "client-resources-num-cpus": args.cpus_per_client}

    if not args.resume:
        for stale in ("metrics.csv", "per_site.csv", "summary.json"):
            (out / stale).unlink(missing_ok=True)
    with LocalSuperLink(log_path=out / "superlink.log") as link:
        with tempfile.TemporaryDirectory(prefix="equifed-app-") as tmp:  # edits to the tree cannot break the build
            run_id = link.submit(app_snapshot(Path(tmp) / "app"), run_config, federation)
        print(f"equifed: run {run_id} started on SuperLink {link.address}", flush=True)
        printer = RoundPrinter(out)
        status = link.wait(run_id, timeout=args.timeout, on_poll=printer)
        printer()
        (out / "flower.log").write_text(link.logs(run_id))
    n_rejected = collect_rejections(sites, out)
    ok = status.get("status") == "finished:completed"
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        summary.update({"flower_run_id": run_id, "flower_status": status.get("status"), "rejected_images": n_rejected})
        summary_path.write_text(json.dumps(summary, indent=2))
    if not ok:
        print(f"equifed: run {run_id} FAILED ({status.get('status')}); Flower log: {out / 'flower.log'}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    print(
        f"equifed: done in {time.time() - t0:.0f}s; holdout AUROC "
        f"{_fmt(summary.get('initial_holdout_auroc'))} -> {_fmt(summary.get('final_holdout_auroc'))}; "
        f"{n_rejected} rejected image(s); results in {out}",
        flush=True,
    )
    print_findings(out)
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


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
    per_site = out / "per_site.csv"
    if per_site.exists():
        rows = pd.read_csv(per_site)
        if "epsilon" in rows.columns and rows["epsilon"].notna().any():
            ledger = rows[rows["epsilon"] < float("inf")].groupby("site")["epsilon"].max()
            no_dp = rows["phase"].eq("train") & rows["epsilon"].eq(float("inf"))
            if len(ledger):
                print("equifed: epsilon on each site's ledger (at the site's own delta): "
                      + ", ".join(f"{site} {eps:.2f}" for site, eps in ledger.items())
                      + ("; training ran without DP, so the model weights carry no epsilon guarantee" if no_dp.any()
                         else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
