"""The hospital's privacy policy: what this site agrees to, whatever the server asks.

The run config comes from whoever submitted the run (the consortium's server), so nothing in it can loosen the
site's guarantee. The policy is read from the site's own `<data>/site.toml` and from the SuperNode's node config
(what the hospital passed to `equifed-client start`); where both set a key, the stricter value wins. A server
request that conflicts with the policy is refused with `PolicyRefusal`, naming the setting; the run goes on with
the other sites.

Keys (site.toml, or the same names in the node config):

| key                  | default                                   | meaning                                          |
|----------------------|-------------------------------------------|--------------------------------------------------|
| `max-epsilon`        | 10                                        | budget over the site's whole ledger, ever        |
| `delta`              | the power of ten <= 1/(10 n_patients)     | the delta every epsilon is stated at             |
| `require-dp`         | true in deployment, false in simulation   | refuse to train without DP-SGD                   |
| `release`            | every statistic the site's equifed ships  | statistics the site agrees to release            |
| `require-secagg`     | false                                     | send a trained model only inside a secure sum    |
| `secagg-min-sites`   | 2                                         | fewest sites a secure sum may have, every stage  |
| `min-release-noise`  | 1.0                                       | smallest noise multiplier accepted for a release |
| `max-image-pixels`   | the data layer's default                  | images or volume slices over this: not decoded   |
| `max-file-mb`        | the data layer's default                  | files larger than this are rejected unread       |
| `multi-frame`        | "reject"                                  | multi-frame DICOM: "reject" or its "first" frame |
| `max-volume-mb`      | the data layer's default (2048)           | volumes larger than this are rejected unread     |
| `max-slices`         | the data layer's default (4096)           | slices per volume (series files, NIfTI z)        |
| `max-image-size`     | 512                                       | largest input side; squared: values per input  |
| `max-local-epochs`   | 50                                        | most local epochs a round may ask                |
| `max-rounds`         | 1000                                      | most rounds (num-server-rounds) a run may plan   |
| `max-stats-dim`      | 4096                                      | longest axis of a statistic a run may ask for    |
| `device`             | the run config's `device` (default auto)  | auto, cpu, cuda or cuda:N: where the site trains |

The four ceilings bound what a request makes the site allocate and compute (a 20000-pixel image size would
allocate 1.6 GB per image before anything is decoded); they are checked against the run config, before any data
are read, so a refusal says nothing about the data.

The data caps (`max-image-pixels`, `max-file-mb`, `max-volume-mb`, `max-slices`) only tighten the data layer's
defaults, never raise them; where both sources set one, the smaller wins. `max-volume-mb` caps a volume's bytes
(a series folder's files together, a NIfTI's voxels, which also bound an uncompressed .nii file); `max-file-mb`
caps each image file, series slice and .nii.gz.

`multi-frame` is the site's own choice of what its data mean, not a cap: "reject" is stricter, so where both
sources set it, "reject" wins. It defaults to "reject" because a multi-frame object is usually a volume, cine loop
or tomosynthesis stack whose first frame is an arbitrary slice, not the image its label describes; every such file
is then listed, with its frame count, in the site's rejected.csv.

`device` is the hospital's hardware, its own business: the site's setting wins over the run config's, and where
both sources set it the node config wins (it is given to the process on this machine; site.toml may sit on shared
storage). A card the machine lacks is refused (`DeviceRefusal`, with what the machine has) before any data are
read, never a crash mid-round; a malformed name stops the site at start, like any unreadable setting.

The default delta is rounded down to a power of ten so that the epsilon the site reports (a function of delta)
reveals the order of magnitude of its patient count, not the count.
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from core_models.data import MULTI_FRAME, ImageLimits
from core_models.devices import DeviceUnavailable, parse_device, resolve_device
from core_models.label_shift import N_BINS
from core_models.protocol import STAT_FAIR_PSE, STAT_FAIRNESS, STAT_SHIFT, STATISTICS_KINDS

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from core_models.config import RunConfig

SITE_SETTINGS = "site.toml"  # the hospital's own settings; nothing the server sends overrides them
DEFAULT_MAX_EPSILON = 10.0  # a site without its own budget still gets a finite one
DEFAULT_MIN_RELEASE_NOISE = 1.0
STATISTICS = STATISTICS_KINDS  # the names a `release` list may hold
CEILINGS = {"max-image-size": 512, "max-local-epochs": 50, "max-rounds": 1000, "max-stats-dim": 4096}
DEFAULT_SECAGG_MIN_SITES = 2  # the protocol's own minimum; two sites can each subtract theirs from the sum
KEYS = ("max-epsilon", "delta", "require-dp", "release", "min-release-noise", "max-image-pixels", "max-file-mb",
        "max-volume-mb", "max-slices", "multi-frame", "require-secagg", "secagg-min-sites", "device", *CEILINGS)


class PolicyError(ValueError):
    """The site's own settings are unreadable or invalid: the site does not start."""


class PolicyRefusal(RuntimeError):
    """A server request that the site's policy does not allow; the message names the setting."""

    def __init__(self, setting: str, why: str):
        super().__init__(f"refused by the site's privacy policy ({setting}): {why}")
        self.setting = setting


class DeviceRefusal(PolicyRefusal):
    """The device the site's setting (or, without one, the run config) names is not on the site's machine. The
    reason that goes to the server names the run's setting only, never the site's hardware (its cards, its torch
    build) or its own setting's value: `why` stays in the site's log."""

    def __init__(self, setting: str, why: str):
        RuntimeError.__init__(self, f"the site's machine cannot train on {setting}")
        self.setting, self.why = setting, why


def _read_settings(path: Path) -> dict:
    settings = path / SITE_SETTINGS
    if not settings.exists():
        return {}
    try:
        with open(settings, "rb") as fh:
            table = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"{settings} cannot be read: {err}") from err
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise PolicyError(f"{settings}: unknown setting(s) {unknown}; known: {list(KEYS)}")
    return table


def _number(source: str, key: str, value, low: float, high: float = math.inf) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{source}: {key} must be a number, got {value!r}") from None
    if not (low < number < high):
        raise PolicyError(f"{source}: {key} must be in ({low:g}, {high:g}), got {number:g}")
    return number


def _flag(source: str, key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise PolicyError(f"{source}: {key} must be true or false, got {value!r}")


def _count(source: str, key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PolicyError(f"{source}: {key} must be a whole number >= {low}, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise PolicyError(f"{source}: {key} must be a whole number >= {low}, got {value!r}") from None
    if not (number.is_integer() and number >= low):
        raise PolicyError(f"{source}: {key} must be a whole number >= {low}, got {value!r}")
    return int(number)


def _names(source: str, value) -> frozenset[str]:
    names = value if isinstance(value, list) else [v for v in str(value).split(",")]
    names = frozenset(str(v).strip() for v in names if str(v).strip())
    unknown = sorted(names - set(STATISTICS))
    if unknown:
        raise PolicyError(f"{source}: release lists unknown statistic(s) {unknown}; known: {list(STATISTICS)}")
    return names


def _device(source: str, value) -> str:
    try:
        parse_device(value)
    except ValueError as err:
        raise PolicyError(f"{source}: device {err}") from None
    return str(value)


def _multi_frame(source: str, value) -> str:
    choice = str(value).strip().lower()
    if choice not in MULTI_FRAME:
        raise PolicyError(f"{source}: multi-frame must be one of {list(MULTI_FRAME)}, got {value!r}")
    return choice


@dataclass(frozen=True)
class SitePolicy:
    """The stricter of site.toml and the node config; see the module docstring for the keys."""

    max_epsilon: float = DEFAULT_MAX_EPSILON
    delta: float | None = None  # None: derived from the patient count (default_delta)
    require_dp: bool = False
    release: frozenset[str] | None = None  # None: every statistic this equifed ships
    min_release_noise: float = DEFAULT_MIN_RELEASE_NOISE
    max_image_pixels: int | None = None
    max_file_mb: float | None = None
    multi_frame: str | None = None  # None: the data layer's default ("reject")
    max_volume_mb: float | None = None
    max_slices: int | None = None
    require_secagg: bool = False
    secagg_min_sites: int = DEFAULT_SECAGG_MIN_SITES
    ceilings: dict[str, int] = field(default_factory=lambda: dict(CEILINGS))  # CEILINGS' keys, tightened
    device: str | None = None  # None: the run config's

    @classmethod
    def load(cls, site_dir, node_config: dict | None = None) -> "SitePolicy":
        """Read both sources; deployment (a node config with `data-path`) requires DP unless the site says not."""
        node_config = dict(node_config or {})
        sources = [(str(Path(site_dir) / SITE_SETTINGS), _read_settings(Path(site_dir))),
                   ("node config", {k: v for k, v in node_config.items() if k in KEYS})]
        deployment = bool(node_config.get("data-path"))
        eps, deltas, noise, pixels, mbs, dp_flags, frames = [], [], [], [], [], [], []
        volume_mbs, slices = [], []
        secagg_flags, secagg_sites = [], []
        release: frozenset[str] | None = None
        device: str | None = None
        set_ceilings: dict[str, list[int]] = {}
        for source, table in sources:
            for name in CEILINGS:
                if name in table:
                    set_ceilings.setdefault(name, []).append(int(_number(source, name, table[name], 0.0)))
            if "max-epsilon" in table:
                eps.append(_number(source, "max-epsilon", table["max-epsilon"], 0.0))
            if "delta" in table:
                deltas.append(_number(source, "delta", table["delta"], 0.0, 1.0))
            if "require-dp" in table:
                dp_flags.append(_flag(source, "require-dp", table["require-dp"]))
            if "release" in table:
                names = _names(source, table["release"])
                release = names if release is None else release & names
            if "min-release-noise" in table:
                noise.append(_number(source, "min-release-noise", table["min-release-noise"], 0.0))
            if "max-image-pixels" in table:
                pixels.append(int(_number(source, "max-image-pixels", table["max-image-pixels"], 0.0)))
            if "max-file-mb" in table:
                mbs.append(_number(source, "max-file-mb", table["max-file-mb"], 0.0))
            if "max-volume-mb" in table:
                volume_mbs.append(_number(source, "max-volume-mb", table["max-volume-mb"], 0.0))
            if "max-slices" in table:
                slices.append(_count(source, "max-slices", table["max-slices"], 1))
            if "multi-frame" in table:
                frames.append(_multi_frame(source, table["multi-frame"]))
            if "require-secagg" in table:
                secagg_flags.append(_flag(source, "require-secagg", table["require-secagg"]))
            if "device" in table:  # sources in order: the node config's, read last, wins
                device = _device(source, table["device"])
            if "secagg-min-sites" in table:
                secagg_sites.append(_count(source, "secagg-min-sites", table["secagg-min-sites"],
                                           DEFAULT_SECAGG_MIN_SITES))
        # the site's own value stands (raised or lowered); where both its sources set one, the stricter
        ceilings = {name: min(set_ceilings[name]) if name in set_ceilings else default
                    for name, default in CEILINGS.items()}
        # require-dp: any source saying true wins; with no say, deployment requires it
        require = any(dp_flags) if dp_flags else deployment
        return cls(max_epsilon=min(eps) if eps else DEFAULT_MAX_EPSILON, delta=min(deltas) if deltas else None,
                   require_dp=require, release=release,
                   min_release_noise=max(noise) if noise else DEFAULT_MIN_RELEASE_NOISE,
                   max_image_pixels=min(pixels) if pixels else None, max_file_mb=min(mbs) if mbs else None,
                   multi_frame=("reject" if "reject" in frames else "first") if frames else None,
                   max_volume_mb=min(volume_mbs) if volume_mbs else None, max_slices=min(slices) if slices else None,
                   require_secagg=any(secagg_flags),
                   secagg_min_sites=max(secagg_sites) if secagg_sites else DEFAULT_SECAGG_MIN_SITES,
                   ceilings=ceilings, device=device)

    def image_limits(self) -> ImageLimits:
        """The data layer's caps, tightened (never loosened past its defaults) by the site's settings, and its
        multi-frame choice."""
        base = ImageLimits()
        pixels = base.max_pixels if self.max_image_pixels is None else min(base.max_pixels, self.max_image_pixels)
        size = base.max_file_bytes if self.max_file_mb is None else min(base.max_file_bytes,
                                                                         int(self.max_file_mb * 1024**2))
        volume = base.max_volume_bytes if self.max_volume_mb is None else min(base.max_volume_bytes,
                                                                              int(self.max_volume_mb * 1024**2))
        slices = base.max_slices if self.max_slices is None else min(base.max_slices, self.max_slices)
        return ImageLimits(max_pixels=pixels, max_file_bytes=max(size, 1), max_manifest_bytes=base.max_manifest_bytes,
                           multi_frame=self.multi_frame or base.multi_frame, max_slices=slices,
                           max_voxels=base.max_voxels, max_volume_bytes=max(volume, 1))

    def delta_for(self, n_patients: int) -> float:
        """The site's delta: its own setting, capped by the default for its size (never looser than 1/(10 n))."""
        default = default_delta(n_patients)
        return default if self.delta is None else min(self.delta, default)

    def check_training(self, dp: bool) -> None:
        if self.require_dp and not dp:
            raise PolicyRefusal("require-dp = true",
                                "the run trains without differential privacy (dp = false); this site sends "
                                "only DP-SGD updates")

    def check_aggregation(self, secure_sites: int, run_secagg: bool = False) -> None:
        """A train request: into a secure sum when the site requires one or the run says it is secure (a request
        without the sum in a secagg run is the server asking for the plain model), over at least its minimum of
        sites (checked here before training, so no budget is spent on a sum the site would refuse; and again at
        every stage of the sum, client/secagg.py)."""
        if self.require_secagg and not secure_sites:
            raise PolicyRefusal("require-secagg = true",
                                "the run asks for a plain train round (secagg = false); this site sends its trained "
                                "model only inside a secure sum")
        if run_secagg and not secure_sites:
            raise PolicyRefusal("secagg = true", "the run is securely aggregated but this train request asks for "
                                                 "the plain model")
        if secure_sites and secure_sites < self.secagg_min_sites:
            raise PolicyRefusal(f"secagg-min-sites = {self.secagg_min_sites}",
                                f"the secure sum would be over {secure_sites} site(s)")

    def check_request(self, cfg: "RunConfig") -> None:
        """The run's sizes within the site's ceilings (run config only: called before any data are read)."""
        self._within("max-image-size", "image-size", cfg.train.image_size)
        # a colour image holds three planes, a volume image-size slices: their values count against the same bound
        # (max-image-size squared: at the default 512, volumes up to 64^3)
        dims = cfg.train.dims
        values = cfg.train.in_channels * cfg.train.image_size ** dims
        if values > self.ceilings["max-image-size"] ** 2:
            raise PolicyRefusal(f"max-image-size = {self.ceilings['max-image-size']}",
                                f"the run asks for {cfg.train.in_channels} x {cfg.train.image_size}^{dims} values per "
                                f"{'volume' if dims == 3 else 'image'}")
        self._within("max-local-epochs", "local-epochs", cfg.train.local_epochs)
        self._within("max-rounds", "num-server-rounds", cfg.server.num_rounds)
        sections = {STAT_SHIFT: cfg.shift, STAT_FAIRNESS: cfg.audit, STAT_FAIR_PSE: cfg.fair}
        k = cfg.train.num_classes
        self.check_dims(statistic_dims({name: v for name, v in sections.items() if name in cfg.release.kinds}, k))
        if cfg.fair.active:
            self.check_dims(statistic_dims({STAT_FAIR_PSE: cfg.fair}, k))
        self.device_for(cfg)

    def device_for(self, cfg: "RunConfig") -> "torch.device":
        """Where this site trains and scores: its own `device`, else the run config's, on this machine; DeviceRefusal
        for a card the machine lacks."""
        try:
            return resolve_device(self.device or cfg.train.device)
        except DeviceUnavailable as err:
            log.warning("device refused: %s", err)  # the details stay at the site
            setting = ("the device of its own setting" if self.device
                       else f"device = {cfg.train.device!r} (the run config)")
            raise DeviceRefusal(setting, err.why) from None

    def check_dims(self, dims: dict[str, int]) -> None:
        """Each axis of a statistic asked for (statistic_dims) within `max-stats-dim`."""
        for name, value in dims.items():
            self._within("max-stats-dim", name, value)

    def _within(self, setting: str, name: str, value: int) -> None:
        if value > self.ceilings[setting]:
            raise PolicyRefusal(f"{setting} = {self.ceilings[setting]}", f"the run asks for {name} = {value}")

    def check_release(self, kinds: list[str], noise_multiplier: float) -> None:
        """Every statistic asked for must be on the release list, with at least the site's noise."""
        forbidden = [k for k in kinds if self.release is not None and k not in self.release]
        if forbidden:
            raise PolicyRefusal(f"release = {sorted(self.release)}",
                                f"the server asked for {forbidden}, which this site does not release")
        if not noise_multiplier >= self.min_release_noise:
            raise PolicyRefusal(f"min-release-noise = {self.min_release_noise:g}",
                                f"the server asked for releases with noise multiplier {noise_multiplier:g}")


def statistic_dims(sections: dict, num_classes: int) -> dict[str, int]:
    """The sizes the requested statistics would have, by the keys that set each: `sections` maps a statistic's
    name to its settings (ShiftConfig, FairAuditConfig, FairPenaltyConfig); every per-label table grows with
    `num_classes` (the output histogram with its square)."""
    dims = {"num-classes": num_classes}
    if STAT_SHIFT in sections:
        outputs = 1 if num_classes == 2 else num_classes
        dims["stats-rff-dim"] = sections[STAT_SHIFT].rff_dim
        dims["num-classes x stats-rff-dim"] = num_classes * sections[STAT_SHIFT].rff_dim
        dims["num-classes x outputs x log-odds bins"] = num_classes * outputs * N_BINS
    if STAT_FAIRNESS in sections:
        dims["stats-fairness-score-bins"] = sections[STAT_FAIRNESS].score_bins
    if STAT_FAIR_PSE in sections:
        fair = sections[STAT_FAIR_PSE]
        bins = len([e for e in fair.covariate_edges.split(",") if e.strip()]) + 1
        dims["fair-mediator-levels x covariate bins"] = fair.mediator_levels * bins
        dims["fair-per-cell"] = fair.per_cell
    return dims


def default_delta(n_patients: int) -> float:
    """The largest power of ten <= 1/(10 n): delta well below 1/n, and it reveals only n's order of magnitude."""
    n = max(int(n_patients), 1)
    return 10.0 ** math.floor(math.log10(1.0 / (10 * n)))
