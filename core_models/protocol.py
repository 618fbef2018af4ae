"""What a site and the server say to each other, typed: the names of a message's records, the keys of its config
and metrics, the error codes, and one frozen dataclass per message that reads (`from_records` / `from_config`) and
writes (`to_records` / `to_config`) its plain form.

The client and the server meet only through Flower messages; both read and write them through these classes (never
a key of their own). Flower's own strategies use the same names for the model, the request's config, the reply's
metrics, the round and FedProx's mu (its defaults: arrayrecord_key, configrecord_key, weighted_by_key).

Only the standard library here (an import-linter contract keeps it so): the plain form is dicts of the values a
Flower record holds, and core_models/wire.py turns it into a Flower Message and back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BUDGET_EXHAUSTED = 4001  # the site's privacy budget would be passed: it sits this request out
POLICY_REFUSED = 4002  # the request conflicts with the site's own privacy policy (the reason names the setting)

STATUS_OF_ERROR = {BUDGET_EXHAUSTED: "budget exhausted", POLICY_REFUSED: "refused by policy"}
_SITE_IN_REASON = re.compile(r"(?:^|[\s'<])site ([^\s:]+): ")


def site_error(site: str, text: str) -> str:
    """An error reply's reason that names the site (Flower's Error carries a code and a text only)."""
    return f"site {site}: {text}"


def error_site(reason: str) -> str | None:
    """The site a reason from `site_error` names, also inside the text Flower wraps around a ClientApp's
    exception; None when it names none."""
    found = _SITE_IN_REASON.search(reason)
    return found.group(1) if found else None


def error_status(code: int) -> str:
    """How a per-site row reads an error reply's code."""
    return STATUS_OF_ERROR.get(int(code), "error")


# --- records of a message (the keys of its RecordDict) ------------------------------------------------------------

ARRAYS = "arrays"  # ArrayRecord: the global model (request) or the site's trained model (train reply)
CONFIG = "config"  # ConfigRecord of a request: the keys below, and the broadcast extras (e.g. fair-ratio)
METRICS = "metrics"  # MetricRecord of a reply: the TRAIN_* / EVAL_* keys below (a query reply: its epsilons)
SITE = "site"  # ConfigRecord of a reply: the site's name under SITE_NAME
SITE_NAME = "name"
PRIVACY = "privacy"  # ConfigRecord of a reply that spent privacy: the dataset tag its spend belongs to
DATASET_TAG = "dataset-tag"  # a keyed hash of the site's dataset (never the dataset's own fingerprint)
DISCLOSURE = "disclosure"  # ConfigRecord of a reply: which of its metrics are noised, which are withheld (NaN)
NOISED = "noised"  # DISCLOSURE's entries: the metric keys, comma-separated
WITHHELD = "withheld"

# the statistics a query asks for (STATISTICS, comma-separated): a reply carries one MetricRecord under each
STAT_SHIFT = "shift"
STAT_FAIRNESS = "fairness"
STAT_FAIR_PSE = "fair-pse"
STAT_CALIBRATION = "calibration"
STATISTICS_KINDS = (STAT_SHIFT, STAT_FAIRNESS, STAT_FAIR_PSE, STAT_CALIBRATION)
PSE_SUMS = "sums"  # STAT_FAIR_PSE's entries: the global model's noised score sums per cell, and the cells' noised
PSE_COUNTS = "counts"  # counts (only when the request's FAIR_COUNTS asks for them)
# STAT_SHIFT's entries: six noised tables, each with its noise std under SIGMA + its name, and their shapes
LABEL_COUNTS, CONFUSION, OUTPUT_HIST = "label_counts", "confusion", "output_hist"
RFF_SUM, INTENSITY_HIST, MANUFACTURERS = "rff_sum", "intensity_hist", "manufacturers"
SHIFT_TABLES = (LABEL_COUNTS, CONFUSION, OUTPUT_HIST, RFF_SUM, INTENSITY_HIST, MANUFACTURERS)
NUM_CLASSES, NUM_OUTPUTS, BINS, RFF_DIM, MIN_COUNT = "num_classes", "num_outputs", "bins", "rff_dim", "min_count"
SIGMA = "sigma_"
# STAT_CALIBRATION's entries: the noised (2, BINS) score table, its noise std (SIGMA + HIST), NUM_CLASSES and BINS
HIST = "hist"
# (STAT_FAIRNESS's entries are fairness.federated's: both sides read them there)

# --- a request's config ----------------------------------------------------------------------------------------------

SERVER_ROUND = "server-round"  # the run's round (Flower's strategies set it; shifted after a resume)
PROXIMAL_MU = "proximal-mu"  # FedProx's mu (Flower's FedProx sets it)
STATISTICS = "statistics"  # a query: the statistics asked for, comma-separated (STATISTICS_KINDS)
SEED = "seed"  # a query: the run seed (shared randomness, e.g. a random-feature map all sites must use)
FAIR_COUNTS = "fair-counts"  # a fair-pse query: whether the cell counts are released too (the server asks once)
# a secure train request (run config secagg): how many sites it went to. The site keeps its trained model and
# sends it only inside the secure sum that follows (core_models/secagg.py); its reply carries the metrics alone.
SECURE_SITES = "secagg-sites"

# --- a train reply's metrics ---------------------------------------------------------------------------------------

TRAIN_LOSS = "train-loss"
VAL_AUROC = "val-auroc"  # of the site's model after local training, on its val split
VAL_LOSS = "val-loss"
NUM_EXAMPLES = "num-examples"  # the aggregation weight (noised under DP); also in an evaluate reply
REJECTED = "rejected"  # images the site could not read
STEPS = "steps"  # optimiser steps of the round
BOX_EXAMPLES = "box-examples"  # train metric of a detection round: the annotated images the site trained the head on
EPSILON_BEFORE = "epsilon-before"  # the ledger's epsilon before this request (also in a query reply)
EPSILON = "epsilon"  # after it (also in a query reply); inf: trained without DP, no guarantee
EPSILON_TRAIN = "epsilon-train"
EPSILON_RELEASE = "epsilon-release"
NOISE_MULTIPLIER = "noise-multiplier"

# --- an evaluate reply's metrics (and NUM_EXAMPLES) ------------------------------------------------------------------

EVAL_AUROC = "eval-auroc"
EVAL_ACCURACY = "eval-accuracy"
EVAL_LOSS = "eval-loss"
EVAL_MAP50 = "eval-map50"  # a detection run: average precision at IoU 0.5 on the annotated test images

# --- the fairness penalty's broadcast (a train request's config, after the consortium's strata are known) -----------

FAIR_RATIO = "fair-ratio"  # density ratio r(s, c) per (S level, C bin) cell
FAIR_P0 = "fair-p0"  # P(A = a0)
FAIR_PSE = "fair-pse"  # the consortium's PSE of the global model
FAIR_STRATUM_W = "fair-stratum-w"  # stratum weights p(k | a0) (r_k - 1)
FAIR_STRATUM_N = "fair-stratum-n"  # the pool's rows per stratum
FAIR_N_TOTAL = "fair-n-total"  # the consortium's training rows
FAIR_STRATUM_MEAN = "fair-stratum-mean"  # the consortium's mean score per stratum
FAIR_POOL_GROUPS = "fair-pool-groups"  # whether the pool holds both groups
FAIR_BROADCAST = (FAIR_RATIO, FAIR_P0, FAIR_PSE, FAIR_STRATUM_W, FAIR_STRATUM_N, FAIR_N_TOTAL, FAIR_STRATUM_MEAN,
                  FAIR_POOL_GROUPS)

DETECTION_HEAD = "head."  # state-dict prefix of a LesionDetector's own head (the classifier's keys are "classifier.")


# --- the messages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Records:
    """A message's content without its arrays, in plain form: its ConfigRecords and MetricRecords by name."""

    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def config(self) -> Mapping[str, Any]:
        """A request's CONFIG record (empty when it has none)."""
        return self.configs.get(CONFIG, {})


def number_in(config: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    """A number the server's message carries, finite and in [low, high] (ValueError otherwise): a site checks every
    value of a request before it reads any data."""
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"message value {name!r} must be a number in [{low:g}, {high:g}], got {value!r}")
    return value


@dataclass(frozen=True)
class RoundInstructions:
    """What every request tells a site about the round: its number, FedProx's mu, and (a train request, once the
    consortium's strata are known) the fairness penalty's broadcast. Flower's strategies write the first two; other
    entries of the config (e.g. Flower's central-DP clipping norm) are not the site's to read here."""

    server_round: int = 0
    proximal_mu: float = 0.0
    broadcast: Mapping[str, Any] = field(default_factory=dict)  # the FAIR_BROADCAST entries the request carries
    secure_sites: int = 0  # a secure train round: the sites asked (0: a plain round, the model in the reply)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundInstructions:
        """The request's values, range-checked (ValueError naming the value); the broadcast's own values are checked
        against the run's layout by fairness.mitigation.ConsortiumStrata.from_config."""
        return cls(server_round=int(number_in(config, SERVER_ROUND, 0, 0, 10**9)),
                   proximal_mu=float(number_in(config, PROXIMAL_MU, 0.0, 0.0, 1e6)),
                   broadcast={k: config[k] for k in FAIR_BROADCAST if k in config},
                   secure_sites=int(number_in(config, SECURE_SITES, 0, 0, 10**6)))

    @property
    def has_strata(self) -> bool:
        """Whether the server has broadcast the consortium's strata (before round 1 and after every round)."""
        return FAIR_RATIO in self.broadcast


@dataclass(frozen=True)
class StatisticsRequest:
    """A query: the statistics asked for, the round, the run seed (shared randomness), whether the fair-pse cell
    counts are asked for too (once), and the settings of the statistics' run-config sections (stats-*, fair-*)."""

    kinds: tuple[str, ...]
    server_round: int
    seed: int | None = None  # (the server always sends it; a statistic that needs it reads it)
    fair_counts: bool | None = None  # a fair-pse request only
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_config(self) -> dict[str, Any]:
        seed = {} if self.seed is None else {SEED: self.seed}
        counts = {} if self.fair_counts is None else {FAIR_COUNTS: bool(self.fair_counts)}
        return {STATISTICS: ",".join(self.kinds), SERVER_ROUND: self.server_round, **seed, **counts, **self.settings}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StatisticsRequest:
        """KeyError without a STATISTICS entry; the round range-checked like every request's."""
        kinds = tuple(k.strip() for k in str(config[STATISTICS]).split(",") if k.strip())
        counts = config.get(FAIR_COUNTS)
        return cls(kinds=kinds, server_round=int(number_in(config, SERVER_ROUND, 0, 0, 10**9)),
                   seed=config.get(SEED), fair_counts=None if counts is None else bool(counts),
                   settings={k: v for k, v in config.items() if k not in (STATISTICS, SERVER_ROUND, SEED, FAIR_COUNTS)})


@dataclass(frozen=True)
class TrainMetrics:
    """A train reply's METRICS record, by name: `to_metrics` gives its keys in the order they are sent."""

    train_loss: float
    val_auroc: float
    val_loss: float
    num_examples: float
    rejected: float
    steps: float
    epsilon_before: float = math.inf  # the defaults: a reply trained without DP says so (no guarantee)
    epsilon: float = math.inf
    epsilon_train: float = math.inf
    epsilon_release: float = math.inf
    noise_multiplier: float = 0.0
    box_examples: int | None = None  # a detection round only

    def to_metrics(self) -> dict[str, float]:
        boxed = {} if self.box_examples is None else {BOX_EXAMPLES: self.box_examples}
        return {TRAIN_LOSS: self.train_loss, VAL_AUROC: self.val_auroc, VAL_LOSS: self.val_loss,
                NUM_EXAMPLES: self.num_examples, REJECTED: self.rejected, STEPS: self.steps, **boxed,
                EPSILON_BEFORE: self.epsilon_before, EPSILON: self.epsilon, EPSILON_TRAIN: self.epsilon_train,
                EPSILON_RELEASE: self.epsilon_release, NOISE_MULTIPLIER: self.noise_multiplier}


@dataclass(frozen=True)
class EvalMetrics:
    """An evaluate reply's METRICS record, by name."""

    auroc: float
    accuracy: float
    loss: float
    num_examples: float
    map50: float | None = None  # a detection run only

    def to_metrics(self) -> dict[str, float]:
        return {EVAL_AUROC: self.auroc, EVAL_ACCURACY: self.accuracy, EVAL_LOSS: self.loss,
                NUM_EXAMPLES: self.num_examples, **({} if self.map50 is None else {EVAL_MAP50: self.map50})}


# what a DP reply says it noised and withheld (NaN), by kind of reply
TRAIN_NOISED, TRAIN_WITHHELD = (NUM_EXAMPLES,), (TRAIN_LOSS, VAL_AUROC, VAL_LOSS, REJECTED)
EVAL_NOISED, EVAL_WITHHELD = (NUM_EXAMPLES,), (EVAL_AUROC, EVAL_ACCURACY, EVAL_LOSS)


@dataclass(frozen=True)
class Disclosure:
    """A reply's DISCLOSURE record: the metric keys it noised, and those it withheld (NaN)."""

    noised: tuple[str, ...] = ()
    withheld: tuple[str, ...] = ()

    def to_config(self) -> dict[str, str]:
        return {NOISED: ",".join(self.noised), WITHHELD: ",".join(self.withheld)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Disclosure:
        return cls(*(tuple(k for k in str(config[name]).split(",") if k) for name in (NOISED, WITHHELD)))


@dataclass(frozen=True)
class SiteReply:
    """A site's answer to any request: its name, its METRICS (a train or evaluate reply's figures; a query reply's
    epsilons), the keyed tag of the dataset its privacy spend belongs to (a reply that spent privacy), what it
    noised or withheld, and a query reply's statistics (one record each). The model a train reply carries travels
    beside it (core_models/wire.py)."""

    site: str | None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    dataset_tag: str | None = None
    disclosure: Disclosure | None = None
    statistics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def trained(cls, site: str, metrics: TrainMetrics, dataset_tag: str | None = None) -> SiteReply:
        """A train reply; with a dataset tag (a DP round) its count noised and its other figures withheld."""
        said = None if dataset_tag is None else Disclosure(TRAIN_NOISED, TRAIN_WITHHELD)
        return cls(site, metrics.to_metrics(), dataset_tag, said)

    @classmethod
    def evaluated(cls, site: str, metrics: EvalMetrics, private: bool = False) -> SiteReply:
        """An evaluate reply; `private`: its count noised, its scores withheld."""
        return cls(site, metrics.to_metrics(), None, Disclosure(EVAL_NOISED, EVAL_WITHHELD) if private else None)

    @classmethod
    def released(cls, site: str, statistics: Mapping[str, Mapping[str, Any]], dataset_tag: str,
                 epsilon_before: float, epsilon: float) -> SiteReply:
        """A query reply: the statistics (each noised and charged) and the ledger's epsilons around them."""
        return cls(site, {EPSILON_BEFORE: epsilon_before, EPSILON: epsilon}, dataset_tag, None, dict(statistics))

    @property
    def epsilon_before(self) -> float:
        return float(self.metrics[EPSILON_BEFORE])

    @property
    def epsilon(self) -> float:
        return float(self.metrics[EPSILON])

    def to_records(self) -> Records:
        configs: dict[str, dict[str, Any]] = {}
        if self.dataset_tag is not None:
            configs[PRIVACY] = {DATASET_TAG: self.dataset_tag}
        if self.disclosure is not None:
            configs[DISCLOSURE] = self.disclosure.to_config()
        if self.site is not None:
            configs[SITE] = {SITE_NAME: self.site}
        return Records(configs, {**{k: dict(v) for k, v in self.statistics.items()}, METRICS: dict(self.metrics)})

    @classmethod
    def from_records(cls, records: Records) -> SiteReply:
        """What a reply says, read as sent (the server judges the values); its statistics are its metric records
        besides METRICS."""
        configs, metrics = records.configs, records.metrics
        privacy, said = configs.get(PRIVACY), configs.get(DISCLOSURE)
        return cls(site=str(configs[SITE][SITE_NAME]) if SITE in configs else None,
                   metrics=dict(metrics.get(METRICS, {})),
                   dataset_tag=None if privacy is None else str(privacy[DATASET_TAG]),
                   disclosure=None if said is None else Disclosure.from_config(said),
                   statistics={k: dict(v) for k, v in metrics.items() if k != METRICS})
