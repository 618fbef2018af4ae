"""What a site and the server agree on without importing each other: the names of a message's records, the keys
of its config and metrics, and the error codes.

The client and the server meet only through Flower messages; both read these names from here (never a string
literal of their own). Flower's own strategies use the same names for the model, the request's config, the reply's
metrics, the round and FedProx's mu (its defaults: arrayrecord_key, configrecord_key, weighted_by_key).
"""

import math
import re
from dataclasses import dataclass

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

# --- a request's config ----------------------------------------------------------------------------------------------

SERVER_ROUND = "server-round"  # the run's round (Flower's strategies set it; shifted after a resume)
PROXIMAL_MU = "proximal-mu"  # FedProx's mu (Flower's FedProx sets it)
STATISTICS = "statistics"  # a query: the statistics asked for, comma-separated (STATISTICS_KINDS)
SEED = "seed"  # a query: the run seed (shared randomness, e.g. a random-feature map all sites must use)
FAIR_COUNTS = "fair-counts"  # a fair-pse query: whether the cell counts are released too (the server asks once)

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


def disclosure(noised: list[str], withheld: list[str]) -> dict[str, str]:
    """A DISCLOSURE record's entries: the metric keys a reply noised, and those it withheld (NaN)."""
    return {NOISED: ",".join(noised), WITHHELD: ",".join(withheld)}


DETECTION_HEAD = "head."  # state-dict prefix of a LesionDetector's own head (the classifier's keys are "classifier.")
