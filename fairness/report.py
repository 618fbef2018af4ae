"""The audit report: one self-contained HTML file (figures embedded as base64 PNG) plus the audit as JSON.

Sections: verdict; the causal graph with the impermissible edges in red; identification (paths, assumptions,
positivity, notes); effects (table and a forest plot with CIs, pooled and per site); group metrics (table and
plots); robustness (placebo, DoWhy refuters and independence tests); privacy (epsilon per site) and dataset shift,
when a run folder gives them; diagnostics. Renders a :class:`fairness.results.AuditResult`, pooled or federated
(or its stored JSON); each section is drawn on its own, so one that fails says so and the others still render.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core_models.protocol import EPSILON, EPSILON_BEFORE  # noqa: E402
from fairness.pse import primary_estimator  # noqa: E402
from fairness.results import AuditResult, as_result  # noqa: E402

SECTIONS = ("verdict", "graph", "identification", "effects", "group-metrics", "robustness", "privacy", "shift",
            "diagnostics")
SHIFT_COLUMNS = ("round", "site", "shift", "p_covariate", "p_label", "p_bbsd", "p_intensity", "p_scanner",
                 "label_shift_l1", "mmd2", "status")


# --------------------------------------------------------------------------------------------- run context

def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def run_context(run_dir: str | Path | None, release_epsilon: dict[str, float] | None = None) -> dict[str, Any]:
    """Epsilon per site (the last finite value of each ``epsilon*`` column of ``per_site.csv``, and the epsilon
    after the latest statistics release when given) and the latest round of ``shift.csv``; both optional."""
    ctx: dict[str, Any] = {"epsilon": {}, "shift": None, "notes": []}
    eps: dict[str, dict[str, float]] = {}
    if run_dir is not None:
        run_dir = Path(run_dir)
        per_site = run_dir / "per_site.csv"
        if per_site.exists():
            try:
                t = pd.read_csv(per_site)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
                ctx["notes"].append(f"per_site.csv unreadable: {err}")
                t = pd.DataFrame()
            cols = [c for c in t.columns if str(c).startswith(EPSILON) and c != EPSILON_BEFORE]
            if "site" in t.columns and cols:
                t = t.sort_values("round") if "round" in t.columns else t
                for site, rows in t.groupby("site"):
                    for c in cols:
                        v = pd.to_numeric(rows[c], errors="coerce")
                        v = v[np.isfinite(v)]
                        if len(v):
                            eps.setdefault(str(site), {})[str(c)] = float(v.iloc[-1])
        else:
            ctx["notes"].append("no per_site.csv in the run folder")
        shift = run_dir / "shift.csv"
        if shift.exists():
            try:
                s = pd.read_csv(shift)
                if "round" in s.columns and len(s):
                    s = s[s["round"] == s["round"].max()]
                ctx["shift"] = s[[c for c in SHIFT_COLUMNS if c in s.columns]].to_dict("records")
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
                ctx["notes"].append(f"shift.csv unreadable: {err}")
        else:
            ctx["notes"].append("no shift.csv in the run folder (add 'shift' to the run's statistics)")
    for site, v in (release_epsilon or {}).items():
        if v is not None and math.isfinite(v):
            eps.setdefault(site, {})["epsilon (after this release)"] = float(v)
    ctx["epsilon"] = eps
    return ctx


# --------------------------------------------------------------------------------------------- figures

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def graph_figure(spec: dict[str, Any]) -> str:
    """The graph, layered left to right; impermissible edges red and thick, unobserved nodes dashed."""
    g = nx.DiGraph()
    for name, t in spec["nodes"].items():
        g.add_node(name, **t)
    for e in spec["edges"]:
        g.add_edge(e["from"], e["to"], permissible=e.get("permissible", True))
    for layer, nodes in enumerate(nx.topological_generations(g)):
        for n in nodes:
            g.nodes[n]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colours = {"sensitive": "#f4a582", "prediction": "#92c5de", "outcome": "#b8e186", "covariate": "#e0e0e0",
               "mediator": "#fddbc7", "latent": "#ffffff"}
    observed = [n for n in g if "column" in g.nodes[n]]
    hidden = [n for n in g if "column" not in g.nodes[n]]
    nx.draw_networkx_nodes(g, pos, nodelist=observed, node_size=1500, ax=ax, edgecolors="black",
                           node_color=[colours.get(g.nodes[n].get("role", "mediator"), "#fddbc7") for n in observed])
    nx.draw_networkx_nodes(g, pos, nodelist=hidden, node_size=1500, ax=ax, edgecolors="grey", node_color="white",
                           linewidths=1.5).set_linestyle("dashed")
    labels = {n: n + (f"\n{g.nodes[n]['column']}" if "column" in g.nodes[n] else "\n(unobserved)") for n in g}
    nx.draw_networkx_labels(g, pos, labels=labels, font_size=8, ax=ax)
    bad = [(u, v) for u, v, d in g.edges(data=True) if not d["permissible"]]
    ok = [(u, v) for u, v, d in g.edges(data=True) if d["permissible"]]
    nx.draw_networkx_edges(g, pos, edgelist=ok, ax=ax, edge_color="#555555", width=1.5, node_size=1500,
                           arrowsize=15)
    nx.draw_networkx_edges(g, pos, edgelist=bad, ax=ax, edge_color="#d7191c", width=3.5, node_size=1500,
                           arrowsize=20)
    ax.plot([], [], color="#d7191c", lw=3.5, label="impermissible (social) edge")
    ax.plot([], [], color="#555555", lw=1.5, label="permissible edge")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    ax.set_axis_off()
    return _png(fig)


def _effect_rows(audit: AuditResult) -> list[dict[str, Any]]:
    rows = []
    effects = audit.effects["effects"]
    shown = primary_estimator(r["estimator"] for r in effects)
    for r in effects:
        if (r["estimator"] == shown and r["outcome"] in ("score", "label")
                and r["effect"] in ("total", "impermissible", "permissible", "direct")):
            rows.append({"label": f"{r['outcome']}: {r['effect']}", "estimate": r["estimate"], "lo": r["ci_low"],
                         "hi": r["ci_high"], "kind": "pooled" if audit.mode != "federated" else "consortium"})
    for site, s in (audit.per_site or {}).items():
        if s.get("status") == "ok":
            r = s["impermissible"]
            rows.append({"label": f"site {site}: impermissible", "estimate": r["estimate"], "lo": r["ci_low"],
                         "hi": r["ci_high"], "kind": "site"})
    return [r for r in rows if r["estimate"] is not None and math.isfinite(r["estimate"])]


def forest_figure(audit: AuditResult) -> str:
    rows = _effect_rows(audit)
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(rows) + 1.2))
    colours = {"pooled": "#2166ac", "consortium": "#2166ac", "site": "#b2182b"}
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        est = r["estimate"]
        lo = r["lo"] if r["lo"] is not None and math.isfinite(r["lo"]) else est
        hi = r["hi"] if r["hi"] is not None and math.isfinite(r["hi"]) else est
        # an estimate a rounding error outside its percentile interval (an effect zero by construction) or a
        # missing bound draws as a point, never as negative error bars
        imp = r["label"].endswith("impermissible")
        ax.errorbar(est, y, xerr=[[max(est - lo, 0.0)], [max(hi - est, 0.0)]], fmt="D" if imp else "o",
                    color=colours[r["kind"]], capsize=3, ms=6 if imp else 4)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["label"] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("effect of switching A from a0 to a1 on the mean (reference group), 95% CI")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def group_figure(gm: dict[str, Any], sensitive: str) -> str:
    t = pd.DataFrame(gm["by_group"]).set_index(sensitive)
    metrics = [m for m in ("auroc", "tpr", "fpr", "fnr", "selection_rate", "ece") if m in t.columns]
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / max(len(t), 1)
    x = np.arange(len(metrics))
    for i, (g, row) in enumerate(t.iterrows()):
        ax.bar(x + i * width - 0.4 + width / 2, [row[m] if row[m] is not None else np.nan for m in metrics],
               width, label=f"{sensitive} = {g}")
    ax.set_xticks(x)
    ax.set_xticklabels([m.upper() if m != "selection_rate" else "selection" for m in metrics], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"at threshold {gm['threshold']:.3f} (specificity {gm['specificity_target']:g} on all negatives)",
                 fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------------------------- html

def _e(v: Any) -> str:
    return html.escape(str(v))


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return _e(v)


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_f(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}"/>'


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>" if items else "<p><em>none</em></p>"


def _checks(r: dict[str, Any]) -> str:
    """The two faithfulness checks of one model's maps, in words."""
    if "passes_randomisation" not in r:
        return ""
    return "; ".join(f"{name} {'pass' if r.get(key) else 'FAIL'}" for name, key in
                     (("randomisation", "passes_randomisation"), ("deletion", "passes_deletion")))


def _image_evidence(ev: dict[str, Any]) -> str:
    """The attribution evidence (:func:`fairness.attribution.image_evidence`'s dict, or a dict of name -> such dicts;
    each may carry its ``reference`` model's numbers) as one table and how to read it."""
    named = {"model": ev} if "n_images" in ev else ev
    rows = []
    for name, d in named.items():
        if not isinstance(d, dict):
            continue
        for label, r in ((name, d), (f"{name}: reference", d.get("reference"))):
            if not isinstance(r, dict):
                continue
            res = d.get("cam_resolution") or []
            rows.append({"model": label, "images": d.get("n_images"),
                         "input (px)": "x".join(str(v) for v in d.get("input_size") or []),
                         "method": d.get("method", "gradcam"),
                         "layer": d.get("layer"),
                         "CAM": "x".join(str(v) for v in res), "grow (px)": d.get("grow"),
                         "region share": r.get("region_share_mean"), "area share": d.get("region_area_share"),
                         "all-zero maps": r.get("n_zero_maps"),
                         "randomisation rank corr.": r.get("randomisation_spearman"),
                         "pairs": r.get("randomisation_pairs"),
                         "deletion AUC (map order)": r.get("deletion_auc_attribution"),
                         "deletion AUC (random order)": r.get("deletion_auc_random"),
                         "checks": _checks(r)})
    return _table(rows) + (
        "<p>Region share is the share of the attribution mass inside the marker region (for the CAMs grown by their "
        "layer's stride; occlusion maps are at pixel resolution) and "
        "the model looks at the marker when it lies well above the area share (what an even map gets); the rank "
        "correlation with the map of the same network with re-initialised weights should be low (else the map "
        "shows the image, not the model); and a deletion AUC (class-1 probability as the top-attributed pixels "
        "are replaced by the image mean) below the random-order one means the map points at pixels the score "
        "depends on. A map that fails either check is not evidence about the model, whatever its region share "
        "(randomisation passes at a rank correlation of at most 0.3).</p>")


CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.verdict{font-size:1.1em;padding:.8em 1em;border-left:6px solid #2166ac;background:#f4f8fb}
.verdict.sig{border-color:#d7191c;background:#fdf3f3}.warn{color:#a50f15}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}"""


def _verdict(audit: AuditResult, context: dict[str, Any]) -> str:
    v = audit.verdict
    cls = "verdict sig" if v.get("significant") and v.get("identified") else "verdict"
    return f"<h2 id='verdict'>Verdict</h2><div class='{cls}'>{_e(v['text'])}</div>"


def _graph(audit: AuditResult, context: dict[str, Any]) -> str:
    spec = audit.spec
    return ("<h2 id='graph'>Causal graph</h2>" + _img(graph_figure(spec), "causal graph")
            + _table([{"edge": f"{e['from']} -> {e['to']}",
                       "class": "permissible" if e.get("permissible", True) else "IMPERMISSIBLE",
                       "why": e.get("why", "")} for e in spec["edges"]])
            + "<p>Paths from the sensitive attribute to the score:</p>"
            + _table([{"path": p["path"], "class": p["class"]} for p in audit.paths]))


def _identification(audit: AuditResult, context: dict[str, Any]) -> str:
    ident = audit.identification
    parts = ["<h2 id='identification'>Identification and assumptions</h2>"
             f"<p><strong>{_e(ident['summary'])}</strong></p>"]
    if ident.get("notes"):
        parts.append("<p>How edges between mediators were read:</p>" + _list(ident["notes"]))
    parts.append("<p>Assumptions:</p>" + _list(ident["assumptions"]) + f"<p>{_e(ident['positivity'])}</p>")
    parts.append("<p>Estimands:</p>" + _table([{"effect": k, "estimand": s} for k, s in ident["estimands"].items()]))
    if ident.get("identified_alternative"):
        parts.append("<p>Identified instead:</p>" + _table(ident["identified_alternative"], ["name", "description"]))
    return "".join(parts)


def _effects(audit: AuditResult, context: dict[str, Any]) -> str:
    eff = audit.effects
    parts = [f"<h2 id='effects'>Effects of {_e(audit.identification['sensitive'])} ({_e(eff['levels']['a0'])} "
             f"&rarr; {_e(eff['levels']['a1'])}), {eff['n_boot']} bootstrap replicates</h2>",
             _img(forest_figure(audit), "forest plot of effects with confidence intervals"),
             _table(eff["effects"], ["outcome", "effect", "estimator", "estimate", "ci_low", "ci_high", "se",
                                     "p_value", "identified"])]
    decomposition = [r for r in eff["effects"] if r["estimator"] == "robust" and r["outcome"] == "score"
                     and r["effect"] in ("tv", "ctf-direct", "ctf-indirect", "ctf-spurious")]
    if decomposition:
        parts.append("<p>The observed disparity of the score split into counterfactual direct, indirect and "
                     "spurious parts (Plecko &amp; Bareinboim's causal fairness analysis, in the reference group): "
                     "TV = ctf-direct &minus; ctf-indirect &minus; ctf-spurious; the spurious part is the disparity "
                     "that comes from the covariates differing between the groups.</p>"
                     + _table(decomposition, ["effect", "estimate", "ci_low", "ci_high", "p_value", "identified"]))
    bounds = (eff.get("diagnostics") or {}).get("bounds") or []
    if bounds:
        parts.append("<p>Bounds on the path-specific effects themselves (not identified: their mediators share an "
                     "unmeasured cause): each mediator drawn from its own identified law, their dependence anything "
                     "the data allow; the interval covers the whole range.</p>"
                     + _table([{**b, "district": ", ".join(b["district"])} for b in bounds],
                              ["outcome", "effect", "district", "lower", "upper", "ci_low", "ci_high"]))
    sensitivity = (eff.get("diagnostics") or {}).get("sensitivity") or []
    if sensitivity:
        parts.append("<p>Sensitivity to unmeasured confounding (E-values, VanderWeele &amp; Ding):</p><ul>"
                     + "".join(f"<li>{_e(t)}</li>" for t in sensitivity) + "</ul>")
    if audit.per_site:
        parts.append("<p>Per site (impermissible and total effect on the score):</p>" + _table([
            {"site": s, "status": r.get("status"), "n": (r.get("n") or {}).get("total"),
             "impermissible": (r.get("impermissible") or {}).get("estimate"),
             "ci_low": (r.get("impermissible") or {}).get("ci_low"),
             "ci_high": (r.get("impermissible") or {}).get("ci_high"),
             "total": (r.get("total") or {}).get("estimate"),
             **{f"{k} (TV split)": ((r.get("decomposition") or {}).get(k) or {}).get("estimate")
                for k in ("tv", "ctf-direct", "ctf-indirect", "ctf-spurious")}}
            for s, r in audit.per_site.items()]))
    return "".join(parts)


def _group_metrics(audit: AuditResult, context: dict[str, Any]) -> str:
    head = "<h2 id='group-metrics'>Group metrics</h2>"
    gm, sens = audit.group_metrics, audit.identification["sensitive"]
    if not gm:
        return head + "<p><em>no outcome (label) node: no group metrics</em></p>"
    cols = ["count", "prevalence", "mean_score", "auroc", "tpr", "fpr", "fnr", "specificity", "selection_rate",
            "ece", "brier"]
    s = gm["summary"]
    parts = [head, _img(group_figure(gm, sens), "group metrics per group"), _table(gm["by_group"], [sens] + cols),
             f"<p>Worst-group AUROC {_f(s.get('worst_group_auroc'))} (group {_e(s.get('worst_auroc_group'))}), "
             f"AUROC gap {_f(s.get('auroc_gap'))}, FNR gap {_f(s.get('fnr_gap'))} (highest FNR: group "
             f"{_e(s.get('worst_fnr_group'))}), FPR gap {_f(s.get('fpr_gap'))}; threshold "
             f"{_f(gm['threshold'])}. Group gaps mix permissible and impermissible influence; the effects "
             "above separate them.</p>"]
    if gm.get("note"):
        parts.append(f"<p><em>{_e(gm['note'])}</em></p>")
    if gm.get("controlled"):
        parts.append(f"<p>Within strata of the permissible mediators ({_e(', '.join(gm['control_features']))}):"
                     "</p>" + _table(gm["controlled"]))
    return "".join(parts)


def _robustness(audit: AuditResult, context: dict[str, Any]) -> str:
    parts = ["<h2 id='robustness'>Robustness: refuters and tests of the graph</h2>"]
    rob = audit.robustness or {}
    if "placebo" in rob:
        p = rob["placebo"]
        parts.append("<p>Placebo (sensitive attribute randomly permuted; every effect must vanish): "
                     + ("passed" if p["passed"] else "<span class='warn'>FAILED</span>") + "</p>"
                     + _table([{"effect": k, **r} for k, r in p.items() if isinstance(r, dict)]))
    dw = rob.get("dowhy")
    if dw:
        te = dw["total_effect"]
        if te.get("status") == "ok":
            parts.append(f"<p>DoWhy total effect ({_e(te['method'])}, {_e(te['target_units'])}, backdoor set "
                         f"{_e(te['backdoor_variables'] or 'empty')}, {te['n_rows']} rows): {_f(te['estimate'])}.</p>"
                         + _table(te["refuters"], ["refuter", "new_effect", "expected", "passed", "dowhy_p_value"]))
        else:
            parts.append(f"<p>DoWhy total effect: {_e(te.get('status'))}</p>")
        parts.append("<p>Kernel conditional-independence tests (dowhy.gcm.independence_test):</p>"
                     + _table(dw["independence_tests"], ["test", "claim", "p_value", "consistent", "reading"]))
    if not rob:
        parts.append("<p><em>not run" + (": the federated audit has no rows to permute or test; run "
                     "<code>equifed-audit</code> on a site's predictions for these checks"
                     if audit.mode == "federated" else " (equifed-audit runs them by default)") + "</em></p>")
    return "".join(parts)


def _correction(audit: AuditResult, context: dict[str, Any]) -> str:
    corr = context.get("correction")
    if not corr:
        return ""
    rows = [{"": when, **{k: corr[when][k] for k in ("estimate", "ci_low", "ci_high")}} for when in ("before", "after")]
    return ("<h2 id='correction'>Post-processing correction</h2>"
            f"<p>Logit shift per level of {_e(corr['mediator_column'])} (level 0 first; within each cell of "
            f"the covariates {_e(', '.join(corr.get('covariate_columns') or []) or '(none)')}, averaged here): "
            f"{_e(', '.join(_f(v, 4) for v in corr['delta']))}, fitted on {corr['n']} labelled rows so "
            "that within each covariate cell the mean score over the label strata no longer depends on the "
            "mediator (a path-specific correction: the A -> disease path is left alone); applied at "
            "inference with the mediator read from the image's metadata. The impermissible effect on the "
            "score before and after it (the audit's estimator on the same rows; a correction fitted and "
            "checked on the same rows reads about zero by construction: check it on other rows):</p>"
            + _table(rows, ["", "estimate", "ci_low", "ci_high"]))


def _image_section(audit: AuditResult, context: dict[str, Any]) -> str:
    if not context.get("image_evidence"):
        return ""
    return ("<h2 id='image-evidence'>Image evidence (attribution maps)</h2>"
            + _image_evidence(context["image_evidence"]))


def _privacy(audit: AuditResult, context: dict[str, Any]) -> str:
    parts = ["<h2 id='privacy'>Privacy</h2>"]
    fed = audit.federated
    if fed:
        parts.append(f"<p>Sites: {_e(', '.join(fed['sites']))}. Noise std in the summed cells: "
                     + ", ".join(f"{_e(k)} {_f(v, 3)}" for k, v in fed["noise_sigma"].items()) + ".</p>")
    eps = context.get("epsilon") or {}
    if eps:
        cols = sorted({c for r in eps.values() for c in r})
        parts.append("<p>Epsilon spent per site (from the run's per_site.csv and the latest release):</p>"
                     + _table([{"site": s, **r} for s, r in sorted(eps.items())], ["site"] + cols))
    elif not fed:
        parts.append("<p><em>not a federated run: no epsilon to report</em></p>")
    return "".join(parts)


def _shift(audit: AuditResult, context: dict[str, Any]) -> str:
    body = _table(context["shift"]) if context.get("shift") else "<p><em>no shift summary available</em></p>"
    return "<h2 id='shift'>Dataset shift</h2>" + body


def _diagnostics(audit: AuditResult, context: dict[str, Any]) -> str:
    diag = audit.effects.get("diagnostics", {})
    warns = list(audit.warnings) + list(diag.get("positivity_warnings", [])) + \
        list(diag.get("graph_checks", [])) + list(diag.get("notes", [])) + list(context.get("notes", []))
    parts = ["<h2 id='diagnostics'>Diagnostics and warnings</h2>", _list(warns)]
    w = diag.get("weights", {})
    if w:
        parts.append(_table([{"effect": k, **r} for k, r in w.items()]))
    return "".join(parts)


# The report's sections in order; a new one is a function (audit, context) -> HTML added here.
RENDERERS = (_verdict, _graph, _identification, _effects, _group_metrics, _robustness, _correction, _image_section,
             _privacy, _shift, _diagnostics)


def _isolated(render, audit: AuditResult, context: dict[str, Any]) -> str:
    """A section that cannot be drawn says so in its place; the rest of the report still renders."""
    try:
        return render(audit, context)
    except Exception as err:  # noqa: BLE001 - a report section never ends the report
        return (f"<h2>{_e(render.__name__.strip('_').replace('_', ' '))}</h2><p class='warn'>this section could "
                f"not be drawn: {_e(type(err).__name__)}: {_e(err)}</p>")


def render_html(audit: AuditResult | dict[str, Any], context: dict[str, Any] | None = None,
                title: str | None = None) -> str:
    """The report as one HTML string (no external resources)."""
    audit, context = as_result(audit), context or {}
    title = title or f"Causal fairness audit: {audit.spec.get('name', '')}"
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{_e(title)}</h1>"
            f"<p>{_e(audit.mode)} audit of {audit.data['n_rows']} rows (groups: {_e(audit.data['n_by_group'])}); "
            f"graph <code>{_e(audit.spec_source)}</code>.</p>")
    return "\n".join([head, *(_isolated(r, audit, context) for r in RENDERERS), "</body></html>"])


def write_report(audit: AuditResult | dict[str, Any], out_dir: str | Path, *, context: dict[str, Any] | None = None,
                 title: str | None = None, stem: str = "fairness_audit") -> dict[str, Path]:
    """Write ``<stem>.json`` and ``<stem>.html`` into ``out_dir`` (the HTML through a temporary file, so a reader
    never sees half a report)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audit = as_result(audit)
    if context:
        audit = audit.replace(context={k: v for k, v in context.items() if k != "notes"})
    json_path = audit.write(out / f"{stem}.json")
    html_path = out / f"{stem}.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(render_html(audit, context, title), encoding="utf-8")
    tmp.replace(html_path)
    return {"json": json_path, "html": html_path}
