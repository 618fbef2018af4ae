"""Removing the impermissible (social-pathway) effect of A on the score in training, and a post-processing fallback.

One submodule per method, over one shared base (imports go one way: every method module may import ``strata``;
``strata`` imports none of them, and the methods do not import each other):

* :mod:`fairness.mitigation.strata`: shared by all. The quantity (the audit's weighted PSE), the (A, S, C-bin) cells
  and their clipped density ratios (:class:`DensityRatio`), the reading of a site's rows and the rule that excludes
  a row (:func:`meta_array`, :func:`valid_rows`), the sites' released vectors (:func:`site_release_vectors`) and the
  server's consortium strata (:class:`ConsortiumStrata`, :func:`consortium_strata`, :func:`consortium_pse`).
* :mod:`fairness.mitigation.penalties`: the in-training penalties ``2·λ·PSE_running·PSE_estimate``: per-sample
  (:class:`PathSpecificPenalty`, the form under DP-SGD) and stratified (:class:`StratifiedPathPenalty`).
* :mod:`fairness.mitigation.offset`: the mediator's logit offset in training, dropped at inference
  (:class:`MediatorOffset`).
* :mod:`fairness.mitigation.postprocess`: the post-processing score shift (:class:`ScoreShiftCorrection`).

A new method goes in a new submodule beside these (a training penalty: a callable ``(logits, y, meta) -> tensor``,
see docs/ARCHITECTURE.md), importing what it shares from ``strata``; its public names are re-exported here.
No Flower import anywhere in the package: the server and client glue lives in client/app.py and server/app.py.
"""

from fairness.mitigation.strata import (
    META_COLUMNS,
    ConsortiumStrata,
    DensityRatio,
    cell_counts,
    cell_index,
    consortium_pse,
    consortium_strata,
    meta_array,
    parse_edges,
    pct,
    site_release_vectors,
    stratum_index,
    stratum_weights,
    valid_rows,
)
from fairness.mitigation.penalties import (
    PathSpecificPenalty,
    StratifiedPathPenalty,
    batch_pse,
    penalty_term,
    positive_score,
)
from fairness.mitigation.offset import MediatorOffset
from fairness.mitigation.postprocess import ScoreShiftCorrection

__all__ = [
    "META_COLUMNS",
    "ConsortiumStrata",
    "DensityRatio",
    "MediatorOffset",
    "PathSpecificPenalty",
    "ScoreShiftCorrection",
    "StratifiedPathPenalty",
    "batch_pse",
    "cell_counts",
    "cell_index",
    "consortium_pse",
    "consortium_strata",
    "meta_array",
    "parse_edges",
    "pct",
    "penalty_term",
    "positive_score",
    "site_release_vectors",
    "stratum_index",
    "stratum_weights",
    "valid_rows",
]
