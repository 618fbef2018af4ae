"""What the server-side commands (`equifed-server start`, `equifed-simulate`) share on the console:
`-c KEY=VALUE` run-config overrides and the rounds printed as the server writes them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _parse_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> run-config dict; numbers and true/false get their types."""
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
