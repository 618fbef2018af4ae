"""An audit's result, pooled or federated: computed once, read-only, written as strict JSON and read back.

The sections are the report's (fairness/report.py renders one per field); their contents stay the plain
JSON-shaped values the estimators produce (see ``EffectTable.to_dict`` and ``GroupMetrics.to_dict``), so a stored
``fairness_audit.json`` renders the same report as the run that wrote it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core_models.jsonable import jsonable

AUDIT_VERSION = 1


@dataclass(frozen=True)
class AuditResult:
    """What one audit found. ``mode`` is "pooled" (a table of predictions) or "federated" (sites' noised sums);
    ``federated`` (sites, noise, cells, what was not released) and ``round`` only in federated audits;
    ``context`` is what the report added from a run folder (epsilon, shift, image evidence)."""

    mode: str
    spec: dict[str, Any]
    spec_source: str
    data: dict[str, Any]
    warnings: list[str]
    paths: list[dict[str, Any]]
    identification: dict[str, Any]
    effects: dict[str, Any]
    group_metrics: dict[str, Any] | None
    verdict: dict[str, Any]
    robustness: dict[str, Any] = field(default_factory=dict)
    per_site: dict[str, Any] | None = None
    timing_s: dict[str, float] = field(default_factory=dict)
    federated: dict[str, Any] | None = None
    round: int | None = None
    context: dict[str, Any] | None = None
    audit_version: int = AUDIT_VERSION

    def __post_init__(self):
        object.__setattr__(self, "verdict", jsonable(self.verdict))

    def replace(self, **changes) -> AuditResult:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The strict JSON document (NaN as null; the optional federated fields only when set)."""
        out = {"audit_version": self.audit_version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "audit_version" or (f.name in ("federated", "round", "context") and value is None):
                continue
            out[f.name] = value
        return jsonable(out)

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> AuditResult:
        """An audit read back from its JSON (unknown keys are an error: a newer format is not guessed at)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(document) - names)
        if unknown:
            raise ValueError(f"not an equifed audit (unknown keys {unknown})")
        return cls(**dict(document))

    @classmethod
    def read(cls, path: str | Path) -> AuditResult:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def write(self, path: str | Path) -> Path:
        """Strict JSON (NaN written as null), through a temporary file so a reader never sees half of it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False), encoding="utf-8")
        tmp.replace(path)
        return path


def as_result(audit: AuditResult | Mapping[str, Any]) -> AuditResult:
    return audit if isinstance(audit, AuditResult) else AuditResult.from_json(audit)
