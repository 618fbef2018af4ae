"""The server's memory of each site's privacy spend, per dataset tag (a keyed hash the site computes; see
client.ledger.dataset_tag).

A site's ledger lives on the site's disk, so the server cannot stop a site from
deleting it; it can refuse to train with a site whose reported spend went backwards
(ledger missing or replaced). The registry survives runs: it is a JSON file the
consortium keeps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TOLERANCE = 1e-6


class PrivacyRegistry:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def check(self, fingerprint: str, site: str, epsilon_before: float) -> str | None:
        """Why this site must be refused, or None if its ledger is consistent with what we saw."""
        seen = self.records.get(fingerprint)
        if seen is None or epsilon_before >= seen["epsilon"] - TOLERANCE:
            return None
        if epsilon_before <= TOLERANCE:
            return (f"site {site}: dataset {fingerprint[:12]} already spent epsilon={seen['epsilon']:.3f} here, "
                    f"but its privacy ledger is missing (reported epsilon 0); refused for this run. "
                    f"Restore the ledger file; it must never be reset.")
        return (f"site {site}: dataset {fingerprint[:12]} reports epsilon={epsilon_before:.3f}, lower than the "
                f"{seen['epsilon']:.3f} recorded before; its ledger was replaced or rolled back; refused for this run.")

    def record(self, fingerprint: str, site: str, epsilon: float) -> None:
        previous = self.records.get(fingerprint, {}).get("epsilon", 0.0)
        self.records[fingerprint] = {"site": site, "epsilon": max(previous, float(epsilon)),
                                     "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=2))
        os.replace(tmp, self.path)
