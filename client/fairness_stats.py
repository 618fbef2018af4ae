"""Fairness statistics a site releases: the federated audit's cells (producer "fairness") and the
penalty's consortium estimate (producer "fair-pse").

The global model scores the site's test split (one image per patient, so "one record" in a sensitivity is one
patient); the scores sit next to the manifest columns the graph spec names. What leaves the site, every vector
through `Releaser` (noise for its L2 sensitivity, charged to the ledger), is documented in fairness/federated.py:
cell counts, cell score sums and sums of squares (scores clipped to [0, 1]: sensitivity 1 each), and score
histograms per group x label (sensitivity 1). The cells (levels, covariate bin edges, score bins) come from the
run config's `stats-fairness-*` keys, fixed before any data are seen.

The request (graph, levels, bins) is checked against that public layout only; the site's data never make this
producer raise (an exception's type would tell the server something exact): a value outside the declared levels,
a missing value or a column the site lacks lands in the axis's "other" cell, a warning in the local log
(fairness/federated.py, `site_statistics`), and the reply has the same keys and lengths at every site.
"""

from __future__ import annotations

import numpy as np
import torch

from client.shift_stats import model_outputs, one_per_patient
from client.site import LocalSite
from client.statistics import Releaser
from core_models.config import FairAuditConfig, FairPenaltyConfig, read_section
from core_models.protocol import FAIR_COUNTS, PSE_COUNTS, PSE_SUMS
from core_models.training import make_loader, predict_proba
from fairness import mitigation
from fairness.federated import layout_for, release_statistics, site_statistics
from fairness.graph import GRAPH_DIR


def scores(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """P(class 1) of a binary model, float64."""
    logits, _ = model_outputs(model, images)
    if logits.shape[1] != 2:
        raise ValueError(f"the fairness audit needs a binary model, this one has {logits.shape[1]} outputs")
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)[:, 1].numpy()


def produce_fairness(site: LocalSite, model, request: dict, releaser: Releaser) -> dict:
    if model is None:
        raise ValueError("the fairness statistics need the global model")
    audit = read_section(FairAuditConfig, request)
    shipped = sorted(p.stem for p in GRAPH_DIR.glob("*.toml"))
    if audit.graph not in shipped:  # a path the server names is never opened here: whether it exists is site state
        raise ValueError(f"the site reads only the graph specs equifed ships ({shipped}), not {audit.graph!r}")
    layout = layout_for(audit)
    keep = one_per_patient(site.data.frame) & (site.split == "test").to_numpy()
    frame = site.data.frame.loc[keep].reset_index(drop=True)
    frame[layout.spec.column(layout.spec.prediction)] = scores(model, site.data.images[keep])
    return release_statistics(site_statistics(frame, layout, site.name), releaser)


def fair_meta_rows(frame, fair: FairPenaltyConfig) -> np.ndarray:
    """(A, S, C) of manifest rows, from the columns named by run config `fair-*`."""
    return mitigation.meta_array(frame, fair.sensitive, fair.mediator, fair.covariate, fair.reference)


def produce_fair_pse(site: LocalSite, model, request: dict, releaser: Releaser) -> dict:
    """Counts of (A, stratum = S, C-bin, D) and the global model's score sums over the same cells, on the split
    the penalty draws from (`fair-pool-split`), one image per patient, each noised (sensitivity 1: one patient is
    in one cell, score in [0, 1]) and charged."""
    fair = read_section(FairPenaltyConfig, request)
    keep = one_per_patient(site.data.frame) & (site.split == fair.pool_split).to_numpy()
    x, y = site.data.images[keep], site.data.labels[keep]
    p1 = predict_proba(model, make_loader(x, y, 256), next(model.parameters(), torch.zeros(0)).device)[:, 1]
    meta = fair_meta_rows(site.data.frame[keep], fair)
    counts, sums = mitigation.site_release_vectors(meta, p1, y, mitigation.parse_edges(fair.covariate_edges),
                                                   fair.mediator_levels)
    out = {PSE_SUMS: releaser.release("fair-pse-sums", sums, 1.0)}
    if bool(request.get(FAIR_COUNTS, True)):  # the counts do not change: the server asks for them once
        out[PSE_COUNTS] = releaser.release_counts("fair-pse-counts", counts, 1.0)
    return out
