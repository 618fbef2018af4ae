"""Scenario files: a TOML description of a simulated consortium with a known causal model.

A scenario names a seed, an image size, a list of sites and an optional held-out evaluation set. Every site knob has a
built-in default; ``[defaults]`` overrides the built-ins and each ``[[sites]]`` table overrides ``[defaults]``. The
structural model per site is::

    A ~ Bernoulli(p_a)                                   sensitive attribute (column ``group``)
    C ~ round(clip(Normal(age_mean, age_std), 18, 95))   age, baseline covariate
    S = 1[U_S < p_s(A)],  p_s(0)=p_s_a0, p_s(1)=p_s_a1    legacy scanner, the impermissible A -> S edge
    D = 1[U_D < sigmoid(b0 + beta_a*A + beta_c*(C-55)/15 + beta_s*S)]
    X = apply_scanner(render_base(D, seeds), S, knobs)

``b0`` is solved so that the site's marginal P(D=1) equals ``prevalence + prevalence_offset`` (the offset is the
label-shift knob). ``extra_noise_std``, ``contrast_scale`` and ``brightness_offset`` act on both scanner types alike:
they are the site-wide covariate-shift knobs.

Shift knobs (checked against the truth by the shift statistics):

* none: leave them all at their defaults.
* pure label shift: ``label_prior = q`` keeps the site's structural model and redraws its patients class by class
  (the first ``round(n*q)`` diseased and ``n - round(n*q)`` healthy patients of the model's stream), so
  P(A, C, S, X | D) is exactly the model's and only P(D) moves to q. ``prevalence_offset`` also moves P(D), but
  through the structural equations, so P(S | D) (hence P(X | D)) moves a little when ``beta_a != 0``.
* pure covariate shift: ``extra_noise_std`` (scanner noise), ``contrast_scale``, ``brightness_offset``; P(D) is
  unchanged, P(X | D) changes.
* both: combine the two.

Example::

    name = "example"
    seed = 7
    image_size = 64
    [defaults]
    n = 300
    [[sites]]
    name = "hosp_a"
    p_s_a1 = 0.6
    [holdout]
    n = 400            # drawn from the pooled mix of site mechanisms (weights = site n), or
    # site = "hosp_a"  # from one named site's mechanism
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

# Bumped whenever the generator's output for the same scenario changes, so cached consortia are regenerated.
GENERATOR_VERSION = 2


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the offending key."""


@dataclass(frozen=True)
class SiteSpec:
    """All knobs of one simulated hospital (fully resolved: no value is missing)."""

    name: str
    n: int = 300
    # structural model
    p_a: float = 0.5  # P(A=1)
    p_s_a0: float = 0.2  # P(S=1 | A=0)
    p_s_a1: float = 0.4  # P(S=1 | A=1)
    prevalence: float = 0.3  # target marginal P(D=1)
    prevalence_offset: float = 0.0  # label-shift knob, added to prevalence
    label_prior: float = -1.0  # pure label shift: P(D=1) of the site's patients by class-wise redraw; < 0 = off
    beta_a: float = 0.5  # A -> D (permissible, biological)
    beta_c: float = 0.4  # C -> D, per 15 years above 55
    beta_s: float = 0.0  # S -> D (absent by default; makes D a recanting witness)
    age_mean: float = 55.0
    age_std: float = 15.0
    # image mechanism
    lesion_contrast: float = 0.40
    legacy_noise_std: float = 0.06
    legacy_contrast: float = 0.80
    legacy_blur_sigma: float = 0.8
    modern_noise_std: float = 0.03
    modern_contrast: float = 1.0
    modern_blur_sigma: float = 0.0
    marker: bool = False  # bright corner square when S=1 (the "ruler" shortcut)
    # site-wide covariate shift, applied to both scanner types
    extra_noise_std: float = 0.0
    contrast_scale: float = 1.0
    brightness_offset: float = 0.0
    # DICOM headers
    legacy_manufacturer: str = "Siemens"
    legacy_model: str = "Multix 1998"
    modern_manufacturer: str = "GE Healthcare"
    modern_model: str = "Definium 8000"

    @property
    def target_prevalence(self) -> float:
        return self.prevalence + self.prevalence_offset


@dataclass(frozen=True)
class HoldoutSpec:
    """Held-out evaluation set: not a client. ``site=None`` means the pooled mix of all site mechanisms."""

    n: int
    site: str | None = None
    name: str = "holdout"


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    image_size: int
    sites: list[SiteSpec]
    holdout: HoldoutSpec | None = None
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict, compare=False)  # [defaults] as written, for reference

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"scenario {self.name!r} has no site {name!r}")


def without_social_path(scenario: Scenario) -> Scenario:
    """The scenario with the A -> S edge cut: every site assigns scanners at its own marginal rate
    ``P(S=1) = p_a · p_s_a1 + (1 - p_a) · p_s_a0`` whatever the patient's group, so a patient keeps U_S and the site
    keeps its share of legacy scans, but S carries no information about A (or, through A, about D).

    Why not S = 0 everywhere: that also removes the legacy scanner's blur and noise, which no model of the real
    renders can undo, so an S-blind reference trained on clean images is an AUROC no mitigation can reach; with the
    edge cut the images are as degraded as in the real world and only the social path is gone."""
    sites = [dataclasses.replace(s, p_s_a0=m, p_s_a1=m)
             for s in scenario.sites for m in [s.p_a * s.p_s_a1 + (1.0 - s.p_a) * s.p_s_a0]]
    return dataclasses.replace(scenario, sites=sites)


_SITE_FIELDS = {f.name: f for f in dataclasses.fields(SiteSpec)}
_KNOBS = [k for k in _SITE_FIELDS if k != "name"]
_TOP_KEYS = {"name", "seed", "image_size", "description", "defaults", "sites", "holdout"}
_HOLDOUT_KEYS = {"n", "site", "name"}
_PROB_KEYS = {"p_a", "p_s_a0", "p_s_a1"}
_NONNEG_KEYS = {
    "age_std", "lesion_contrast", "legacy_noise_std", "modern_noise_std", "legacy_blur_sigma",
    "modern_blur_sigma", "extra_noise_std",
}
_POSITIVE_KEYS = {"legacy_contrast", "modern_contrast", "contrast_scale"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_type(where: str, key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ScenarioError(f"{where}: key '{key}' must be a finite number, got {value!r}")
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ScenarioError(f"{where}: key '{key}' must be of type {expected.__name__}, got {value!r}")
    return value


def _check_knobs(where: str, table: dict[str, Any], label: str) -> dict[str, Any]:
    """Type-check a table of site knobs; unknown keys are errors (typos must not pass silently)."""
    out = {}
    for key, value in table.items():
        if key not in _SITE_FIELDS or (key == "name" and label == "defaults"):
            allowed = ", ".join(_KNOBS)
            raise ScenarioError(f"{where}: unknown key '{label}.{key}' (allowed: {allowed})")
        out[key] = _check_type(where, f"{label}.{key}", value, _SITE_TYPES[key])
    return out


# annotations are strings under `from __future__ import annotations`; map them to types once
_SITE_TYPES = {f.name: {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
               for f in dataclasses.fields(SiteSpec)}


def _validate_site(where: str, label: str, s: SiteSpec) -> None:
    def bad(key: str, why: str) -> ScenarioError:
        return ScenarioError(f"{where}: key '{label}.{key}' {why}, got {getattr(s, key)!r}")

    if not _NAME_RE.match(s.name):
        raise bad("name", "must be a plain folder name (letters, digits, _ . -)")
    if s.n < 1:
        raise bad("n", "must be >= 1")
    for key in _PROB_KEYS:
        if not 0.0 <= getattr(s, key) <= 1.0:
            raise bad(key, "is a probability and must lie in [0, 1]")
    if not 0.0 < s.prevalence < 1.0:
        raise bad("prevalence", "must lie strictly between 0 and 1")
    if not 0.0 < s.target_prevalence < 1.0:
        raise bad("prevalence_offset", f"makes prevalence + offset = {s.target_prevalence:.3f}, outside (0, 1)")
    for key in _NONNEG_KEYS:
        if getattr(s, key) < 0:
            raise bad(key, "must be >= 0")
    for key in _POSITIVE_KEYS:
        if getattr(s, key) <= 0:
            raise bad(key, "must be > 0")
    if s.label_prior >= 0 and not 0.0 < s.label_prior < 1.0:
        raise bad("label_prior", "must lie strictly between 0 and 1 (or be negative: off)")
    if s.age_mean < 18 or s.age_mean > 95:
        raise bad("age_mean", "must lie in [18, 95]")


def scenario_from_dict(raw: dict[str, Any], where: str = "<scenario>") -> Scenario:
    """Validate and resolve a parsed scenario table (what tomllib returns)."""
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ScenarioError(f"{where}: unknown top-level key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("name", "seed", "sites"):
        if key not in raw:
            raise ScenarioError(f"{where}: missing required key '{key}'")
    name = _check_type(where, "name", raw["name"], str)
    seed = _check_type(where, "seed", raw["seed"], int)
    if seed < 0:
        raise ScenarioError(f"{where}: key 'seed' must be >= 0, got {seed}")
    image_size = _check_type(where, "image_size", raw.get("image_size", 64), int)
    if not 16 <= image_size <= 1024:
        raise ScenarioError(f"{where}: key 'image_size' must lie in [16, 1024], got {image_size}")
    description = _check_type(where, "description", raw.get("description", ""), str)
    defaults_raw = raw.get("defaults", {})
    if not isinstance(defaults_raw, dict):
        raise ScenarioError(f"{where}: key 'defaults' must be a table")
    defaults = _check_knobs(where, defaults_raw, "defaults")

    sites_raw = raw["sites"]
    if not isinstance(sites_raw, list) or not sites_raw or not all(isinstance(t, dict) for t in sites_raw):
        raise ScenarioError(f"{where}: key 'sites' must be a non-empty array of tables ([[sites]])")
    sites: list[SiteSpec] = []
    for i, table in enumerate(sites_raw):
        label = f"sites[{i}]"
        knobs = _check_knobs(where, table, label)
        if "name" not in knobs:
            raise ScenarioError(f"{where}: missing required key '{label}.name'")
        if "n" not in knobs and "n" not in defaults:
            raise ScenarioError(f"{where}: missing required key '{label}.n' (set it per site or in [defaults])")
        spec = SiteSpec(**{**defaults, **knobs})
        _validate_site(where, label, spec)
        sites.append(spec)
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ScenarioError(f"{where}: key 'sites[].name' must be unique, '{dup}' appears twice")

    holdout = None
    if "holdout" in raw:
        h = raw["holdout"]
        if not isinstance(h, dict):
            raise ScenarioError(f"{where}: key 'holdout' must be a table")
        unknown = set(h) - _HOLDOUT_KEYS
        if unknown:
            raise ScenarioError(f"{where}: unknown key 'holdout.{sorted(unknown)[0]}' (allowed: n, site, name)")
        if "n" not in h:
            raise ScenarioError(f"{where}: missing required key 'holdout.n'")
        hn = _check_type(where, "holdout.n", h["n"], int)
        if hn < 1:
            raise ScenarioError(f"{where}: key 'holdout.n' must be >= 1, got {hn}")
        hsite = h.get("site")
        if hsite is not None:
            _check_type(where, "holdout.site", hsite, str)
            if hsite not in names:
                raise ScenarioError(f"{where}: key 'holdout.site' names unknown site {hsite!r} (sites: {names})")
        hname = _check_type(where, "holdout.name", h.get("name", "holdout"), str)
        if not _NAME_RE.match(hname) or hname in names:
            raise ScenarioError(f"{where}: key 'holdout.name' must be a folder name distinct from the sites, got {hname!r}")
        holdout = HoldoutSpec(n=hn, site=hsite, name=hname)
    return Scenario(name=name, seed=seed, image_size=image_size, sites=sites, holdout=holdout,
                    description=description, defaults=defaults)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML file. A bare name like ``"default"`` resolves to the shipped ``scenarios/default.toml``."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (SCENARIO_DIR / f"{p.name}.toml").exists():
        p = SCENARIO_DIR / f"{p.name}.toml"
    try:
        with open(p, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ScenarioError(f"{p}: scenario file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    return scenario_from_dict(raw, where=str(p))


# Knobs added after consortia were first generated: left out of the hash while off, so the folders generated
# before they existed still match their scenario.
_LATER_KNOBS = {"label_prior": -1.0}


def _site_dict(s: SiteSpec) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    return {k: v for k, v in d.items() if not (k in _LATER_KNOBS and v == _LATER_KNOBS[k])}


def _resolved_dict(scenario: Scenario) -> dict[str, Any]:
    return {
        "name": scenario.name,
        "seed": scenario.seed,
        "image_size": scenario.image_size,
        "sites": [_site_dict(s) for s in scenario.sites],
        "holdout": dataclasses.asdict(scenario.holdout) if scenario.holdout else None,
    }


def scenario_hash(scenario: Scenario) -> str:
    """SHA-256 over every resolved value that shapes the generated data (description and [defaults] spelling excluded)."""
    blob = json.dumps(_resolved_dict(scenario), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def scenario_to_toml(scenario: Scenario) -> str:
    """The fully resolved scenario as TOML (every knob spelled out per site); load_scenario reads it back unchanged."""
    lines = [f"# resolved scenario, generator version {GENERATOR_VERSION}",
             f"name = {_toml_value(scenario.name)}",
             f"seed = {scenario.seed}",
             f"image_size = {scenario.image_size}",
             f"description = {_toml_value(scenario.description)}", ""]
    for s in scenario.sites:
        lines.append("[[sites]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(s).items()]
        lines.append("")
    if scenario.holdout:
        lines.append("[holdout]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(scenario.holdout).items() if v is not None]
    return "\n".join(lines) + "\n"
