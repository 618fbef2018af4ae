"""The run folder a consortium reads: metrics.csv, per_site.csv, summary.json, a learning curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def write_tables(out_dir: Path, global_rows: list[dict], site_rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(global_rows).to_csv(out_dir / "metrics.csv", index=False)
    pd.DataFrame(site_rows).to_csv(out_dir / "per_site.csv", index=False)


def round_table(server_round: int, site_rows: list[dict], global_row: dict | None) -> str:
    """One round as printed lines: each site's train loss and AUROC of the global model."""
    rows = [r for r in site_rows if r["round"] == server_round]
    sites = sorted({r["site"] for r in rows})
    lines = []
    for site in sites:
        train = next((r for r in rows if r["site"] == site and r["phase"] == "train"), {})
        ev = next((r for r in rows if r["site"] == site and r["phase"] == "evaluate"), {})
        # a site that trained is "ok" unless its evaluation failed; evaluation may be off
        status = train.get("status", "absent") if train.get("status") != "ok" else ev.get("status", "ok")
        eps = _number(train.get("epsilon"))
        spent = f" | eps {eps:6.2f}" if math.isfinite(eps) else ""
        n = _number(train.get("num-examples"))
        approx = "~" if "num-examples" in str(train.get("noised", "")) else " "  # a noised count
        lines.append(
            f"  round {server_round:>3} | {site:<18} | train loss {_fmt(train.get('train-loss'))} "
            f"| site AUROC {_fmt(ev.get('eval-auroc'))} | n{approx}{int(n) if math.isfinite(n) else 0:>5}{spent} "
            f"| {status}"
        )
    if global_row:
        if any(math.isfinite(_number(global_row.get(k))) for k in ("holdout_loss", "holdout_auroc")):  # a holdout
            lines.append(
                f"  round {server_round:>3} | {'HOLDOUT (global)':<18} | loss {_fmt(global_row.get('holdout_loss'))} "
                f"| AUROC {_fmt(global_row.get('holdout_auroc'))} | acc {_fmt(global_row.get('holdout_accuracy'))}"
            )
        best_round = _number(global_row.get("best_round"))
        if math.isfinite(best_round) or math.isfinite(_number(global_row.get("val_loss"))):
            best = (f" | best: round {int(best_round)} ({global_row.get('best_metric')} "
                    f"{_fmt(global_row.get('best_value'))})" if math.isfinite(best_round) else "")
            lines.append(
                f"  round {server_round:>3} | {'VALIDATION (sites)':<18} | loss {_fmt(global_row.get('val_loss'))} "
                f"| AUROC {_fmt(global_row.get('val_auroc'))}{best}"
            )
        if isinstance(global_row.get("stopped"), str):
            lines.append(f"  round {server_round:>3} | STOPPED EARLY: {global_row['stopped']}")
        if global_row.get("analysis_failed"):
            lines.append(f"  round {server_round:>3} | analysis failed (training goes on): {global_row['analysis_failed']}")
    return "\n".join(lines)


def _number(value) -> float:
    """A metric read back from CSV or a record; NaN when absent."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "  -  "
    return f"{float(value):.3f}"


def plot_learning_curve(out_dir: Path, global_rows: list[dict], site_rows: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    sites = pd.DataFrame(site_rows)
    if not sites.empty and "eval-auroc" in sites.columns:
        ev = sites[(sites["phase"] == "evaluate") & (sites["status"] == "ok")]
        for site, part in ev.groupby("site"):
            ax.plot(part["round"], part["eval-auroc"], marker="o", alpha=0.6, label=str(site))
    glob = pd.DataFrame(global_rows)
    if not glob.empty and "holdout_auroc" in glob.columns and glob["holdout_auroc"].notna().any():
        ax.plot(glob["round"], glob["holdout_auroc"], "k-", lw=2.5, marker="s", label="holdout (global)")
    ax.set_xlabel("round")
    ax.set_ylabel("AUROC of the global model")
    ax.set_title("equifed learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out_dir / "learning_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


REGRESSION_TOLERANCE = {"auroc": 0.005, "loss": 0.02}


def regressions(rows: list[dict], best_round: int | None = None) -> list[str]:
    """Plain warnings when the final (or the best) global model scores worse on the holdout than the round-0
    model it started from (untrained, or pretrained): training made the model worse, which a finished run must
    not hide. Differences within `REGRESSION_TOLERANCE` (AUROC points; loss relative) are holdout noise."""
    by_round = {int(r["round"]): r for r in rows if "round" in r}
    start = by_round.get(0, {})
    out = []
    for what, rnd in (("final", max(by_round, default=None)), ("best", best_round)):
        if rnd is None or rnd == 0 or (what == "best" and rnd == max(by_round)):
            continue
        row = by_round.get(rnd, {})
        for key, worse in (("holdout_auroc", lambda a, b: a < b - REGRESSION_TOLERANCE["auroc"]),
                           ("holdout_loss", lambda a, b: a > b * (1 + REGRESSION_TOLERANCE["loss"]))):
            now, before = _number(row.get(key)), _number(start.get(key))
            if math.isfinite(now) and math.isfinite(before) and worse(now, before):
                out.append(f"the {what} global model (round {rnd}) is worse than the round-0 model it started "
                           f"from on the holdout: {key.replace('holdout_', '')} {before:.3f} -> {now:.3f}")
    return out
