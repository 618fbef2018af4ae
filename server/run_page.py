"""The run page: `<out>/index.html`, one self-contained file (inline CSS and SVG drawn here, no script, nothing
fetched) that a consortium's people open to follow a run. It is rebuilt from the run folder's own files after each
round and replaced atomically, so a reader never sees half a page.

Every value read from a file is HTML-escaped (site names and refusal texts come from hospitals). Each section is
built on its own: a file that is missing leaves its section out, one that cannot be read leaves a note and a log
line, and neither stops the page, nor the training run that asked for it.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from flwr.common import log

PAGE = "index.html"
MAX_GRID_ROUNDS = 40  # the site-by-round grid shows the latest rounds only
MAX_LISTED = 50  # rows of a long list (refusals, rejected files) shown before "... and N more"
# the site's own words in a budget refusal (client/app.py): its budget, when the server has not been told it
_BUDGET_IN_REFUSAL = re.compile(r"max-epsilon=([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")
_STATUS_CLASS = {"ok": "ok", "no reply": "gone", "budget exhausted": "budget", "refused by policy": "refused",
                 "refused": "refused", "not in secure sum": "unsummed"}
_STATUS_RANK = {"ok": 0, "no reply": 1, "budget exhausted": 2, "refused by policy": 3, "refused": 3,
                "not in secure sum": 1}
_SPENT = ("ok", "not in secure sum")  # rows whose epsilon is the ledger after training (spent either way)
_STATUS_LETTER = {"ok": "&#10003;", "not in secure sum": "S"}  # others: the status's first letter
_DIGITS = {"elapsed_s": 1, "sites_trained": 0}
_MODELS = ("final_model.pt", "best_model.pt", "calibrated_model.pt", "final_model_detector.pt",
           "best_model_detector.pt")
_LINKED = ("metrics.csv", "per_site.csv", "summary.json", "learning_curve.png", "shift.csv", "shift.png",
           "shift_consortium.json", "fairness_audit.html", "fairness_audit.json", "calibration.json", "rejected.csv",
           "flower.log", "analysis_errors.log")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2330}
body{background:#f4f6f9}
header{background:#1d2b45;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d3e6}main{padding:8px 24px 32px;max-width:1200px}
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;margin:14px 0;padding:10px 16px}
h2{font-size:16px;margin:4px 0 8px}table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border-bottom:1px solid #e6e9ef;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}.note{color:#5a6477;font-size:13px}
.problem{color:#8a1c1c}.ok{background:#d8f0dc}.gone{background:#e3e5e8}.budget{background:#ffe4b3}
.unsummed{background:#d6e4f5}
.refused{background:#f3d3f0}.error{background:#f7c9c9}.verdict-none{color:#1d6b2c}.verdict-shift{color:#9a5b00}
.grid td{text-align:center;min-width:26px;font-size:12px}.grid td:first-child{text-align:left}
ul{margin:4px 0;padding-left:20px}
.bar{display:inline-block;height:10px;background:#4c78a8;vertical-align:middle}
.bar.over{background:#c0392b}code{font-size:12px}
"""


@dataclass(frozen=True)
class Series:
    """One line of a chart: (x, y) points, its legend name and style."""

    name: str
    points: tuple[tuple[float, float], ...]
    colour: str
    width: float = 1.6
    dashed: bool = False


@dataclass(frozen=True)
class Folder:
    """What the page reads from a run folder (None: the file is not there)."""

    out_dir: Path
    rows: list[dict] | None
    sites: list[dict] | None
    summary: dict | None  # the run's, once it finished; None while it runs

    @classmethod
    def read(cls, out_dir: Path, problems: list[str]) -> Folder:
        rows = _guard(problems, "metrics.csv", lambda: _read_csv(out_dir / "metrics.csv"))
        sites = _guard(problems, "per_site.csv", lambda: _read_csv(out_dir / "per_site.csv"))
        summary = _guard(problems, "summary.json", lambda: _read_json(out_dir / "summary.json"))
        done = max(_rounds(rows or []), default=0)
        if summary is not None and (_int(summary.get("rounds")) or 0) < done:
            summary = None  # an earlier run's, before this resume: this one is still going
        return cls(out_dir, rows, sites, summary)


def write_run_page(out_dir: Path, *, budgets: Mapping[str, float] | None = None,
                   run_config: Mapping | None = None, planned_rounds: int | None = None,
                   warnings: Sequence[str] = (), finished: bool = False) -> Path:
    """Write `<out_dir>/index.html` from the run folder's files and return its path.

    `budgets`: each site's epsilon budget when the caller knows it (else a budget a site stated in a refusal is
    used); `run_config`: the run's config (else summary.json's, once the run has finished); `planned_rounds`: the
    rounds the run will have; `warnings`: lines the caller wants shown; `finished`: the run has ended (a failed run
    has no summary.json), so the page stops reloading itself. Files are never the reason this raises:
    only a failure to write the page does (an OSError)."""
    out_dir = Path(out_dir)
    problems: list[str] = []
    folder = Folder.read(out_dir, problems)
    saved = (folder.summary if isinstance(folder.summary, dict) else {}).get("run_config")
    config = dict(run_config or (saved if isinstance(saved, dict) else {}))
    planned = planned_rounds or _int(config.get("num-server-rounds")) or _int((folder.summary or {})
                                                                              .get("planned_rounds"))
    sections = [
        ("learning curves", lambda: _learning(folder)),
        ("privacy", lambda: _privacy(folder, budgets or {}, config)),
        ("sites", lambda: _sites(folder)),
        ("dataset shift", lambda: _shift(out_dir)),
        ("fairness", lambda: _fairness(out_dir)),
        ("rejected files", lambda: _rejected(out_dir, folder)),
        ("files", lambda: _files(out_dir)),
    ]
    body = [_guard(problems, name, build) or "" for name, build in sections]
    header = _guard(problems, "header", lambda: _header(folder, planned)) or "<header><h1>equifed run</h1></header>"
    warned = _guard(problems, "warnings", lambda: _warnings(folder, warnings, problems)) or ""
    going = not (folder.summary or finished)  # a failed run writes no summary: `finished` says it ended
    refresh = '<meta http-equiv="refresh" content="30">' if going else ""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>equifed run {_e(out_dir.name)}</title><style>{_CSS}</style></head>\n<body>{header}<main>"
            f"{body[0]}{body[1]}{body[2]}{warned}{''.join(body[3:])}</main></body></html>\n")
    return _replace(out_dir / PAGE, page)


def _replace(path: Path, text: str) -> Path:
    """Write through a temporary file in the same folder and rename it over the page (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(prefix=".index.", suffix=".html.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _guard(problems: list[str], what: str, build: Callable):
    """`build()`, or None (logged, and noted on the page) when it raises: one bad file costs one section."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001  a report never ends a training run
        problems.append(f"the run page could not use {what}: {type(err).__name__}: {err}")
        log(WARNING, "equifed run page: %s left out (%s: %s)", what, type(err).__name__, err)
        return None


# --- reading the folder ------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        return [row for row in csv.DictReader(fh) if _int(row.get("round")) is not None]


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    return value


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(value) -> int | None:
    number = _num(value)
    return int(number) if math.isfinite(number) and number == int(number) else None


def _e(value) -> str:
    """A value from a file as HTML text (control characters, which HTML has no use for, replaced)."""
    return html.escape(_CONTROL.sub("\ufffd", str(value)), quote=True)


def _fmt(value, digits: int = 3) -> str:
    number = _num(value)
    if math.isnan(number):
        return "&ndash;"
    return "&infin;" if math.isinf(number) else f"{number:.{digits}f}"


def _rounds(rows: list[dict]) -> list[int]:
    return sorted({_int(r.get("round")) for r in rows})


def _by_site(sites: list[dict]) -> dict[str, list[dict]]:
    """per_site.csv's rows of each site (sorted by name), in the order they were written."""
    out: dict[str, list[dict]] = {}
    for r in sites:
        if r.get("site"):
            out.setdefault(str(r["site"]), []).append(r)
    return dict(sorted(out.items()))


# --- sections ------------------------------------------------------------------------------------------------------


def _header(folder: Folder, planned: int | None) -> str:
    rows, summary = folder.rows or [], folder.summary
    done = max(_rounds(rows), default=0)
    if summary:
        state = (f"stopped early after round {_e(summary.get('stopped_at_round'))}: {_e(summary.get('stopped_reason'))}"
                 if summary.get("stopped_early") else f"{_e(summary.get('status', 'finished'))}, {done} round(s)")
    else:
        state = f"running: round {done}" + (f" of {planned}" if planned else "") + " done"
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    figures = (f" &middot; holdout AUROC {_fmt(first.get('holdout_auroc'))} &rarr; {_fmt(last.get('holdout_auroc'))}"
               if math.isfinite(_num(last.get("holdout_auroc"))) else "")
    best = _int(last.get("best_round"))
    if best is not None:
        figures += f" &middot; best: round {best} ({_e(last.get('best_metric'))} {_fmt(last.get('best_value'))})"
    updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f"<header><h1>equifed run &middot; {_e(folder.out_dir.name)}</h1>"
            f"<p>{state}{figures} &middot; page written {updated}</p></header>")


def _learning(folder: Folder) -> str:
    rows, sites = folder.rows or [], folder.sites or []
    if not rows and not sites:
        return _section("Learning curves", '<p class="note">No round has finished yet.</p>')
    grouped = _by_site(sites)
    colour = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(grouped)}
    auroc = [_series(rows, "holdout_auroc", "holdout (global)", "#111", width=2.6),
             _series(rows, "val_auroc", "sites' validation (pooled)", "#555", dashed=True)]
    loss = [_series(rows, "holdout_loss", "holdout (global)", "#111", width=2.6),
            _series(rows, "val_loss", "sites' validation (pooled)", "#555", dashed=True)]
    for name, rows_of in grouped.items():
        mine = [r for r in rows_of if r.get("status") == "ok"]
        auroc.append(_series([r for r in mine if r.get("phase") == "evaluate"], "eval-auroc", name, colour[name]))
        loss.append(_series([r for r in mine if r.get("phase") == "train"], "train-loss", f"{name} (train)",
                            colour[name]))
    withheld = any("eval-auroc" in str(r.get("withheld", "")) for r in sites)
    charts = ('<div class="charts">' + _chart("AUROC of the global model", auroc, y_label="AUROC", lo=0.0, hi=1.0)
              + _chart("Loss", loss, y_label="loss", lo=0.0) + "</div>")
    note = ('<p class="note">The sites withheld their own evaluation metrics (differential privacy): only the '
            "holdout is scored.</p>" if withheld else "")
    return _section("Learning curves", charts + note + _round_table(rows))


def _series(rows: list[dict], key: str, name: str, colour: str, width: float = 1.6, dashed: bool = False) -> Series:
    points = tuple((float(_int(r.get("round"))), _num(r.get(key))) for r in rows if math.isfinite(_num(r.get(key))))
    return Series(name, points, colour, width, dashed)


def _round_table(rows: list[dict]) -> str:
    columns = [("holdout_auroc", "holdout AUROC"), ("holdout_loss", "holdout loss"),
               ("holdout_accuracy", "accuracy"), ("holdout_ece", "ECE"), ("holdout_brier", "Brier"),
               ("val_auroc", "val AUROC"), ("val_loss", "val loss"), ("train_loss", "train loss"),
               ("sites_trained", "sites trained"), ("elapsed_s", "elapsed s")]
    columns = [(k, label) for k, label in columns if any(math.isfinite(_num(r.get(k))) for r in rows)]
    if not rows or not columns:
        return ""
    head = "".join(f"<th>{label}</th>" for _, label in columns)
    body = "".join(f"<tr><td>{_int(r.get('round'))}</td>"
                   + "".join(f'<td class="num">{_fmt(r.get(k), _DIGITS.get(k, 3))}</td>'
                             for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><tr><th>round</th>{head}</tr>{body}</table>"


def _privacy(folder: Folder, budgets: Mapping[str, float], config: Mapping) -> str:
    grouped = _by_site(folder.sites or [])
    names = list(grouped)
    if not names:
        return ""
    budget = {name: _num(budgets[name]) if name in budgets else _stated_budget(grouped[name]) for name in names}
    ledger, no_dp = {}, set()
    for name in names:
        by_round: dict[int, float] = {}
        for r in grouped[name]:
            eps = _num(r.get("epsilon"))
            if r.get("status") not in _SPENT or math.isnan(eps):
                continue
            if math.isinf(eps):
                no_dp.add(name)  # trained without DP: the weights carry no epsilon
                continue
            rnd = _int(r.get("round"))
            by_round[rnd] = max(eps, by_round.get(rnd, 0.0))  # the ledger after the round's last request
        ledger[name] = by_round
    if not any(ledger.values()):
        return "" if not no_dp else _section("Privacy", '<p class="note">Training runs without DP (the model '
                                             "weights carry no epsilon guarantee), and no site has released a "
                                             "statistic yet: no epsilon spent.</p>")
    colour = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}
    series = [Series(name, tuple((float(k), v) for k, v in sorted(ledger[name].items())), colour[name])
              for name in names]
    refs = sorted({(b, "budget") for b in budget.values() if math.isfinite(b)})
    target = _num(config.get("target-epsilon")) if str(config.get("dp", "")).lower() == "true" else math.nan
    if math.isfinite(target):
        refs.append((target, "training target"))
    table = ["<table><tr><th>site</th><th>epsilon spent</th><th>budget</th><th></th><th>note</th></tr>"]
    for name in names:
        spent = max(ledger[name].values(), default=math.nan)
        cap = budget[name]
        share = spent / cap if math.isfinite(spent) and math.isfinite(cap) and cap > 0 else math.nan
        bar = (f'<span class="bar{" over" if share > 1 else ""}" style="width:{min(share, 1.0) * 120:.0f}px"></span>'
               f" {share * 100:.0f}%" if math.isfinite(share) else "")
        note = "trained without DP: the model weights carry no epsilon guarantee" if name in no_dp else ""
        table.append(f'<tr><td>{_e(name)}</td><td class="num">{_fmt(spent, 2)}</td>'
                     f'<td class="num">{_fmt(cap, 2)}</td><td>{bar}</td><td>{note}</td></tr>')
    table.append("</table>")
    chart = _chart("Epsilon on each site's ledger", series, y_label="epsilon", lo=0.0, refs=tuple(refs))
    explain = ('<p class="note">Each site\'s own ledger after each round, at the site\'s own delta; a budget is '
               "shown where the site stated it (in a refusal) or the server was told it.</p>")
    return _section("Privacy", '<div class="charts">' + chart + "</div>" + explain + "".join(table))


def _examples(row: dict) -> str:
    """A site's example count, marked "~" when the site noised it."""
    noised = "num-examples" in str(row.get("noised", "")).split(",")
    return ("~" if noised else "") + _fmt(row.get("num-examples"), 0)


def _stated_budget(rows_of_site: list[dict]) -> float:
    """The budget a site gave in its latest refusal text (its max-epsilon); NaN when it gave none."""
    for r in reversed(rows_of_site):
        found = _BUDGET_IN_REFUSAL.search(str(r.get("error") or ""))
        if found:
            return float(found.group(1))
    return math.nan


def _sites(folder: Folder) -> str:
    sites = folder.sites or []
    grouped = _by_site(sites)
    if not grouped:
        return ""
    rounds = _rounds(sites)[-MAX_GRID_ROUNDS:]
    by_cell: dict[tuple[str, int], list[dict]] = {}
    for r in sites:
        by_cell.setdefault((str(r.get("site")), _int(r.get("round"))), []).append(r)
    head = "".join(f"<th>{r}</th>" for r in rounds)
    grid = [f'<table class="grid"><tr><th>site \\ round</th>{head}<th>last train loss</th><th>last site AUROC</th>'
            "<th>examples</th></tr>"]
    for name, mine in grouped.items():
        cells = []
        for rnd in rounds:
            here = by_cell.get((name, rnd), [])
            if not here:
                cells.append('<td title="not asked">&middot;</td>')
                continue
            worst = max(here, key=lambda r: _STATUS_RANK.get(str(r.get("status")), 4))
            status = str(worst.get("status"))
            tip = "; ".join(f"{r.get('phase')}: {r.get('status')}" for r in here)
            cells.append(f'<td class="{_STATUS_CLASS.get(status, "error")}" title="{_e(tip)}">'
                         f"{_STATUS_LETTER.get(status, _e(status[:1].upper()))}</td>")
        train = [r for r in mine if r.get("phase") == "train" and r.get("status") == "ok"]
        ev = [r for r in mine if r.get("phase") == "evaluate" and r.get("status") == "ok"]
        last_train, last_ev = (train[-1] if train else {}), (ev[-1] if ev else {})
        grid.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}"
                    f"<td class=\"num\">{_fmt(last_train.get('train-loss'))}</td>"
                    f"<td class=\"num\">{_fmt(last_ev.get('eval-auroc'))}</td>"
                    f"<td class=\"num\">{_examples(last_train)}</td></tr>")
    grid.append("</table>")
    legend = ('<p class="note"><span class="ok">&nbsp;&#10003;&nbsp;</span> ok &nbsp; '
              '<span class="budget">&nbsp;B&nbsp;</span> budget exhausted &nbsp; '
              '<span class="refused">&nbsp;R&nbsp;</span> refused &nbsp; '
              '<span class="gone">&nbsp;N&nbsp;</span> no reply &nbsp; '
              '<span class="unsummed">&nbsp;S&nbsp;</span> trained, not in the secure sum &nbsp; '
              '<span class="error">&nbsp;E&nbsp;</span> '
              "error (hover a cell for each request)"
              + (f"; the latest {MAX_GRID_ROUNDS} rounds" if len(_rounds(sites)) > MAX_GRID_ROUNDS else "") + "</p>")
    refusals = [r for r in sites if r.get("status") != "ok"]
    listed = "".join(f"<tr><td>{_int(r.get('round'))}</td><td>{_e(r.get('phase', ''))}</td><td>{_e(r.get('site'))}"
                     f"</td><td class=\"{_STATUS_CLASS.get(str(r.get('status')), 'error')}\">{_e(r.get('status'))}"
                     f"</td><td><code>{_e(str(r.get('error') or '')[:400])}</code></td></tr>"
                     for r in refusals[-MAX_LISTED:])
    more = (f'<p class="note">... and {len(refusals) - MAX_LISTED} earlier ones (per_site.csv)</p>'
            if len(refusals) > MAX_LISTED else "")
    refusal_table = (("<h2>Refusals and missing replies</h2><table><tr><th>round</th><th>request</th><th>site</th>"
                      f"<th>status</th><th>reason</th></tr>{listed}</table>{more}") if refusals
                     else '<p class="note">Every site answered every request.</p>')
    return _section("Sites", "".join(grid) + legend + refusal_table)


def _shift(out_dir: Path) -> str:
    rows = _read_csv(out_dir / "shift.csv")
    if not rows:
        return ""
    last = max(_rounds(rows))
    columns = [("p_covariate", "p covariate"), ("p_label", "p label"), ("p_scanner", "p scanner"),
               ("p_intensity", "p intensity"), ("label_shift_l1", "label shift L1"), ("mmd2", "MMD&sup2;")]
    body = []
    for r in [r for r in rows if _int(r.get("round")) == last]:
        verdict = str(r.get("shift") or r.get("status") or "")
        css = "verdict-none" if verdict == "none" else "verdict-shift"
        body.append(f'<tr><td>{_e(r.get("site"))}</td><td class="{css}">{_e(verdict)}</td>'
                    + "".join(f'<td class="num">{_fmt(r.get(k))}</td>' for k, _ in columns) + "</tr>")
    head = "".join(f"<th>{label}</th>" for _, label in columns)
    links = _links(out_dir, ("shift.png", "shift.csv"))
    return _section(f"Dataset shift (round {last}, each site against the rest)",
                    f"<table><tr><th>site</th><th>verdict</th>{head}</tr>{''.join(body)}</table>{links}")


def _fairness(out_dir: Path) -> str:
    audit = _read_json(out_dir / "fairness_audit.json")
    report = (out_dir / "fairness_audit.html").exists()
    if audit is None and not report:
        return ""
    verdict = (audit or {}).get("verdict") or {}
    text = _e(verdict.get("text", "")) if isinstance(verdict, dict) else ""
    flag = ""
    if isinstance(verdict, dict) and "significant" in verdict:
        flag = ("<p><b>An impermissible (social-pathway) effect is significant.</b></p>" if verdict["significant"]
                else "<p>No significant impermissible (social-pathway) effect.</p>")
    round_ = (audit or {}).get("round")
    title = "Fairness audit" + (f" (round {_e(round_)})" if round_ is not None else "")
    caveats = (audit or {}).get("warnings") or []
    more = (f'<p class="note">{len(caveats)} warning(s) on positivity or the graph, in the report.</p>'
            if isinstance(caveats, list) and caveats else "")
    link = '<p><a href="fairness_audit.html">The full audit report</a></p>' if report else ""
    return _section(title, f"{flag}<p>{text}</p>{more}{link}")


def _warnings(folder: Folder, given: Sequence[str], problems: list[str]) -> str:
    lines = [str(w) for w in given]
    summary = folder.summary or {}
    for key in ("warnings", "notes"):
        items = summary.get(key) or []
        lines += [("note: " if key == "notes" else "") + str(w) for w in (items if isinstance(items, list) else [])]
    for failure in summary.get("analysis_failures") or []:
        if isinstance(failure, dict):
            when = f"round {failure['round']}: " if failure.get("round") is not None else ""
            lines.append(f"{when}{failure.get('analysis')} failed: {failure.get('error')}")
    if not summary:  # while running: the rows say it (summary.json repeats them at the end)
        for r in folder.rows or []:
            if r.get("analysis_failed"):
                lines.append(f"round {_int(r.get('round'))}: analysis failed: {r['analysis_failed']}")
    for r in folder.rows or []:
        if r.get("stopped"):
            lines.append(f"round {_int(r.get('round'))}: stopped early: {r['stopped']}")
    lines += problems
    if (folder.out_dir / "analysis_errors.log").exists():
        lines.append("an analysis raised; its traceback is in analysis_errors.log")
    if not lines:
        return ""
    items = "".join(f'<li class="{"problem" if line in problems else ""}">{_e(line)}</li>' for line in lines)
    return _section("Warnings and notes", f"<ul>{items}</ul>")


def _rejected(out_dir: Path, folder: Folder) -> str:
    """rejected.csv (a simulation gathers it from the sites' folders); in a deployment, the counts the sites
    report with their training replies."""
    path = out_dir / "rejected.csv"
    if not path.exists():
        reported = {}
        for name, rows_of in _by_site(folder.sites or []).items():
            counts = [_num(r.get("rejected")) for r in rows_of if r.get("phase") == "train" and r.get("status") == "ok"]
            counts = [c for c in counts if math.isfinite(c)]
            if counts and counts[-1] > 0:
                reported[name] = counts[-1]
        if not reported:
            return ""
        listed = ", ".join(f"{_e(name)}: {n:.0f}" for name, n in reported.items())
        return _section("Rejected files", f"<p>Images the sites could not use, as each reported in its latest "
                                          f"training round: {listed}.</p>")
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return _section("Rejected files", '<p class="note">No site rejected an image.</p>')
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("site", ""))] = counts.get(str(r.get("site", "")), 0) + 1
    per_site = ", ".join(f"{_e(site)}: {n}" for site, n in sorted(counts.items()))
    listed = "".join(f"<tr><td>{_e(r.get('site', ''))}</td><td><code>{_e(r.get('image_path', ''))}</code></td>"
                     f"<td>{_e(r.get('reason', ''))}</td></tr>" for r in rows[:MAX_LISTED])
    more = (f'<p class="note">... and {len(rows) - MAX_LISTED} more (rejected.csv)</p>'
            if len(rows) > MAX_LISTED else "")
    return _section(f"Rejected files ({len(rows)})", f"<p>{per_site}</p><table><tr><th>site</th><th>file</th>"
                                                      f"<th>reason</th></tr>{listed}</table>{more}")


def _files(out_dir: Path) -> str:
    models = []
    for name in _MODELS:
        path = out_dir / name
        if not path.exists():
            continue
        card_file = path.with_suffix(".json")
        card = _read_json(card_file) if card_file.exists() else None
        described = ", ".join(f"{_e(k)} {_e(v)}" for k, v in (card or {}).items() if not isinstance(v, (dict, list)))
        card_link = f' (<a href="{card_file.name}">card</a>: {described})' if card else " (no card)"
        models.append(f'<li><a href="{name}">{name}</a> {path.stat().st_size / 1e6:.1f} MB{card_link}</li>')
    links = _links(out_dir, _LINKED)
    if not models and not links:
        return ""
    return _section("Files", (f"<ul>{''.join(models)}</ul>" if models else "") + links)


def _links(out_dir: Path, names: Sequence[str]) -> str:
    """Relative links to the named files that exist (fixed names: nothing from a file goes into a link)."""
    present = [f'<a href="{name}">{name}</a>' for name in names if (out_dir / name).exists()]
    return f'<p class="note">{" &middot; ".join(present)}</p>' if present else ""


def _section(title: str, content: str) -> str:
    return f"<section><h2>{title}</h2>{content}</section>"


# --- the charts: inline SVG ------------------------------------------------------------------------------------


def _chart(title: str, series: Sequence[Series], *, y_label: str, lo: float | None = None, hi: float | None = None,
           refs: Sequence[tuple[float, str]] = (), width: int = 560, height: int = 260) -> str:
    """A line chart over rounds: each series a polyline with its points (hover: name, round, value), dashed
    horizontal reference lines (`refs`: value, label), the legend on the right."""
    series = [s for s in series if s.points]
    if not series:
        return f'<div><b>{_e(title)}</b><p class="note">no values yet</p></div>'
    left, right, top, bottom = 46, 170, 24, 34
    height = max(height, top + 16 * len(series) + 20)
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points] + [v for v, _ in refs]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    y0 = lo if lo is not None else min(ys)
    y1 = hi if hi is not None else max(ys) * 1.05 if max(ys) > 0 else max(ys) + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{_e(title)}" font-size="11" font-family="sans-serif">',
           f'<text x="{left}" y="15" font-size="13" font-weight="bold">{_e(title)}</text>']
    for tick in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#e4e7ec"/>'
                   f'<text x="{left - 4}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    step = max(1, math.ceil((x1 - x0) / 12))
    for tick in range(int(x0), int(x1) + 1, step):
        out.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9aa3b2"/>'
               f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle">round</text>'
               f'<text transform="translate(11 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f"{_e(y_label)}</text>")
    for value, label in refs:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(value):.1f}" y2="{py(value):.1f}" '
                   f'stroke="#c0392b" stroke-dasharray="6 3"/><text x="{left + plot_w - 2}" y="{py(value) - 3:.1f}" '
                   f'text-anchor="end" fill="#c0392b">{_e(label)} {value:g}</text>')
    for i, s in enumerate(series):
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{s.colour}" stroke-width="{s.width}"{dash}/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{s.colour}"><title>{_e(s.name)}, round '
                f"{x:g}: {y:.4g}</title></circle>" for x, y in s.points]
        ly = top + 8 + 16 * i
        out.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{ly}" y2="{ly}" '
                   f'stroke="{s.colour}" stroke-width="{max(s.width, 2)}"{dash}/><text x="{left + plot_w + 32}" '
                   f'y="{ly + 4}">{_e(_short(s.name))}<title>{_e(s.name)}</title></text>')
    out.append("</svg>")
    return "<div>" + "".join(out) + "</div>"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round numbers between lo and hi, about `count` of them."""
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _short(name: str, limit: int = 26) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"
