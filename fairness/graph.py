"""Causal graph specs: which edges out of the sensitive attribute are fair, which columns hold which variable.

A spec is a TOML file (see ``fairness/graphs/synthetic.toml``)::

    name = "synthetic"

    [nodes.A]
    role = "sensitive"          # exactly one; must have a column
    column = "group"
    reference = 0               # a0, the reference group; the other level is a1

    [nodes.S]
    role = "mediator"           # default role
    column = "scanner_legacy"
    kind = "social"             # free text, shown in reports

    [nodes.X]
    role = "mediator"           # no column: unobserved (the image)

    [nodes.Yhat]
    role = "prediction"         # exactly one; the model's score
    column = "score"

    [[edges]]
    from = "A"
    to = "S"
    permissible = false         # required on every edge out of the sensitive node; elsewhere default true
    why = "access to modern scanners depends on the group"

Roles: ``sensitive`` (A), ``prediction`` (the score Ŷ), ``outcome`` (the label, at most one), ``mediator``,
``covariate`` (baseline variables, never descendants of A) and ``latent`` (unobserved common causes). A hidden
common cause of two nodes (a bidirected edge) can also be written ``[[hidden_causes]] between = ["S", "X"]``
(``why = "..."``): it becomes a latent node ``U_S_X`` with edges into both. A node without
``column`` is unobserved; sensitive, prediction, outcome and covariate nodes must be observed.

**Path classes.** A directed path from A to Ŷ is *impermissible* if it contains an impermissible edge, and
*permissible* otherwise. A node may be marked ``resolving = true`` (Kilbertus et al. 2017, "resolving variables"):
influence of A that reaches Ŷ *through* it is considered justified, so only the edges after the last resolving node
on a path decide the path's class (e.g. with the disease D resolving, A -> S -> D -> X -> Ŷ is permissible: the
social factor changed the disease itself, which the model is meant to see).

Errors are :class:`GraphError` subclasses whose messages name the offending key, node, column or cycle.
"""

from __future__ import annotations

import copy
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import networkx as nx
import pandas as pd

ROLES = ("sensitive", "prediction", "outcome", "mediator", "covariate", "latent")
MUST_BE_OBSERVED = ("sensitive", "prediction", "outcome", "covariate")
GRAPH_DIR = Path(__file__).resolve().parent / "graphs"
MAX_PATHS = 10_000

_NODE_KEYS = {"role", "column", "kind", "resolving", "description", "reference"}
_EDGE_KEYS = {"from", "to", "permissible", "why"}
_TOP_KEYS = {"name", "description", "nodes", "edges", "hidden_causes"}


class GraphError(ValueError):
    """Base class: the graph spec is malformed, inconsistent, or does not match the data."""


class SpecError(GraphError):
    """The spec file itself is malformed (bad TOML, unknown key, wrong type, edge to an unknown node)."""


class CycleError(GraphError):
    """The graph has a directed cycle; ``.cycle`` lists its nodes, first node repeated at the end."""

    def __init__(self, message: str, cycle: list[str]):
        super().__init__(message)
        self.cycle = cycle


class RoleError(GraphError):
    """A required role is missing or duplicated, or a node's role contradicts the graph."""


class MissingColumnError(GraphError):
    """Columns the spec maps nodes to are absent from the data; ``.missing`` maps node -> column."""

    def __init__(self, message: str, missing: dict[str, str]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Node:
    name: str
    role: str = "mediator"
    column: str | None = None  # None: unobserved
    kind: str = ""
    resolving: bool = False
    description: str = ""
    reference: Any = None  # sensitive node only: the reference level a0

    @property
    def observed(self) -> bool:
        return self.column is not None


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    permissible: bool = True
    why: str = ""


@dataclass(frozen=True)
class CausalPath:
    """A directed path from the sensitive node to a target node, with its class."""

    nodes: tuple[str, ...]
    permissible: bool
    impermissible_edges: tuple[tuple[str, str], ...]  # the impermissible edges that decide the class (after resolving)
    resolved_by: str | None  # last resolving node on the path, if any
    entry: str  # first observed node after the sensitive node: the A-edge this path leaves through, after projection

    @property
    def label(self) -> str:
        return "permissible" if self.permissible else "impermissible"

    def __str__(self) -> str:
        return " -> ".join(self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self), "nodes": list(self.nodes), "class": self.label,
                "impermissible_edges": [f"{u} -> {v}" for u, v in self.impermissible_edges],
                "resolved_by": self.resolved_by, "entry": self.entry}


def _check(where: str, key: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SpecError(f"{where}: key '{key}' must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise SpecError(f"{where}: key '{key}' must be {what}, got {value!r}")
    return value


@dataclass
class CausalSpec:
    """A validated causal graph with roles and permissibility; build with :func:`load_graph_spec` or ``from_dict``."""

    name: str
    nodes: dict[str, Node]
    edges: list[Edge]
    description: str = ""
    source: str = "<spec>"
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = nx.DiGraph()
        for n in self.nodes.values():
            g.add_node(n.name, role=n.role, column=n.column, observed=n.observed, resolving=n.resolving, kind=n.kind)
        for e in self.edges:
            g.add_edge(e.source, e.target, permissible=e.permissible, why=e.why)
        self.graph = g
        self._check_structure()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "<spec>") -> "CausalSpec":
        """Validate a parsed spec table (what ``tomllib`` returns)."""
        unknown = set(raw) - _TOP_KEYS
        if unknown:
            raise SpecError(f"{where}: unknown top-level key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(_TOP_KEYS))})")
        name = _check(where, "name", raw.get("name", Path(where).stem), str, "a string")
        description = _check(where, "description", raw.get("description", ""), str, "a string")
        nodes_raw = raw.get("nodes")
        if not isinstance(nodes_raw, Mapping) or not nodes_raw:
            raise SpecError(f"{where}: missing or empty [nodes] table")
        nodes: dict[str, Node] = {}
        for nname, t in nodes_raw.items():
            label = f"nodes.{nname}"
            if not isinstance(t, Mapping):
                raise SpecError(f"{where}: key '{label}' must be a table")
            bad = set(t) - _NODE_KEYS
            if bad:
                raise SpecError(f"{where}: unknown key '{label}.{sorted(bad)[0]}' (allowed: {', '.join(sorted(_NODE_KEYS))})")
            role = _check(where, f"{label}.role", t.get("role", "mediator"), str, "a string")
            if role not in ROLES:
                raise SpecError(f"{where}: key '{label}.role' must be one of {', '.join(ROLES)}, got {role!r}")
            column = t.get("column")
            if column is not None:
                _check(where, f"{label}.column", column, str, "a column name")
            if role in MUST_BE_OBSERVED and column is None:
                raise SpecError(f"{where}: node '{nname}' has role '{role}' but no 'column' (it must be observed)")
            if role == "latent" and column is not None:
                raise SpecError(f"{where}: node '{nname}' has role 'latent' but a column {column!r}")
            if "reference" in t and role != "sensitive":
                raise SpecError(f"{where}: key '{label}.reference' is only allowed on the sensitive node")
            nodes[nname] = Node(
                name=nname, role=role, column=column,
                kind=_check(where, f"{label}.kind", t.get("kind", ""), str, "a string"),
                resolving=_check(where, f"{label}.resolving", t.get("resolving", False), bool, "true or false"),
                description=_check(where, f"{label}.description", t.get("description", ""), str, "a string"),
                reference=t.get("reference"),
            )
        edges_raw = raw.get("edges", [])
        if not isinstance(edges_raw, list) or not all(isinstance(e, Mapping) for e in edges_raw):
            raise SpecError(f"{where}: key 'edges' must be an array of tables ([[edges]])")
        edges: list[Edge] = []
        seen: set[tuple[str, str]] = set()
        sensitive = {n for n, v in nodes.items() if v.role == "sensitive"}
        for i, t in enumerate(edges_raw):
            label = f"edges[{i}]"
            bad = set(t) - _EDGE_KEYS
            if bad:
                raise SpecError(f"{where}: unknown key '{label}.{sorted(bad)[0]}' (allowed: from, to, permissible, why)")
            for k in ("from", "to"):
                if k not in t:
                    raise SpecError(f"{where}: missing required key '{label}.{k}'")
                _check(where, f"{label}.{k}", t[k], str, "a node name")
                if t[k] not in nodes:
                    raise SpecError(f"{where}: key '{label}.{k}' names unknown node {t[k]!r} (nodes: {', '.join(nodes)})")
            u, v = t["from"], t["to"]
            if u == v:
                raise CycleError(f"{where}: cycle: {u} -> {u} (self-loop in {label})", [u, u])
            if (u, v) in seen:
                raise SpecError(f"{where}: edge {u} -> {v} is listed twice ({label})")
            seen.add((u, v))
            if "permissible" not in t and u in sensitive:
                raise SpecError(f"{where}: edge {u} -> {v} leaves the sensitive node: set '{label}.permissible' "
                                "to true (justified, e.g. biological) or false (social, to be audited)")
            edges.append(Edge(u, v, _check(where, f"{label}.permissible", t.get("permissible", True), bool,
                                           "true or false"),
                              _check(where, f"{label}.why", t.get("why", ""), str, "a string")))
        hidden = raw.get("hidden_causes", [])
        if not isinstance(hidden, list) or not all(isinstance(h, Mapping) for h in hidden):
            raise SpecError(f"{where}: key 'hidden_causes' must be an array of tables ([[hidden_causes]])")
        for i, t in enumerate(hidden):
            label = f"hidden_causes[{i}]"
            bad = set(t) - {"between", "why"}
            if bad:
                raise SpecError(f"{where}: unknown key '{label}.{sorted(bad)[0]}' (allowed: between, why)")
            pair = t.get("between")
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
                raise SpecError(f"{where}: key '{label}.between' must name two nodes, e.g. [\"S\", \"X\"]")
            for v in pair:
                if v not in nodes:
                    raise SpecError(f"{where}: key '{label}.between' names unknown node {v!r} (nodes: {', '.join(nodes)})")
            u = f"U_{pair[0]}_{pair[1]}"
            why = _check(where, f"{label}.why", t.get("why", ""), str, "a string")
            nodes[u] = Node(name=u, role="latent", description=why or f"hidden common cause of {pair[0]} and {pair[1]}")
            edges += [Edge(u, pair[0]), Edge(u, pair[1])]
        return cls(name=name, nodes=nodes, edges=edges, description=description, source=where)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a TOML-shaped, JSON-serialisable dict; ``CausalSpec.from_dict`` reads it back unchanged."""
        nodes = {}
        for n in self.nodes.values():
            t: dict[str, Any] = {"role": n.role}
            if n.column is not None:
                t["column"] = n.column
            if n.kind:
                t["kind"] = n.kind
            if n.resolving:
                t["resolving"] = True
            if n.description:
                t["description"] = n.description
            if n.reference is not None:
                t["reference"] = n.reference
            nodes[n.name] = t
        edges = [{"from": e.source, "to": e.target, "permissible": e.permissible, **({"why": e.why} if e.why else {})}
                 for e in self.edges]
        return {"name": self.name, "description": self.description, "nodes": nodes, "edges": edges}

    def with_columns(self, mapping: Mapping[str, str]) -> "CausalSpec":
        """A copy with node -> column remapped (e.g. to run the manifest spec on the generator's truth columns)."""
        raw = self.to_dict()
        for node, col in mapping.items():
            if node not in raw["nodes"]:
                raise SpecError(f"{self.source}: with_columns names unknown node {node!r}")
            raw["nodes"][node]["column"] = col
        return CausalSpec.from_dict(raw, where=self.source)

    def with_edges(self, add: Iterable[tuple[str, str, bool]] = (), remove: Iterable[tuple[str, str]] = (),
                   nodes: Mapping[str, Mapping[str, Any]] | None = None) -> "CausalSpec":
        """A copy with edges ``(from, to, permissible)`` added, ``(from, to)`` removed and node tables added/updated."""
        raw = copy.deepcopy(self.to_dict())
        for name, t in (nodes or {}).items():
            raw["nodes"][name] = {**raw["nodes"].get(name, {}), **t}
        drop = {tuple(e) for e in remove}
        raw["edges"] = [e for e in raw["edges"] if (e["from"], e["to"]) not in drop]
        raw["edges"] += [{"from": u, "to": v, "permissible": p} for u, v, p in add]
        return CausalSpec.from_dict(raw, where=self.source)

    # ------------------------------------------------------------------------------------------ roles
    def _role_nodes(self, role: str) -> list[str]:
        return [n.name for n in self.nodes.values() if n.role == role]

    @property
    def sensitive(self) -> str:
        return self._role_nodes("sensitive")[0]

    @property
    def prediction(self) -> str:
        return self._role_nodes("prediction")[0]

    @property
    def outcome(self) -> str | None:
        found = self._role_nodes("outcome")
        return found[0] if found else None

    @property
    def covariates(self) -> list[str]:
        return [n for n in nx.topological_sort(self.graph) if self.nodes[n].role == "covariate"]

    @property
    def observed(self) -> list[str]:
        return [n for n in nx.topological_sort(self.graph) if self.nodes[n].observed]

    def column(self, node: str) -> str:
        col = self.nodes[node].column
        if col is None:
            raise GraphError(f"node '{node}' is unobserved (no column)")
        return col

    def mediators(self, target: str | None = None) -> list[str]:
        """Observed descendants of A that are ancestors of ``target`` (default: the prediction), topological order."""
        target = target or self.prediction
        a = self.sensitive
        between = nx.descendants(self.graph, a) & nx.ancestors(self.graph, target)
        return [n for n in nx.topological_sort(self.graph) if n in between and self.nodes[n].observed]

    # ------------------------------------------------------------------------------------------ validation
    def _check_structure(self) -> None:
        where = self.source
        try:
            cyc = nx.find_cycle(self.graph)
        except nx.NetworkXNoCycle:
            cyc = None
        if cyc:
            names = [u for u, _v in cyc] + [cyc[0][0]]
            raise CycleError(f"{where}: the graph must be acyclic; cycle: {' -> '.join(names)}", names)
        for role, required in (("sensitive", True), ("prediction", True), ("outcome", False)):
            found = self._role_nodes(role)
            if required and not found:
                present = ", ".join(f"{n.name}={n.role}" for n in self.nodes.values())
                raise RoleError(f"{where}: no node has role '{role}' (exactly one required; nodes: {present})")
            if len(found) > 1:
                raise RoleError(f"{where}: {len(found)} nodes have role '{role}': {', '.join(found)} "
                                "(at most one allowed)")
        a, y = self.sensitive, self.prediction
        desc_a = nx.descendants(self.graph, a)
        for c in self._role_nodes("covariate"):
            if c in desc_a:
                path = nx.shortest_path(self.graph, a, c)
                raise RoleError(f"{where}: covariate '{c}' is a descendant of the sensitive node "
                                f"({' -> '.join(path)}); adjusting for it would hide part of the effect: "
                                "give it role 'mediator'")
        children = list(self.graph.successors(y))
        if children:
            raise RoleError(f"{where}: the prediction node '{y}' must have no children (it has: {', '.join(children)})")
        self.warnings = []
        if y not in desc_a:
            self.warnings.append(f"no directed path from '{a}' to '{y}': every effect is zero by assumption")
        for m in self._role_nodes("mediator"):
            if self.nodes[m].observed and m not in desc_a:
                self.warnings.append(f"mediator '{m}' is not a descendant of '{a}': it mediates nothing "
                                     "(declare it a covariate if it is a baseline variable)")
        for u, v in self.graph.edges:
            if u != a and not self.graph.edges[u, v]["permissible"] and u not in desc_a:
                self.warnings.append(f"edge {u} -> {v} is marked impermissible but '{u}' is not reached from '{a}': "
                                     "it lies on no path from the sensitive node")

    def validate(self, frame: pd.DataFrame) -> list[str]:
        """Check the spec against a data frame: every mapped column exists and has no missing values, the sensitive
        attribute has the reference level and two levels in all. Raises :class:`MissingColumnError` /
        :class:`GraphError`; returns warnings (structure and data) as strings."""
        missing = {n.name: n.column for n in self.nodes.values() if n.observed and n.column not in frame.columns}
        if missing:
            items = ", ".join(f"'{c}' (node {n})" for n, c in missing.items())
            avail = ", ".join(map(str, list(frame.columns)[:30]))
            raise MissingColumnError(f"{self.source}: columns missing from the data: {items}; available: {avail}",
                                     missing)
        for n in self.observed:
            col = self.nodes[n].column
            bad = int(frame[col].isna().sum())
            if bad:
                raise GraphError(f"column '{col}' (node {n}) has {bad} missing values")
        a = self.nodes[self.sensitive]
        levels = sorted(pd.unique(frame[a.column]).tolist(), key=str)
        if len(levels) < 2:
            raise GraphError(f"sensitive column '{a.column}' has {len(levels)} level(s) {levels}: nothing to compare")
        if a.reference is not None and a.reference not in levels:
            raise GraphError(f"sensitive node '{a.name}': reference level {a.reference!r} not found in column "
                             f"'{a.column}' (levels: {levels})")
        warns = list(self.warnings)
        if len(levels) > 2:
            warns.append(f"sensitive column '{a.column}' has {len(levels)} levels {levels}: effects compare two "
                         "levels at a time (pass levels=(a0, a1))")
        out = self.outcome
        if out is not None:
            vals = set(pd.unique(frame[self.nodes[out].column]).tolist())
            if not vals <= {0, 1, True, False}:
                warns.append(f"outcome column '{self.nodes[out].column}' is not binary 0/1 ({sorted(vals, key=str)[:5]})")
        return warns

    # ------------------------------------------------------------------------------------------ paths
    def classify_paths(self, target: str | None = None) -> list[CausalPath]:
        """Every directed path from the sensitive node to ``target`` (default: the prediction), classified.

        A path is impermissible iff it has an impermissible edge after its last resolving node (no resolving node:
        anywhere). ``entry`` is the first observed node after the sensitive node (the A-edge of the projected graph
        the path leaves through)."""
        target = target or self.prediction
        a = self.sensitive
        out: list[CausalPath] = []
        for nodes in itertools.islice(nx.all_simple_paths(self.graph, a, target), MAX_PATHS + 1):
            if len(out) == MAX_PATHS:
                raise GraphError(f"more than {MAX_PATHS} paths from '{a}' to '{target}': graph too dense to audit")
            start, resolved_by = 0, None
            for i, n in enumerate(nodes[1:-1], start=1):
                if self.nodes[n].resolving:
                    start, resolved_by = i, n
            edges = list(zip(nodes[start:-1], nodes[start + 1:]))
            bad = tuple((u, v) for u, v in edges if not self.graph.edges[u, v]["permissible"])
            entry = next(n for n in nodes[1:] if self.nodes[n].observed)
            out.append(CausalPath(tuple(nodes), not bad, bad, resolved_by, entry))
        return out

    # ------------------------------------------------------------------------------------------ projection
    def projection(self) -> tuple[nx.DiGraph, list[frozenset[str]]]:
        """Latent projection onto the observed nodes: ``u -> v`` when a directed path from u to v has only
        unobserved intermediate nodes; ``u <-> v`` (returned as a list of 2-sets) when an unobserved node reaches
        both through unobserved-only directed paths (an unmeasured common cause)."""
        g = self.graph
        obs = set(self.observed)

        def reach(start: str) -> set[str]:
            found, stack, seen = set(), list(g.successors(start)), set()
            while stack:
                v = stack.pop()
                if v in seen:
                    continue
                seen.add(v)
                if v in obs:
                    found.add(v)
                else:
                    stack.extend(g.successors(v))
            return found

        proj = nx.DiGraph()
        proj.add_nodes_from(n for n in nx.topological_sort(g) if n in obs)
        for u in obs:
            for v in reach(u):
                proj.add_edge(u, v)
        bidirected: set[frozenset[str]] = set()
        for lat in (n for n in g.nodes if n not in obs):
            r = sorted(reach(lat))
            for u, v in itertools.combinations(r, 2):
                bidirected.add(frozenset((u, v)))
        return proj, sorted(bidirected, key=sorted)

    def districts(self, nodes: Iterable[str] | None = None) -> list[set[str]]:
        """Districts (bidirected-connected components) of the projection restricted to ``nodes``."""
        _proj, bi = self.projection()
        keep = set(nodes) if nodes is not None else set(self.observed)
        h = nx.Graph()
        h.add_nodes_from(keep)
        h.add_edges_from(tuple(e) for e in bi if e <= keep)
        return [set(c) for c in nx.connected_components(h)]

    def __repr__(self) -> str:
        return (f"CausalSpec({self.name!r}, sensitive={self.sensitive!r}, prediction={self.prediction!r}, "
                f"outcome={self.outcome!r}, nodes={len(self.nodes)}, edges={len(self.edges)})")


def load_graph_spec(path: str | Path) -> CausalSpec:
    """Read a graph spec TOML file. A bare name like ``"synthetic"`` resolves to ``fairness/graphs/synthetic.toml``."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (GRAPH_DIR / f"{p.name}.toml").exists():
        p = GRAPH_DIR / f"{p.name}.toml"
    try:
        with open(p, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        shipped = sorted(g.stem for g in GRAPH_DIR.glob("*.toml"))
        raise SpecError(f"{p}: graph spec not found (a TOML path, or a shipped name: {', '.join(shipped)})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{p}: not valid TOML: {exc}") from None
    return CausalSpec.from_dict(raw, where=_where(p))


def _where(path: Path) -> str:
    """How reports name a spec: a shipped graph by its name (the package may run from a temporary install, whose
    path says nothing to a reader), any other file by its path."""
    if path.resolve().parent == GRAPH_DIR:
        return f"{path.stem} (shipped with equifed: fairness/graphs/{path.name})"
    return str(path)
