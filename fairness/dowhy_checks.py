"""DoWhy where it is sound: the total effect and its refuters, and kernel independence tests of
the graph's edges out of the sensitive node and of the independences it implies between mediators.

What DoWhy is used for, and what not:

* **Total effect** of A on the score: ``CausalModel`` on the graph projected onto the observed columns (the image
  drops out), backdoor identification, ``backdoor.linear_regression`` with ``target_units="atc"`` (the effect in
  the reference group, like :mod:`fairness.pse`; a linear outcome model, so a cross-check, not the estimate). Then
  three refuters: a placebo (A permuted: the effect must vanish), a random common cause and a data subset (the
  effect must not move).
* **Not** path-specific effects: ``identify_effect(estimand_type="nonparametric-nie")`` picks one of several
  parallel mediators in hash order (results change run to run; DoWhy issues #249, #966, #1334), and
  ``refute_estimate`` on NDE/NIE estimands fails with ``KeyError: None``. The PSEs come from :mod:`fairness.pse`.
* **Independence tests** (``dowhy.gcm.independence_test``, kernel method, on a subsample: the kernel test is
  quadratic in the rows): for each edge A -> W of the projected graph, A and W should be *dependent* given W's other
  parents (a high p-value says the edge may be absent or weak); for each pair of A's children with no edge or
  shared latent between them and neither an ancestor of the other, they should be *independent* given their
  parents (e.g. "no S-D link given A": S ⫫ D | A, C; a low p-value says an edge such as S -> D is missing and the
  PSE may not be what the graph claims). ``gcm`` caches fitted mechanisms on graph objects, so it never sees the
  spec's graph, only arrays.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import warnings
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from fairness.graph import CausalSpec


def _numeric(col: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=np.float64)
    return pd.factorize(col, sort=True)[0].astype(np.float64)


def observed_graph(spec: CausalSpec) -> tuple[nx.DiGraph, list[frozenset[str]]]:
    """The latent projection with nodes renamed to their columns (what DoWhy's CausalModel reads)."""
    proj, bidirected = spec.projection()
    names = {n: spec.column(n) for n in proj.nodes}
    return nx.relabel_nodes(proj, names, copy=True), [frozenset(names[n] for n in e) for e in bidirected]


@contextlib.contextmanager
def _quiet():
    """DoWhy logs and warns on every call; the audit reports its results instead."""
    level = logging.getLogger("dowhy").level
    logging.getLogger("dowhy").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("dowhy").setLevel(level)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def total_effect_with_refuters(frame: pd.DataFrame, spec: CausalSpec, *, levels: tuple[Any, Any],
                               num_simulations: int = 20, seed: int = 0, tolerance: float = 0.01) -> dict[str, Any]:
    """DoWhy's backdoor estimate of the total effect of A (a0 -> a1, coded 0/1) on the score, and three refuters.
    A refuter passes when its effect is within ``max(tolerance, 10 % of the estimate)`` of what it should be
    (0 for the placebo, the estimate for the others); DoWhy's own p-value is reported alongside."""
    from dowhy import CausalModel

    g, bidirected = observed_graph(spec)
    a_col, y_col = spec.column(spec.sensitive), spec.column(spec.prediction)
    cols = list(g.nodes)
    data = pd.DataFrame({c: _numeric(frame[c]) for c in cols if c != a_col})
    data[a_col] = (frame[a_col].to_numpy() == levels[1]).astype(int)
    for i, pair in enumerate(bidirected):  # an unmeasured common cause, declared as such to DoWhy
        u = f"U{i}"
        g.add_edges_from((u, v) for v in pair)
        g.nodes[u]["observed"] = "no"
    with _quiet():
        model = CausalModel(data=data, treatment=a_col, outcome=y_col, graph=g)
        estimand = model.identify_effect(proceed_when_unidentifiable=False)
        backdoor = estimand.get_backdoor_variables()
        if backdoor is None:
            return {"status": "not identified by DoWhy's backdoor criterion", "estimand": str(estimand)}
        est = model.estimate_effect(estimand, method_name="backdoor.linear_regression", target_units="atc")
        out: dict[str, Any] = {
            "status": "ok", "method": "backdoor.linear_regression", "target_units": "atc (reference group)",
            "backdoor_variables": list(backdoor), "estimate": _finite(est.value), "n_rows": int(len(data)),
            "refuters": [],
        }
        bound = max(tolerance, 0.1 * abs(est.value))
        runs = [
            ("placebo (permuted A)", "placebo_treatment_refuter", {"placebo_type": "permute"}, 0.0),
            ("random common cause", "random_common_cause", {}, est.value),
            ("data subset (80 %)", "data_subset_refuter", {"subset_fraction": 0.8}, est.value),
        ]
        for label, method, kwargs, expected in runs:
            r = model.refute_estimate(estimand, est, method_name=method, num_simulations=num_simulations,
                                      random_seed=seed, **kwargs)
            res = r.refutation_result if isinstance(r.refutation_result, dict) else {}
            new = _finite(r.new_effect)
            out["refuters"].append({
                "refuter": label, "dowhy_method": method, "new_effect": new, "expected": _finite(expected),
                "passed": bool(new is not None and abs(new - expected) <= bound),
                "dowhy_p_value": _finite(res.get("p_value")),
            })
    return out


def independence_tests(frame: pd.DataFrame, spec: CausalSpec, *, max_rows: int = 500, seed: int = 0,
                       alpha: float = 0.05) -> list[dict[str, Any]]:
    """Kernel conditional-independence tests of the edges out of A and of the no-edge claims between A's
    children, on at most ``max_rows`` random rows."""
    from dowhy.gcm import independence_test

    proj, bidirected = spec.projection()
    a = spec.sensitive
    sub = frame.sample(n=min(max_rows, len(frame)), random_state=seed) if len(frame) > max_rows else frame
    col = {n: _numeric(sub[spec.column(n)]) for n in proj.nodes}

    def test(x: str, y: str, given: list[str]) -> float:
        z = np.column_stack([col[n] for n in given]) if given else None
        with _quiet():
            # bootstrap_n_jobs=1: joblib would spawn worker processes (seconds) for a sub-second test
            return float(independence_test(col[x], col[y], conditioned_on=z, method="kernel", bootstrap_n_jobs=1))

    def show(x: str, y: str, given: list[str]) -> str:
        return f"{x} ⫫ {y}" + (f" | {', '.join(given)}" if given else "")

    out = []
    children = [w for w in spec.observed if proj.has_edge(a, w) and w != spec.prediction]  # fixed order
    for w in children:
        given = sorted(p for p in proj.predecessors(w) if p != a)
        t0 = time.perf_counter()
        p = test(a, w, given)
        out.append({"test": show(a, w, given), "claim": f"edge {a} -> {w}: dependent", "p_value": p,
                    "consistent": bool(p < alpha), "seconds": round(time.perf_counter() - t0, 2),
                    "reading": ("dependence found, as the edge says" if p < alpha else
                                f"no dependence found at {alpha:g} in {len(sub)} rows: the edge {a} -> {w} may be absent "
                                "or too weak to detect")})
    latent = {frozenset(e) for e in bidirected}
    for i, u in enumerate(children):
        for v in children[i + 1:]:
            if proj.has_edge(u, v) or proj.has_edge(v, u) or frozenset((u, v)) in latent:
                continue
            if nx.has_path(proj, u, v) or nx.has_path(proj, v, u):
                continue
            given = sorted((set(proj.predecessors(u)) | set(proj.predecessors(v))) - {u, v})
            t0 = time.perf_counter()
            p = test(u, v, given)
            out.append({"test": show(u, v, given), "claim": f"no {u}-{v} link given {', '.join(given)}: independent",
                        "p_value": p, "consistent": bool(p >= alpha), "seconds": round(time.perf_counter() - t0, 2),
                        "reading": (f"no dependence found at {alpha:g}, as the graph says" if p >= alpha else
                                    f"{u} and {v} are dependent given {', '.join(given)}: the graph misses an edge "
                                    f"or common cause between them ({u} -> {v}, {v} -> {u} or a latent); the PSE "
                                    "may not be identified as claimed")})
    for r in out:
        r["n_rows"] = int(len(sub))
    return out


def dowhy_checks(frame: pd.DataFrame, spec: CausalSpec, *, levels: tuple[Any, Any], max_rows: int = 5000,
                 max_rows_independence: int = 500, num_simulations: int = 20, seed: int = 0,
                 alpha: float = 0.05) -> dict[str, Any]:
    """Both parts; the total effect and its refuters on at most ``max_rows`` random rows (DoWhy refits per
    simulation)."""
    t0 = time.perf_counter()
    a_col = spec.column(spec.sensitive)
    frame = frame[frame[a_col].isin(levels)]
    sub = frame.sample(n=max_rows, random_state=seed) if len(frame) > max_rows else frame
    try:
        total = total_effect_with_refuters(sub, spec, levels=levels, num_simulations=num_simulations, seed=seed)
    except Exception as err:  # DoWhy failing must not sink the audit; the report says why
        total = {"status": f"failed: {type(err).__name__}: {err}"}
    t1 = time.perf_counter()
    try:
        tests = independence_tests(frame, spec, max_rows=max_rows_independence, seed=seed, alpha=alpha)
    except Exception as err:
        tests = [{"test": "all", "claim": "", "p_value": None, "consistent": None,
                  "reading": f"failed: {type(err).__name__}: {err}"}]
    return {"total_effect": total, "independence_tests": tests,
            "timing_s": {"total_effect": round(t1 - t0, 2), "independence": round(time.perf_counter() - t1, 2)}}
