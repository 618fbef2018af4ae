"""The run configuration, typed and read once per handler.

Flower hands every handler the whole run config: pyproject's `[tool.flwr.app.config]` (the one place
defaults live) merged with the run's overrides. Each concern below reads its keys into a frozen
dataclass, so a handler reads `RunConfig.from_flower(context.run_config)` at its top and never looks
a key up again; a missing or mistyped key fails there, by name. The field-to-key map is explicit
(`key(...)`); a test checks that the dataclasses and pyproject's table name the same keys. The training keys
pyproject leaves at "auto" (model, optimizer, learning-rate, batch-size, local-epochs) are resolved first, by
(model, dp): `resolve_auto`, `RECIPES`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from core_models.devices import parse_device


class ConfigError(ValueError):
    """A run-config key that is missing, unknown or of the wrong type (named in the message)."""


def key(name: str):
    """A dataclass field read from run-config key `name`."""
    return field(metadata={"key": name})


def _coerce(name: str, value: Any, kind: type) -> Any:
    if value == AUTO and name in AUTO_KEYS:  # resolved by resolve_auto before any section reads it
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"run config {name!r} must be {kind.__name__}, got {value!r}")


def read_section(cls, run_config: Mapping[str, Any]):
    """One section (e.g. FairPenaltyConfig) from a run config or a request carrying its keys."""
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name = f.metadata["key"]
        if name not in run_config:
            raise ConfigError(f"run config has no {name!r} (pyproject.toml [tool.flwr.app.config] declares it)")
        values[f.name] = _coerce(name, run_config[name], hints[f.name])
    out = cls(**values)
    check = getattr(out, "check", None)
    if check is not None:
        check()
    return out


def schema(cls=None) -> dict[str, type]:
    """Run-config key -> type, for a section or (by default) the whole RunConfig."""
    cls = RunConfig if cls is None else cls
    hints = get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            out[f.metadata["key"]] = hints[f.name]
        else:
            out.update(schema(hints[f.name]))
    return out


def _within(name: str, value: float, low: float, high: float, *, above: bool = False) -> None:
    """`value` is a finite number in [low, high] ((low, high] with `above`): every numeric key a site reads is
    checked like this before any data are read, so a refusal never depends on the data and no NaN, inf or huge
    value reaches a computation whose result leaves the site."""
    ok = math.isfinite(value) and (value > low if above else value >= low) and value <= high
    if not ok:
        bound = f"{'(' if above else '['}{low:g}, {high:g}]"
        raise ConfigError(f"run config {name!r} must be a finite number in {bound}, got {value!r}")


def _one_of(name: str, value: str, choices: tuple[str, ...], also: tuple[str, ...] = ()) -> None:
    """`value` is one of `choices` (the message names `also` too: values resolved before the check)."""
    if value not in choices:
        raise ConfigError(f"run config {name!r} must be one of {[*also, *choices]}, got {value!r}")


AUTO = "auto"


@dataclass(frozen=True)
class Recipe:
    """How a model trains: what the training keys a run leaves at "auto" become."""

    optimizer: str
    learning_rate: float
    batch_size: int
    local_epochs: int
    rounds: int = 5  # num-server-rounds


# Without DP every model trains with these (make demo's settings).
PLAIN_RECIPE = Recipe(optimizer="adam", learning_rate=0.002, batch_size=16, local_epochs=2)
# (model, dp) -> its measured recipe; any other pair trains with PLAIN_RECIPE. Under DP, scatter-linear learns on
# real scans at hospital sizes with full-batch DP-GD (benchmarks/RESULTS.md, Session 17: BreastMNIST, 3 sites,
# epsilon 8, holdout AUROC 0.83 where the cnn stays at the majority rate): a logical batch of 256 (>= a site's
# patients, so every local epoch is one noised step of the whole site), plain SGD with a large step on the clipped
# mean gradient (Adam, or many small steps, let clipping pull the probabilities to the majority class), and one
# local epoch a round (no client drift under label skew); 20 rounds, as measured (5 noised steps leave it near the
# majority rate).
RECIPES: dict[tuple[str, bool], Recipe] = {
    ("scatter-linear", True): Recipe(optimizer="sgd", learning_rate=0.5, batch_size=256, local_epochs=1, rounds=20),
}
# Volumes (dims = 3): a site has fewer studies than a 2-D site has images, so each round trains longer (the volume
# scenario, 4 sites of ~110 training studies, 5 rounds, 3-D cnn at 32^3: holdout AUROC 0.83 with 2 local epochs,
# 1.00 with 5; under DP at epsilon 8 with 5: 0.72).
VOLUME_RECIPE = Recipe(optimizer="adam", learning_rate=0.002, batch_size=16, local_epochs=5)
# model = "auto", by dp: under DP, fixed scattering features and one linear layer (few noised parameters)
AUTO_MODEL = {False: "cnn", True: "scatter-linear"}
AUTO_KEYS = {"model": "model", "optimizer": "optimizer", "learning-rate": "learning_rate",
             "batch-size": "batch_size", "local-epochs": "local_epochs",
             "num-server-rounds": "rounds"}  # run-config key -> Recipe field


def recipe_for(model: str, dp: bool, dims: int = 2) -> Recipe:
    if dims == 3:
        return VOLUME_RECIPE
    return RECIPES.get((model, dp), PLAIN_RECIPE)


def resolve_auto(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """`run_config` with each training key left at "auto" set for this run; a value the run gives is kept.
    model: scatter-linear under dp, cnn otherwise (and whenever the run needs a trainable encoder: a pretext task,
    detection, a pretrained checkpoint); optimizer, learning-rate, batch-size, local-epochs, num-server-rounds: the
    recipe of (model, dp), or of volumes. Server and sites read the same run config, so they resolve it alike."""
    out = dict(run_config)
    if not any(out.get(name) == AUTO for name in AUTO_KEYS):
        return out
    dp = _coerce("dp", out.get("dp", False), bool)
    if out.get("model") == AUTO:
        needs_encoder = bool(out.get("pretext")) or out.get("detection") in (True, "true") \
            or bool(out.get("pretrained-path")) or str(out.get("dims", 2)) == "3"  # scattering is 2-D only
        out["model"] = AUTO_MODEL[dp and not needs_encoder]
    recipe = recipe_for(str(out.get("model")), dp, 3 if str(out.get("dims", 2)) == "3" else 2)
    for name, attr in AUTO_KEYS.items():
        if out.get(name) == AUTO:
            out[name] = getattr(recipe, attr)
    return out


def auto_settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The training keys this run config leaves at "auto", with what they resolve to (to print and record)."""
    resolved = resolve_auto(run_config)
    return {name: resolved[name] for name in AUTO_KEYS if run_config.get(name) == AUTO}


@dataclass(frozen=True)
class TrainingConfig:
    """What each site's local training does with the global model."""

    MODELS = ("cnn", "resnet", "resnet18", "scatter", "scatter-linear")  # what core_models.networks.build_model builds
    PRETEXTS = ("", "rotation", "inpainting", "contrastive")  # "" and core_models.pretext.PRETEXT_TASKS
    BATCH_COUPLED_PRETEXTS = ("contrastive",)  # a loss over the whole batch: no per-sample gradient for DP-SGD

    model: str = key("model")
    num_classes: int = key("num-classes")
    image_size: int = key("image-size")
    in_channels: int = key("in-channels")  # 1 = grey, 3 = RGB (colour modalities: dermoscopy, fundus, pathology)
    local_epochs: int = key("local-epochs")
    batch_size: int = key("batch-size")
    learning_rate: float = key("learning-rate")
    optimizer: str = key("optimizer")
    weight_decay: float = key("weight-decay")
    grad_accumulation: int = key("grad-accumulation")
    seed: int = key("seed")  # splits, shuffling and the penalty's draws; never DP noise
    pretrained_path: str = key("pretrained-path")  # the server's initial model; "" = fresh weights
    pretrained_key_map: str = key("pretrained-key-map")
    freeze: str = key("freeze")
    unfreeze_after: int = key("unfreeze-after")
    pretext: str = key("pretext")  # "" = label training; else the run trains the encoder on this pretext task
    detection: bool = key("detection")  # also train a lesion detector on the encoder (sites' boxes.csv)
    device: str = key("device")  # auto | cpu | cuda | cuda:N (core_models.devices); a site's own setting wins there
    dims: int = key("dims")  # 2 = images; 3 = volumes (image_path: a DICOM series folder or a NIfTI file)
    volume_window: str = key("volume-window")  # CT window: a preset or "centre,width" in HU; "none" = MR scaling
    volume_spacing: float = key("volume-spacing")  # mm, isotropic, then cropped/padded; 0 = resize the whole volume

    def load_options(self) -> dict[str, Any]:
        """What core_models.data.load_site needs from this run to read a site's or the holdout's files."""
        return {"image_size": self.image_size, "num_classes": self.num_classes, "channels": self.in_channels,
                "volume": self.volume_settings()}

    def volume_settings(self):
        """How a volume run reads its studies (core_models.data.VolumeSettings); None for an image run."""
        if self.dims != 3:
            return None
        from core_models.data.volumes import VolumeSettings

        return VolumeSettings.from_window(self.volume_window, spacing=self.volume_spacing or None)

    def _check_volumes(self) -> None:
        _one_of("dims", self.dims, (2, 3))
        _within("volume-spacing", self.volume_spacing, 0.0, 100.0)
        if self.dims != 3:
            return
        try:
            self.volume_settings()
        except ValueError as err:
            raise ConfigError(f"run config 'volume-window': {err}") from None
        refused = [(self.model.startswith("scatter"), f"model = {self.model!r} (2-D wavelet features)"),
                   (self.in_channels != 1, "in-channels = 3"), (bool(self.detection), "detection"),
                   (bool(self.pretext), f"pretext = {self.pretext!r}"), (self.image_size > 128, "image-size > 128"),
                   (self.image_size < 16, "image-size < 16")]
        for bad, what in refused:
            if bad:
                raise ConfigError(f"run config 'dims' = 3 (volumes) does not go with {what}: volumes train the "
                                  f"cnn or resnet classifier on one channel, 16 to 128 voxels a side")

    def check(self) -> None:
        _one_of("model", self.model, self.MODELS, also=(AUTO,))
        if self.model.startswith("scatter") and self.image_size % 4:
            raise ConfigError(f"run config 'model' = {self.model!r} scatters the image at two scales: 'image-size' "
                              f"must be a multiple of 4, got {self.image_size}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"run config 'in-channels' must be 1 (grey) or 3 (RGB), got {self.in_channels}")
        _one_of("pretext", self.pretext, self.PRETEXTS)
        try:  # the name only: whether the card exists is known where it trains (core_models.devices)
            parse_device(self.device)
        except ValueError as err:
            raise ConfigError(f"run config 'device' {err}") from None
        if self.pretext and self.freeze == "encoder":
            raise ConfigError("run config 'pretext' trains the encoder: it cannot be frozen (freeze = 'encoder')")
        _one_of("optimizer", self.optimizer, ("adam", "sgd"), also=(AUTO,))
        self._check_volumes()
        _one_of("freeze", self.freeze, ("none", "stem", "encoder"))  # core_models.pretrained.FREEZE_CHOICES
        if self.unfreeze_after < 0:
            raise ConfigError(f"run config 'unfreeze-after' must be >= 0, got {self.unfreeze_after}")
        for name, value in (("local-epochs", self.local_epochs), ("batch-size", self.batch_size),
                            ("image-size", self.image_size), ("grad-accumulation", self.grad_accumulation)):
            if value < 1:
                raise ConfigError(f"run config {name!r} must be >= 1, got {value}")
        _within("num-classes", self.num_classes, 2, 10_000)
        _within("learning-rate", self.learning_rate, 0.0, 10.0, above=True)
        _within("weight-decay", self.weight_decay, 0.0, 10.0)
        _within("seed", self.seed, 0, 2**63 - 1)


@dataclass(frozen=True)
class DPConfig:
    """Local DP-SGD (the site's own policy and ledger still decide) and Flower's central DP."""

    enabled: bool = key("dp")
    target_epsilon: float = key("target-epsilon")
    target_delta: float = key("target-delta")  # informational: each site uses its own delta
    max_grad_norm: float = key("max-grad-norm")
    physical_batch_size: int = key("physical-batch-size")
    central: bool = key("central-dp")
    central_noise: float = key("central-dp-noise")
    central_clip: float = key("central-dp-clip")

    def check(self) -> None:
        _within("target-epsilon", self.target_epsilon, 0.0, 1e4, above=True)
        _within("target-delta", self.target_delta, 0.0, 1.0, above=True)
        _within("max-grad-norm", self.max_grad_norm, 0.0, 1e6, above=True)
        _within("physical-batch-size", self.physical_batch_size, 1, 1e9)
        _within("central-dp-noise", self.central_noise, 0.0, 1e6)
        _within("central-dp-clip", self.central_clip, 0.0, 1e6, above=True)


@dataclass(frozen=True)
class ReleaseConfig:
    """Which site statistics are asked for, and the noise every released value carries."""

    statistics: str = key("statistics")
    noise: float = key("release-noise")
    min_count: int = key("release-min-count")
    calibrate: bool = key("calibrate")  # the "calibration" statistic, once, with the final model

    def check(self) -> None:
        _within("release-noise", self.noise, 0.0, 1e6, above=True)
        _within("release-min-count", self.min_count, 0, 1e9)

    @property
    def kinds(self) -> list[str]:
        return [k.strip() for k in self.statistics.split(",") if k.strip()]


@dataclass(frozen=True)
class ShiftConfig:
    """The "shift" statistic's public settings (sent to the sites) and the server's tests."""

    rff_dim: int = key("stats-rff-dim")
    feature_clip: float = key("stats-feature-clip")
    rff_bandwidth: float = key("stats-rff-bandwidth")
    manufacturers: str = key("stats-manufacturers")
    bootstrap: int = key("stats-bootstrap")
    alpha: float = key("stats-alpha")

    def check(self) -> None:
        _within("stats-rff-dim", self.rff_dim, 2, 1e9)  # the site's policy sets the ceiling (max-stats-dim)
        if self.rff_dim % 2:
            raise ConfigError(f"run config 'stats-rff-dim' must be even (cos and sin of each frequency), got "
                              f"{self.rff_dim}")
        _within("stats-feature-clip", self.feature_clip, 0.0, 1e6, above=True)
        # on features rescaled into the unit ball, a bandwidth far outside [1e-3, 1e3] only makes the kernel
        # trivial (and a tiny one overflows the projection)
        _within("stats-rff-bandwidth", self.rff_bandwidth, 1e-3, 1e3)
        _within("stats-bootstrap", self.bootstrap, 0, 1e6)
        _within("stats-alpha", self.alpha, 0.0, 1.0, above=True)

    @property
    def vocabulary(self) -> list[str]:
        """The manufacturer names counted one by one (every other name is counted as "other")."""
        return [v.strip() for v in self.manufacturers.split(",") if v.strip()]


@dataclass(frozen=True)
class FairAuditConfig:
    """The federated fairness audit's fixed layout (graph, bins, levels) and bootstrap."""

    graph: str = key("stats-fairness-graph")
    bins: str = key("stats-fairness-bins")
    levels: str = key("stats-fairness-levels")
    score_bins: int = key("stats-fairness-score-bins")
    boot: int = key("stats-fairness-boot")
    once: bool = key("stats-fairness-once")  # the cells asked for after the planned last round only
    noise: float = key("stats-fairness-noise")  # noise multiplier of the cells; 0 = release-noise

    def check(self) -> None:
        _within("stats-fairness-score-bins", self.score_bins, 1, 1e9)  # ceiling: the site's max-stats-dim
        _within("stats-fairness-boot", self.boot, 0, 1e6)
        _within("stats-fairness-noise", self.noise, 0.0, 1e6)


@dataclass(frozen=True)
class FairPenaltyConfig:
    """The path-specific fairness penalty and the mediator offset; columns are named, never assumed."""

    lam: float = key("fair-lambda")
    sensitive: str = key("fair-sensitive")
    reference: int = key("fair-reference")
    mediator: str = key("fair-mediator")
    mediator_levels: int = key("fair-mediator-levels")
    covariate: str = key("fair-covariate")
    covariate_edges: str = key("fair-covariate-edges")
    max_weight: float = key("fair-max-weight")
    form: str = key("fair-form")
    per_cell: int = key("fair-per-cell")
    pool_groups: bool = key("fair-pool-groups")
    pool_split: str = key("fair-pool-split")
    offset: bool = key("fair-offset")
    factorise_label: bool = key("fair-factorise-label")
    dual_lr: float = key("fair-dual-lr")

    @property
    def active(self) -> bool:
        """Whether any fairness feature reads the manifest's fairness columns."""
        return self.lam > 0 or self.offset

    def check(self) -> None:
        _one_of("fair-form", self.form, ("stratified", "per-sample"))
        _one_of("fair-pool-split", self.pool_split, ("train", "val"))
        _within("fair-lambda", self.lam, 0.0, 1e6)
        _within("fair-mediator-levels", self.mediator_levels, 1, 1e9)  # ceiling: the site's max-stats-dim
        _within("fair-max-weight", self.max_weight, 0.0, 1e6, above=True)
        _within("fair-per-cell", self.per_cell, 1, 1e9)
        _within("fair-dual-lr", self.dual_lr, 0.0, 1e6)
        try:
            edges = [float(x) for x in self.covariate_edges.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"run config 'fair-covariate-edges' must be comma-separated numbers, got "
                              f"{self.covariate_edges!r}") from None
        if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ConfigError(f"run config 'fair-covariate-edges' must be finite and increasing, got "
                              f"{self.covariate_edges!r}")
        if self.active:
            missing = [k for k, v in (("fair-sensitive", self.sensitive), ("fair-mediator", self.mediator)) if not v]
            if missing:
                raise ConfigError(f"fair-lambda > 0 or fair-offset = true needs the manifest columns named: set "
                                  f"{' and '.join(missing)} (e.g. -c fair-sensitive=race -c fair-mediator=scanner)")

    @property
    def columns(self) -> list[str]:
        """The manifest columns the penalty reads."""
        return [c for c in (self.sensitive, self.mediator, self.covariate) if c]


@dataclass(frozen=True)
class ServerConfig:
    """The federation: rounds, strategy, who takes part, where results go, which model is kept."""

    num_rounds: int = key("num-server-rounds")
    strategy: str = key("strategy")
    proximal_mu: float = key("proximal-mu")
    server_lr: float = key("server-lr")
    fraction_train: float = key("fraction-train")
    fraction_evaluate: float = key("fraction-evaluate")
    min_train_nodes: int = key("min-train-nodes")
    round_timeout: float = key("round-timeout")
    registry_path: str = key("registry-path")
    data_root: str = key("data-root")
    holdout_path: str = key("holdout-path")
    out_dir: str = key("out-dir")
    resume: bool = key("resume")
    best_by: str = key("best-by")
    patience: int = key("patience")
    secagg: bool = key("secagg")  # train rounds securely aggregated: the server learns the sum, never one model
    secagg_statistics: bool = key("secagg-statistics")  # the fairness audit's cells through the secure sum too
    tracking_uri: str = key("tracking-uri")  # "" = no experiment tracking (server/tracking.py)
    tracking_experiment: str = key("tracking-experiment")

    def check(self) -> None:
        _one_of("strategy", self.strategy, ("fedavg", "fedprox", "fedadam"))
        _one_of("best-by", self.best_by, ("val-loss", "val-auroc", "holdout-loss", "holdout-auroc", "none"))
        if self.num_rounds < 1:
            raise ConfigError(f"run config 'num-server-rounds' must be >= 1, got {self.num_rounds}")
        if self.patience < 0:
            raise ConfigError(f"run config 'patience' must be >= 0 rounds (0 = off), got {self.patience}")
        _within("proximal-mu", self.proximal_mu, 0.0, 1e6)
        _within("server-lr", self.server_lr, 0.0, 1e3, above=True)
        _within("fraction-train", self.fraction_train, 0.0, 1.0)
        _within("fraction-evaluate", self.fraction_evaluate, 0.0, 1.0)
        _within("min-train-nodes", self.min_train_nodes, 0, 1e6)
        _within("round-timeout", self.round_timeout, 0.0, 1e7, above=True)

    def check_holdout(self) -> None:
        """What only the assembled run config can tell (a command sets holdout-path itself)."""
        if self.best_by.startswith("holdout-") and not self.holdout_path:
            raise ConfigError(f"run config 'best-by' = {self.best_by!r} needs a holdout set (holdout-path); "
                              f"use val-loss or val-auroc")


@dataclass(frozen=True)
class RunConfig:
    """The whole run config, one section per concern."""

    train: TrainingConfig
    dp: DPConfig
    release: ReleaseConfig
    shift: ShiftConfig
    audit: FairAuditConfig
    fair: FairPenaltyConfig
    server: ServerConfig

    def __post_init__(self) -> None:
        if self.train.pretext:
            clash = [name for name, on in (("fair-lambda", self.fair.lam > 0), ("fair-offset", self.fair.offset),
                                           ("statistics", bool(self.release.kinds)), ("central-dp", self.dp.central),
                                           ("calibrate", self.release.calibrate))
                     if on]
            if clash:
                raise ConfigError(f"run config 'pretext' = {self.train.pretext!r} trains the encoder without labels: "
                                  f"it cannot be combined with {', '.join(clash)}")
            if self.train.pretext in TrainingConfig.BATCH_COUPLED_PRETEXTS and self.train.batch_size < 2:
                raise ConfigError(f"run config 'pretext' = {self.train.pretext!r} compares each image with the rest "
                                  f"of its batch: 'batch-size' must be >= 2 (64 measured), got {self.train.batch_size}")
            if self.dp.enabled and self.train.pretext in TrainingConfig.BATCH_COUPLED_PRETEXTS:
                raise ConfigError(f"run config 'pretext' = {self.train.pretext!r} cannot run with dp = true: its loss "
                                  "compares each image with the rest of the batch, so DP-SGD's per-sample clipping "
                                  "would not bound one patient's influence; use 'rotation' or 'inpainting'")
        if self.server.secagg:
            # secure aggregation sums weight x model: Flower's central-DP clipping needs each site's model at the
            # server, and the detection head is weighted by annotations, not num-examples
            clash = [name for name, on in (("central-dp", self.dp.central), ("detection", self.train.detection)) if on]
            if clash:
                raise ConfigError(f"run config 'secagg' = true is not available with {', '.join(clash)}")
        if self.server.secagg_statistics and not (self.server.secagg and "fairness" in self.release.kinds):
            raise ConfigError("run config 'secagg-statistics' = true needs 'secagg' = true and 'fairness' among "
                              "'statistics' (it sums the fairness audit's cells securely)")
        if self.train.detection:
            # central-dp: its noise is sized for equal weights, and the detection head is weighted by annotations
            clash = [name for name, on in (("pretext", bool(self.train.pretext)), ("dp", self.dp.enabled),
                                           ("central-dp", self.dp.central), ("fair-lambda", self.fair.lam > 0),
                                           ("fair-offset", self.fair.offset)) if on]
            if self.train.model != "cnn":
                clash.append(f"model = {self.train.model!r} (the detector taps the cnn's feature maps)")
            if clash:
                raise ConfigError(f"run config 'detection' = true is not available with {', '.join(clash)}")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """The run config read section by section, its "auto" training keys resolved (resolve_auto)."""
        run_config = resolve_auto(run_config)
        hints = get_type_hints(cls)
        return cls(**{f.name: read_section(hints[f.name], run_config) for f in dataclasses.fields(cls)})


def keys_of(section) -> dict[str, Any]:
    """A section as run-config key -> value: what a request to the sites carries (e.g. every fair-* key)."""
    return {f.metadata["key"]: getattr(section, f.name) for f in dataclasses.fields(section)}


APP_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"  # the Flower app's own


def run_config_of(settings: RunConfig | Mapping[str, Any]) -> RunConfig:
    """`settings` as a RunConfig: one as it is, Flower's run config (every key) read as it is, and a few keys
    (a test's, a benchmark's) read over the app's defaults in pyproject.toml, the one place defaults live."""
    if isinstance(settings, RunConfig):
        return settings
    missing = sorted(set(schema()) - set(settings))
    if missing:
        if not APP_PYPROJECT.is_file():
            raise ConfigError(f"run config has no {missing}, and there is no {APP_PYPROJECT} to take them from")
        settings = {**app_defaults(APP_PYPROJECT), **settings}
    return RunConfig.from_flower(settings)


def app_defaults(pyproject: Path) -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table of an app's pyproject.toml: the defaults and the schema."""
    with open(pyproject, "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def check_overrides(overrides: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The run config these overrides give, checked before any work: an unknown key is named with the
    closest known one, a value of the wrong type is named with the type its default has."""
    for name in overrides:
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown run-config key {name!r}{hint}")
    types = schema()
    merged = {**defaults, **overrides}
    for name, value in overrides.items():
        merged[name] = _coerce(name, value, types.get(name, type(defaults[name])))
    RunConfig.from_flower(merged)
    return merged
