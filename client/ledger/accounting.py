"""Epsilon from a ledger history, by Opacus' RDP analysis (its orders, its RDP curves, its conversion).

Histories are (sigma, q, steps) lists exactly as in RDPAccountant.history, so the numbers are Opacus' own.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

ORDERS = RDPAccountant.DEFAULT_ALPHAS


@lru_cache(maxsize=256)
def unit_rdp(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP curve of one step, read-only.

    Cached because RDPAccountant recomputes every curve on each get_epsilon (~50-100 ms each) and the ledger
    asks after every optimizer step; compute_rdp(steps=k) is exactly k times this array.
    """
    rdp = privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS)
    rdp.setflags(write=False)
    return rdp


def epsilon_of(history, delta: float) -> float:
    """RDPAccountant(history).get_epsilon(delta), bit for bit, with the per-step curves cached; 0.0 for none."""
    if not history:
        return 0.0
    # the sum RDPAccountant.get_privacy_spent forms, over cached curves (it has no cache of its own)
    rdp = sum([unit_rdp(float(s), float(q)) * steps for s, q, steps in history])
    eps, _ = privacy_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def epsilon_trail(entries: list[dict], delta: float) -> list[float]:
    """Epsilon after each entry at `delta`.

    Kept here because Opacus only gives the final epsilon; composing incrementally avoids re-summing the
    history for every entry.
    """
    rdp = np.zeros(len(ORDERS))
    out = []
    for e in entries:
        rdp = rdp + unit_rdp(float(e["sigma"]), float(e["q"])) * e["steps"]
        eps, _ = privacy_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
        out.append(float(eps))
    return out


def append_mechanism(history: list, sigma: float, q: float, steps: int) -> None:
    """Append like RDPAccountant.step: merge with the last item when (sigma, q) are equal.

    Kept here because RDPAccountant.step adds one step at a time; a charge or an entry carries `steps`.
    """
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = [sigma, q, history[-1][2] + steps]
    else:
        history.append([sigma, q, steps])


def history_of(entries: list[dict], kind: str | None = None) -> list:
    """The accountant history of the entries (of one kind: "train" or "release"), merged like Opacus'."""
    history: list = []
    for e in entries:
        if kind is None or e["kind"] == kind:
            append_mechanism(history, e["sigma"], e["q"], e["steps"])
    return history
