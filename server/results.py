"""The run folder a consortium reads: metrics.csv, per_site.csv, summary.json, a learning curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from core_models.protocol import EPSILON, EVAL_AUROC, NUM_EXAMPLES, TRAIN_LOSS  # noqa: E402
from core_models.run_files import (CALIBRATED_MODEL, CALIBRATION_JSON, LEARNING_CURVE_PNG, METRICS_CSV,  # noqa: E402
                                   PER_SITE_CSV, SUMMARY_JSON)
from server.site_rows import EVALUATE, OK, SECURE, TRAIN, SiteRow  # noqa: E402


def write_tables(out_dir: Path, global_rows: list[dict], site_rows: list[SiteRow]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(global_rows).to_csv(out_dir / METRICS_CSV, index=False)
    pd.DataFrame([r.to_row() for r in site_rows]).to_csv(out_dir / PER_SITE_CSV, index=False)


def round_table(server_round: int, site_rows: list[SiteRow], global_row: dict | None) -> str:
    """One round as printed lines: each site's train loss and AUROC of the global model."""
    rows = [r for r in site_rows if r.round == server_round]
    lines = []
    for site in sorted({r.site for r in rows}):
        train, ev = (next((r for r in rows if r.site == site and r.phase == ph), None) for ph in (TRAIN, EVALUATE))
        # a site that trained is "ok" unless its evaluation failed; evaluation may be off
        status = (ev.status if ev else OK) if train and train.ok else (train.status if train else "absent")
        secure = " (secure sum)" if train is not None and train.aggregation == SECURE else ""
        lines.append(f"  round {server_round:>3} | {site:<18} | {_site_figures(train, ev)} | {status}{secure}")
    if global_row:
        if any(math.isfinite(_number(global_row.get(k))) for k in ("holdout_loss", "holdout_auroc")):  # a holdout
            lines.append(
                f"  round {server_round:>3} | {'HOLDOUT (global)':<18} | loss {_fmt(global_row.get('holdout_loss'))} "
                f"| AUROC {_fmt(global_row.get('holdout_auroc'))} | acc {_fmt(global_row.get('holdout_accuracy'))}"
                + _calibration_figures(global_row, "holdout_")
            )
        if math.isfinite(_number(global_row.get("calibration_temperature"))):  # run config calibrate, last round
            lines.append(f"  round {server_round:>3} | {_calibrated_line(global_row)}")
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


def _site_figures(train: SiteRow | None, ev: SiteRow | None) -> str:
    """A site's train loss, the global model's AUROC at the site, its count ("~": noised) and its epsilon."""
    nothing = SiteRow(0, "", "", "")
    train, ev = train or nothing, ev or nothing
    eps, n = train.metric(EPSILON), train.metric(NUM_EXAMPLES)
    approx = "~" if train.disclosure and NUM_EXAMPLES in train.disclosure.noised else " "
    return (f"train loss {_fmt(train.metrics.get(TRAIN_LOSS))} | site AUROC {_fmt(ev.metrics.get(EVAL_AUROC))} "
            f"| n{approx}{int(n) if math.isfinite(n) else 0:>5}" + (f" | eps {eps:6.2f}" if math.isfinite(eps) else ""))


def _calibrated_line(row: dict) -> str:
    """The calibrated model's holdout figures and the fit (without a holdout: the fit)."""
    if not math.isfinite(_number(row.get("holdout_calibrated_loss"))):
        return f"{'CALIBRATION':<18} | {_calibration_text(row)}"
    return (f"{'HOLDOUT calibrated':<18} | loss {_fmt(row.get('holdout_calibrated_loss'))} "
            f"| AUROC {_fmt(row.get('holdout_calibrated_auroc'))} | acc {_fmt(row.get('holdout_calibrated_accuracy'))}"
            f"{_calibration_figures(row, 'holdout_calibrated_')} | {_calibration_text(row)}")


def _calibration_figures(row: dict, prefix: str) -> str:
    """" | ECE x | Brier y" when the row has them (the probabilities' calibration on the holdout)."""
    if not math.isfinite(_number(row.get(f"{prefix}ece"))):
        return ""
    return f" | ECE {_fmt(row.get(f'{prefix}ece'))} | Brier {_fmt(row.get(f'{prefix}brier'))}"


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


def plot_learning_curve(out_dir: Path, global_rows: list[dict], site_rows: list[SiteRow]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    scored = [r for r in site_rows if r.phase == EVALUATE and r.ok and EVAL_AUROC in r.metrics]
    for site in sorted({r.site for r in scored}):
        part = [r for r in scored if r.site == site]
        ax.plot([r.round for r in part], [r.metric(EVAL_AUROC) for r in part], marker="o", alpha=0.6, label=site)
    glob = pd.DataFrame(global_rows)
    if not glob.empty and "holdout_auroc" in glob.columns and glob["holdout_auroc"].notna().any():
        ax.plot(glob["round"], glob["holdout_auroc"], "k-", lw=2.5, marker="s", label="holdout (global)")
    ax.set_xlabel("round")
    ax.set_ylabel("AUROC of the global model")
    ax.set_title("equifed learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out_dir / LEARNING_CURVE_PNG
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


REGRESSION_TOLERANCE = {"auroc": 0.005, "loss": 0.02}


def regressions(rows: list[dict], best_round: int | None = None) -> list[str]:
    """Plain warnings when the final (or the best) global model scores worse on the holdout than the round-0
    model it started from (untrained, or pretrained): training made the model worse, which a finished run must
    not hide. Differences within `REGRESSION_TOLERANCE` (AUROC points; loss relative) are holdout noise.

    Discrimination decides: a model whose holdout AUROC went down is worse (and a loss that went up with it is
    said too). One whose AUROC went up is not, whatever its loss: a loss that went up with it is about the
    probabilities' calibration, said in a note (`calibration_notes`), not a warning. With an unchanged AUROC the
    loss decides: the calibrated model's (run config calibrate) where one was fitted, else the raw one's."""
    return _judge(rows, best_round)[0]


def calibration_notes(rows: list[dict], best_round: int | None = None) -> list[str]:
    """Notes (not warnings) on a final or best model that ranks the holdout better than the round-0 model but
    whose raw probabilities lost calibration (holdout loss up): they need calibration, and where the run fitted
    one (run config calibrate) the calibrated figures say what it did."""
    return _judge(rows, best_round)[1]


def _judge(rows: list[dict], best_round: int | None) -> tuple[list[str], list[str]]:
    by_round = {int(r["round"]): r for r in rows if "round" in r}
    start = by_round.get(0, {})
    warnings, notes = [], []
    for what, rnd in (("final", max(by_round, default=None)), ("best", best_round)):
        if rnd is None or rnd == 0 or (what == "best" and rnd == max(by_round)):
            continue
        row = by_round.get(rnd, {})
        worse = f"the {what} global model (round {rnd}) is worse than the round-0 model it started from on the holdout"
        auroc, auroc0 = _number(row.get("holdout_auroc")), _number(start.get("holdout_auroc"))
        loss, loss0 = _number(row.get("holdout_loss")), _number(start.get("holdout_loss"))
        calibrated = _number(row.get("holdout_calibrated_loss"))
        ranked = math.isfinite(auroc) and math.isfinite(auroc0)
        auroc_down = ranked and auroc < auroc0 - REGRESSION_TOLERANCE["auroc"]
        auroc_up = ranked and auroc > auroc0 + REGRESSION_TOLERANCE["auroc"]
        loss_up = _rose(loss, loss0)
        judged_up = _rose(calibrated if math.isfinite(calibrated) else loss, loss0)
        if auroc_down:
            warnings.append(f"{worse}: auroc {auroc0:.3f} -> {auroc:.3f}")
            if loss_up:
                warnings.append(f"{worse}: loss {loss0:.3f} -> {loss:.3f}")
        elif judged_up and not auroc_up:  # no better at ranking, and its probabilities are worse
            figure = (f"calibrated loss {loss0:.3f} -> {calibrated:.3f}" if math.isfinite(calibrated)
                      else f"loss {loss0:.3f} -> {loss:.3f}")
            warnings.append(f"{worse}: {figure}")
        elif loss_up or judged_up:
            notes.append(_calibration_note(what, rnd, row, auroc0, auroc, loss0, loss, calibrated, loss_up))
    return warnings, notes


def _rose(loss: float, before: float) -> bool:
    """A holdout loss above the round-0 one by more than the tolerance."""
    return math.isfinite(loss) and math.isfinite(before) and loss > before * (1 + REGRESSION_TOLERANCE["loss"])


def _calibration_note(what: str, rnd: int, row: dict, auroc0: float, auroc: float, loss0: float, loss: float,
                      calibrated: float, loss_up: bool) -> str:
    ranks = ("" if not (math.isfinite(auroc) and math.isfinite(auroc0)) else
             f" ranks the holdout better than the round-0 model (AUROC {auroc0:.3f} -> {auroc:.3f})"
             if auroc > auroc0 + REGRESSION_TOLERANCE["auroc"] else " ranks the holdout as well as the round-0 model")
    text = f"the {what} global model (round {rnd}){ranks}"
    if loss_up:
        text += (f", but its raw probabilities are less well calibrated (holdout loss {loss0:.3f} -> {loss:.3f}, "
                 f"ECE {_fmt(row.get('holdout_ece')).strip()})")
    if not math.isfinite(calibrated):
        return text + "; they need calibration before a clinician reads them (run config calibrate = true)"
    return (text + f"; calibrated from the sites' validation splits ({_calibration_text(row)}, calibrated_model.pt): "
                   f"holdout loss {calibrated:.3f}, ECE {_fmt(row.get('holdout_calibrated_ece')).strip()}"
                   + (f", still above round 0's {loss0:.3f}" if _rose(calibrated, loss0) else ""))


def _calibration_text(row: dict) -> str:
    bias = _number(row.get("calibration_bias"))
    return (f"temperature {_number(row.get('calibration_temperature')):.3f}"
            + (f", bias {bias:+.3f}" if math.isfinite(bias) and bias != 0.0 else ""))


def calibration_summary(row: dict) -> dict | None:
    """summary.json's `calibration`: the fit of the run's last round and the holdout figures before and after;
    None when none was fitted."""
    if not math.isfinite(_number(row.get("calibration_temperature"))):
        return None
    out = {"round": row.get("round"), "model": CALIBRATED_MODEL, "fit": CALIBRATION_JSON,
           "temperature": _number(row.get("calibration_temperature")), "bias": _number(row.get("calibration_bias"))}
    for key in ("loss", "ece", "brier", "auroc", "accuracy"):
        if math.isfinite(_number(row.get(f"holdout_{key}"))):
            out[f"holdout_{key}"] = _number(row.get(f"holdout_{key}"))
            out[f"holdout_calibrated_{key}"] = _number(row.get(f"holdout_calibrated_{key}"))
    return out
