"""Is the impermissible path-specific effect identified from observational data?

**Target.** With A switched from a0 (reference) to a1, the impermissible path-specific effect (PSE) on a target T (the
score Ŷ, or the label) is ``E[T(π) | A=a0] − E[T | A=a0]``, where T(π) is T when A takes a1 along the impermissible
paths π and a0 along every other path (Avin, Shpitser & Pearl 2005). Effects are defined in the reference group.

**Criterion (formalised for a set of impermissible paths).** Project the graph onto its observed nodes (unobserved
mediators such as the image X disappear; an unobserved node with two observed descendants becomes a bidirected edge
``u <-> v``). Every path from A to T leaves A through one *entry*: the first observed node after A, i.e. a child of A
in the projection (T itself when A reaches T only through unobserved nodes, e.g. A -> X -> Ŷ). Then (Shpitser 2013,
the recanting-district criterion, which in a DAG without hidden confounding is Avin et al.'s recanting-witness
criterion):

* an entry W is a **recanting witness** if some path A -> W -> ... -> T is impermissible and another
  A -> W -> ... -> T is permissible: W would have to take its a1-value along one route and its a0-value along the
  other, a cross-world quantity that no experiment, let alone observational data, identifies;
* more generally a **recanting district** is a district (bidirected-connected set) of the projection restricted to
  the ancestors of T other than A that contains an entry starting an impermissible path and an entry starting a
  permissible one (e.g. S and D with an unmeasured common cause U -> S, U -> D);
* the PSE is identified (in a model where the declared latent nodes are the only unobserved variables, with the
  positivity below) iff there is no recanting district and the total effect is identified by adjusting for the
  covariates (A shares no district with an ancestor of T).

When it is identified, it is an *edge* intervention on A's outgoing edges in the projection: each entry W receives
A=a1 if its paths are impermissible, a0 otherwise, and the edge g-formula gives it (see :attr:`Identification.estimands`).

Worked cases on the generator's graph (A -> D permissible, A -> S impermissible, D -> X, S -> X, X -> Ŷ, C -> D):

* as is: entries S (all paths impermissible) and D (all permissible): identified, by the mediation formula
  ``Σ_c p(c|a0) Σ_{s,d} E[Ŷ|a0,s,d,c] p(s|a1,c) p(d|a0,c) − E[Ŷ|a0]`` or by weighting the reference group with
  ``p(S|a1,C)/p(S|a0,C)``;
* with S -> D added: A -> S -> D -> X -> Ŷ contains A -> S, so it is impermissible like every path through S:
  still identified (it is the effect of the edge A -> S, social influence on the disease included), and D is *not* a
  recanting witness under this rule: ``D(a0, S(a1))`` is a single-world quantity;
* with S -> D and D marked ``resolving`` (influence through the disease itself is justified): A -> S -> X -> Ŷ is
  impermissible, A -> S -> D -> X -> Ŷ permissible: **S** is a recanting witness (it must be S(a1) for the image but
  S(a0) for the disease), and the split happens at S -> D. The effect then identified instead is the edge effect of
  A -> S (all paths through S, including through D), next to the total effect; an interventional analogue (S drawn
  from p(s|a1,c), D from p(d|a0,c) independently) is another option;
* with a latent U -> S, U -> D: S and D form a recanting district: not identified;
* with D -> S marked impermissible (presentation stage driven by the disease treated as unfair): D is the recanting
  witness (A -> D -> X -> Ŷ permissible, A -> D -> S -> X -> Ŷ impermissible).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from fairness.graph import CausalPath, CausalSpec

EFFECTS = ("total", "impermissible", "permissible", "direct")


@dataclass
class Identification:
    """Result of :func:`identify`. ``switch[effect]`` maps every entry to 1 (receives a1) or 0 (a0) and
    ``outcome_world[effect]`` is the A-value whose rows provide E[T | mediators, covariates] for that effect."""

    identified: bool
    target: str
    sensitive: str
    paths: list[CausalPath]
    entries: dict[str, str]  # entry -> "impermissible" | "permissible" | "mixed"
    recanting_witnesses: list[str]
    recanting_districts: list[list[str]]
    witness_paths: dict[str, dict[str, str]]
    total_effect_identified: bool
    mediators: list[str]
    covariates: list[str]
    switch: dict[str, dict[str, int]]
    outcome_world: dict[str, int]
    estimands: dict[str, str]
    identified_alternative: list[dict[str, str]]
    assumptions: list[str]
    positivity: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how edges between mediators were read (e.g. S -> D)
    # per effect, the A-value every observed mediator's and the target's factor receives (entries: their switch;
    # members of a district with an entry: the entry's value; others: the target's)
    factor_world: dict[str, dict[str, int]] = field(default_factory=dict)
    # per mediator, the other mediators its factor conditions on (Tian's factorisation: its district among its
    # predecessors and that district's parents); A and the covariates are always conditioned on
    conditioning: dict[str, list[str]] = field(default_factory=dict)
    effect_identified: dict[str, bool] = field(default_factory=dict)
    interventional: bool = False  # the impermissible/permissible rows hold the interventional analogue

    @property
    def permissible_identified(self) -> bool:
        return self.identified

    def summary(self) -> str:
        if self.identified:
            head = f"The impermissible path-specific effect of {self.sensitive} on {self.target} is identified."
        else:
            head = (f"The impermissible path-specific effect of {self.sensitive} on {self.target} is NOT identified: "
                    + " ".join(self.reasons))
            if self.identified_alternative:
                head += " Identified instead: " + "; ".join(a["name"] for a in self.identified_alternative) + "."
        return head

    def to_dict(self) -> dict[str, Any]:
        return {
            "identified": self.identified, "target": self.target, "sensitive": self.sensitive,
            "summary": self.summary(),
            "paths": [p.to_dict() for p in self.paths], "entries": dict(self.entries),
            "recanting_witnesses": list(self.recanting_witnesses),
            "recanting_districts": [list(d) for d in self.recanting_districts],
            "witness_paths": self.witness_paths, "total_effect_identified": self.total_effect_identified,
            "mediators": list(self.mediators), "covariates": list(self.covariates),
            "switch": self.switch, "outcome_world": self.outcome_world, "estimands": self.estimands,
            "identified_alternative": self.identified_alternative, "assumptions": list(self.assumptions),
            "positivity": self.positivity, "reasons": list(self.reasons), "notes": list(self.notes),
            "factor_world": self.factor_world, "conditioning": self.conditioning,
            "effect_identified": dict(self.effect_identified), "interventional": self.interventional,
        }


def _conditional(node: str, parents: list[str], a_value: str | None) -> str:
    cond = ([f"A={a_value}"] if a_value else []) + parents
    return f"p({node.lower()} | {', '.join(cond)})" if cond else f"p({node.lower()})"


def edge_gformula(spec: CausalSpec, target: str, switch: dict[str, int], outcome_world: int,
                  factor_world: dict[str, int] | None = None, conditioning: dict[str, list[str]] | None = None) -> str:
    """The edge g-formula for one A-setting of the entries, as text (A in the reference group, covariates C); with
    hidden common causes, each factor conditions on Tian's set and takes its district's A-value."""
    proj, bidirected = spec.projection()
    meds = spec.mediators(target)
    covs = spec.covariates
    cvar = ", ".join(c.lower() for c in covs)
    world = {0: "a0", 1: "a1"}
    confounded = {n for e in bidirected for n in e}
    factors = []
    for m in meds:
        given = conditioning[m] if conditioning else [p for p in proj.predecessors(m) if p in meds]
        pa = [p.lower() for p in given] + [c.lower() for c in covs]
        value = (factor_world or switch).get(m) if (m in switch or m in confounded) else None
        factors.append(_conditional(m, pa, None if value is None else world[value]))
    cond = [f"A={world[outcome_world]}"] + [m.lower() for m in meds] + [c.lower() for c in covs]
    inner = f"E[{target} | {', '.join(cond)}]"
    body = " · ".join([inner] + factors)
    if meds:
        body = f"Σ_{{{', '.join(m.lower() for m in meds)}}} {body}"
    if covs:
        body = f"Σ_{{{cvar}}} p({cvar} | A=a0) {body}"
    return body


def identify(spec: CausalSpec, target: str | None = None) -> Identification:
    """Decide identification of the impermissible PSE of the sensitive node on ``target`` (default: the prediction;
    pass ``spec.outcome`` for the label) and say what to estimate. Never raises for a valid spec."""
    target = target or spec.prediction
    a = spec.sensitive
    paths = spec.classify_paths(target)
    proj, bidirected = spec.projection()
    meds = spec.mediators(target)
    covs = spec.covariates

    entries: dict[str, set[bool]] = {}
    for p in paths:
        entries.setdefault(p.entry, set()).add(p.permissible)
    classes = {w: ("mixed" if len(v) == 2 else "permissible" if True in v else "impermissible")
               for w, v in entries.items()}

    witnesses = [w for w, c in classes.items() if c == "mixed"]
    witness_paths: dict[str, dict[str, str]] = {}
    for w in witnesses:
        imp = next(p for p in paths if p.entry == w and not p.permissible)
        per = next(p for p in paths if p.entry == w and p.permissible)
        witness_paths[w] = {"impermissible": str(imp), "permissible": str(per)}

    ancestors = (nx.ancestors(proj, target) | {target}) - {a}
    reasons: list[str] = []
    rec_districts: list[list[str]] = []
    for dist in spec.districts(ancestors):
        if len(dist) < 2:
            continue
        kinds = {classes[w] for w in dist if w in classes}
        if "mixed" in kinds or {"impermissible", "permissible"} <= kinds:
            rec_districts.append(sorted(dist))
    for w in witnesses:
        wp = witness_paths[w]
        reasons.append(f"'{w}' is a recanting witness: {wp['impermissible']} is impermissible but "
                       f"{wp['permissible']} is permissible, so {w} would need its a1-value on one route and its "
                       "a0-value on the other.")
    for d in rec_districts:
        reasons.append(f"{{{', '.join(d)}}} is a recanting district: these variables share an unmeasured cause and "
                       "carry both impermissible and permissible paths.")

    # Adjustment for the covariates identifies E[T(a) | A=a0] when A's only unmeasured common causes are with
    # covariates (they then block every back-door path); a mediator or the target in A's district breaks it.
    a_district = next((d for d in spec.districts(ancestors | {a}) if a in d), {a})
    confounded_a = sorted(a_district - {a} - set(covs))
    total_ok = not confounded_a
    if not total_ok:
        reasons.append(f"'{a}' shares an unmeasured cause with {', '.join(confounded_a)}: even the total effect is "
                       "not identified by covariate adjustment.")
    identified = total_ok and not witnesses and not rec_districts

    target_is_entry = target in classes
    switch: dict[str, dict[str, int]] = {}
    switch["total"] = {w: 1 for w in classes}
    switch["impermissible"] = {w: int(c != "permissible") for w, c in classes.items()}
    switch["permissible"] = {w: int(c == "permissible") for w, c in classes.items()}
    switch["direct"] = {w: int(w == target) for w in classes}
    default_world = {"total": 1, "impermissible": 0, "permissible": 0, "direct": 1}
    mediator_districts = spec.districts(ancestors)
    factor_world: dict[str, dict[str, int]] = {}
    effect_identified: dict[str, bool] = {}
    for eff in EFFECTS:
        sw = {**switch[eff], target: 1} if eff == "direct" else switch[eff]  # the direct effect switches T itself
        worlds, consistent = _factor_worlds(mediator_districts, sw, meds, target, sw.get(target, default_world[eff]))
        factor_world[eff] = worlds
        effect_identified[eff] = total_ok and consistent and (eff in ("total", "direct") or identified)
    world = {eff: factor_world[eff][target] for eff in EFFECTS}
    for eff in EFFECTS:  # entries that do not reach T through an observed mediator set are not in the formula
        switch[eff] = {w: v for w, v in switch[eff].items() if w != target}
    conditioning = tian_conditioning(spec, proj, target, meds)

    base = f"E[{target} | A=a0]"
    estimands = {eff: f"{edge_gformula(spec, target, switch[eff], world[eff], factor_world[eff], conditioning)} − {base}"
                 for eff in EFFECTS}

    imp_entries = sorted(w for w, c in classes.items() if c != "permissible")
    alternatives: list[dict[str, str]] = []
    interventional = bool(total_ok and rec_districts and not witnesses)
    analogue = {"name": "interventional analogue",
                "description": ("the switched mediators (" + ", ".join(imp_entries) + ") drawn from their "
                                "a1-law given their parents and the covariates, the others independently from "
                                "their a0-law (Vansteelandt & Daniel 2017): identified without the cross-world "
                                "assumption, equal to the PSE when the mediators share no hidden cause"),
                "estimand": estimands["impermissible"]}
    if not identified and total_ok:
        if interventional:
            alternatives.append({**analogue, "description": analogue["description"]
                                 + ". Estimated in the 'impermissible' rows, flagged identified=False."})
        elif imp_entries:
            alternatives.append({
                "name": "edge effect of " + ", ".join(f"{a} -> {w}" for w in imp_entries),
                "description": ("A switched to a1 on the edges into " + ", ".join(imp_entries) + " and a0 elsewhere, "
                                "with everything downstream following (permissible continuations such as "
                                + (witness_paths[witnesses[0]]["permissible"] if witnesses else "those paths")
                                + " included). Estimated in the 'impermissible' rows, flagged identified=False."),
                "estimand": estimands["impermissible"],
            })
        alternatives.append({"name": "total effect", "description": "A switched on every path.",
                             "estimand": estimands["total"]})
        if witnesses:
            alternatives.append({**analogue, "estimand": "",
                                 "description": analogue["description"] + "; not estimated for a recanting witness"})

    switched = [w for w, v in switch["impermissible"].items() if v]
    hidden = [f"{sorted(e)[0]} <-> {sorted(e)[1]}" for e in bidirected]
    assumptions = [
        "The graph is correct: every unmeasured common cause of two modelled variables is declared as a latent node"
        + (f" (declared ones give {', '.join(hidden)})." if hidden else " (none declared)."),
        "Covariates " + (", ".join(covs) if covs else "(none)") + f" are not affected by {a} and suffice to adjust "
        f"for the confounding of {a}: {target}(·) ⊥ {a} | covariates.",
        "Consistency: the observed values are the potential outcomes under the observed A (no interference).",
        f"Effects are contrasts in the reference group: E[{target}(π) − {target} | A=a0].",
        "Cross-world independence (NPSEM-IE): a path-specific effect combines potential values of the mediators under "
        "a1 and a0 for the same patient; no experiment can check this, the interventional analogue does not need it.",
        "No recanting witness / district (checked above)."
        if identified else "Recanting witness / district present: see reasons.",
    ]
    positivity = (
        "Positivity: for every covariate value c seen in the reference group, 0 < p(A=a1 | c) < 1"
        + ("; and for each mediator whose A-input is switched (" + ", ".join(switched) + "), every value it takes in "
           "group a1 at given parents and covariates also occurs in group a0 (p(m | a0, pa, c) > 0 wherever "
           "p(m | a1, pa, c) > 0), otherwise the density ratio p(m | a1, ·)/p(m | a0, ·) is unbounded. Checked "
           "empirically by the estimator: positivity warnings per level, clipped weights, effective sample size."
           if switched else "."))
    notes = _mediator_edge_notes(spec, proj, classes)
    return Identification(
        notes=notes,
        identified=identified, target=target, sensitive=a, paths=paths, entries=classes,
        recanting_witnesses=witnesses, recanting_districts=rec_districts, witness_paths=witness_paths,
        total_effect_identified=total_ok, mediators=meds, covariates=covs, switch=switch, outcome_world=world,
        estimands=estimands, identified_alternative=alternatives, assumptions=assumptions, positivity=positivity,
        reasons=reasons, factor_world=factor_world, conditioning=conditioning, effect_identified=effect_identified,
        interventional=interventional,
    )


def _factor_worlds(districts: list[set[str]], switch: dict[str, int], meds: list[str], target: str,
                   target_default: int) -> tuple[dict[str, int], bool]:
    """The A-value each factor of the edge g-formula receives: a district's members all take the value of its
    entries (Shpitser's district kernels are evaluated at one A each); ``consistent`` is False when a district's
    entries disagree (the effect is then not identified). Districts without an entry take the target's value,
    which spares them a density ratio in the estimators."""
    consistent = True
    of: dict[str, int] = {}
    for dist in districts:
        vals = {switch[w] for w in dist if w in switch}
        if len(vals) > 1:
            consistent = False
        if vals:
            v = switch[target] if target in dist and target in switch else min(vals)
            of.update({n: switch.get(n, v) for n in dist})
    t_world = of.get(target, target_default)
    worlds = {m: of.get(m, switch.get(m, t_world)) for m in meds}
    worlds[target] = t_world
    return worlds, consistent


def tian_conditioning(spec: CausalSpec, proj: nx.DiGraph, target: str, meds: list[str]) -> dict[str, list[str]]:
    """For each mediator (and the target), the mediators its factor p(v | ...) conditions on in Tian's
    factorisation of the observed law: v's district within its predecessors (in a topological order of the
    projection) and that district's parents. In a graph without hidden common causes it is v's parents."""
    order = [n for n in nx.topological_sort(proj) if n in set(meds) | {target}]
    _p, bidirected = spec.projection()
    out: dict[str, list[str]] = {}
    for i, v in enumerate(order):
        before = set(order[: i + 1])
        h = nx.Graph()
        h.add_nodes_from(before)
        h.add_edges_from(tuple(e) for e in bidirected if e <= before)
        dist = nx.node_connected_component(h, v)
        cond = (dist | {p for d in dist for p in proj.predecessors(d)}) & (before - {v})
        out[v] = [m for m in order if m in cond]
    return out


def _mediator_edge_notes(spec: CausalSpec, proj: nx.DiGraph, classes: dict[str, str]) -> list[str]:
    """Plain words for each edge from an impermissible entry into a permissible one (e.g. S -> D), the case where
    the path rule decides who, if anyone, is a recanting witness."""
    a = spec.sensitive
    notes = []
    for u, v in proj.edges:
        if classes.get(u) in ("impermissible", "mixed") and v in classes and u != a and v != spec.prediction:
            if spec.nodes[v].resolving:
                notes.append(f"{u} -> {v} with '{v}' resolving: influence of {a} that reaches the score through "
                             f"{v} counts as justified, so {a} -> {u} -> {v} -> ... is permissible while "
                             f"{a} -> {u} -> ... (not through {v}) is impermissible: '{u}' (not '{v}') is the "
                             "recanting witness and the impermissible PSE is not identified.")
            else:
                notes.append(f"{u} -> {v}: the path {a} -> {u} -> {v} -> ... contains the impermissible edge "
                             f"{a} -> {u}, so under the default rule it is impermissible; '{v}' is NOT a recanting "
                             f"witness and the effect of the edge {a} -> {u} (its influence on {v} included) is "
                             f"identified. If influence through {v} should count as justified, mark '{v}' "
                             f"resolving = true: then '{u}' becomes the recanting witness and the PSE is not "
                             "identified.")
    return notes
