"""One handler's view of the site, built once per request: the run config, the site's folder and policy and the
request's own values, every one checked before any data are read; then, on first use, the site's data and its
privacy ledger, and the noised counts a reply may carry.

Whether a request is refused (ConfigError, ValueError, PolicyRefusal) thus depends on the request and the site's
settings only, never on a patient: the data are opened by the first handler step that needs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType

from client import secagg
from client.dp import os_entropy_generator
from client.ledger import BudgetExhausted, PrivacyLedger, dataset_fingerprint, dataset_tag
from client.ledger.accounting import epsilon_of
from client.policy import PolicyRefusal, SitePolicy
from client.site import LocalSite, open_site, resolve_site_path
from core_models import wire
from core_models.config import RunConfig
from core_models.data import manifest_patients
from core_models.model_factory import ModelSpec
from core_models.protocol import (ARRAYS, BUDGET_EXHAUSTED, NUM_EXAMPLES, POLICY_REFUSED, RoundInstructions,
                                  SiteReply)
from core_models.secagg import SecAggError
from fairness import mitigation

# noise multiplier of the counts a site noises once (patients: FedAvg weights, DP-SGD's q): +-20 patients moves
# q a little at hospital sizes, and at delta 1e-5 each such release costs epsilon ~0.18 (~0.8 at 5)
COUNT_NOISE = 20.0


class SiteSession:
    """The request and the site, for one handler."""

    def __init__(self, msg: Message, context: Context):
        self.msg, self.context = msg, context
        self.cfg = RunConfig.from_flower(context.run_config)  # every section's ranges (core_models.config)
        node = dict(context.node_config)
        self.path: Path = resolve_site_path(node, {"data-root": self.cfg.server.data_root})
        self.policy = SitePolicy.load(self.path, node)
        self.round = RoundInstructions.from_config(wire.records_of(msg).config())
        if msg.metadata.message_type == MessageType.TRAIN and self.cfg.fair.lam > 0 and self.round.has_strata:
            self.consortium()  # the broadcast strata, checked (finite, in range, the layout's length) before any data
        self._name = str(node.get("site") or self.path.name)  # the site's name in a refusal made before the data
        self._site: LocalSite | None = None
        self._ledger: PrivacyLedger | None = None
        self._device: torch.device | None = None

    @property
    def site(self) -> LocalSite:
        return self.open_data()

    def open_data(self) -> LocalSite:
        """The site's data, read once, when a handler first needs them (after every check of the request). A
        fairness column the run names but the manifest lacks is not an error (whether the site holds a column would
        then leave the site): its rows count as excluded (fairness.mitigation.meta_array, a warning in the log)."""
        if self._site is None:
            torch.set_num_threads(1)  # several simulated sites share the CPU
            train, name = self.cfg.train, self.context.node_config.get("site")
            self._site = open_site(self.path, image_size=train.image_size, seed=train.seed,
                                   num_classes=train.num_classes, name=str(name) if name else None,
                                   node_config=dict(self.context.node_config), channels=train.in_channels,
                                   volume=train.volume_settings())
        return self._site

    @property
    def name(self) -> str:
        return self._site.name if self._site is not None else self._name

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's ledger at the site's own delta and budget (never the server's). The delta is sized from every
        patient the manifest names, labelled or not, usable or not, so that no run setting (the number of classes,
        the image size) moves it; the ledger keeps the first one and only ever tightens it."""
        if self._ledger is None:
            path, policy = self.site.path, self.policy
            n_patients = manifest_patients(path / "manifest.csv", policy.image_limits())
            self._ledger = PrivacyLedger.open(path, delta=policy.delta_for(n_patients), max_epsilon=policy.max_epsilon,
                                              fingerprint=dataset_fingerprint(path))
        return self._ledger

    @property
    def device(self) -> torch.device:
        """Where this site trains and scores: its own `device` setting, else the run config's (SitePolicy.device_for;
        the handlers' policy.check_request refuses a card this machine lacks before any data are read)."""
        if self._device is None:
            self._device = self.policy.device_for(self.cfg)
        return self._device

    @property
    def under_dp(self) -> bool:
        """Replies are noised-or-withheld when the run trains with DP or the site requires DP."""
        return self.cfg.dp.enabled or self.policy.require_dp

    @property
    def run_id(self) -> str:
        return str(self.context.run_id)

    def consortium(self) -> mitigation.ConsortiumStrata:
        """The fairness penalty's broadcast, checked against the run config's layout (ValueError naming the key)."""
        fair = self.cfg.fair
        return mitigation.ConsortiumStrata.from_config(self.round.broadcast, fair.mediator_levels,
                                                       mitigation.parse_edges(fair.covariate_edges))

    def global_model(self) -> torch.nn.Module | None:
        """The global model the message carries, built as the run config says (None when it carries none)."""
        if ARRAYS not in self.msg.content.array_records:
            return None
        model = ModelSpec.of_run(self.cfg.train).build()
        model.load_state_dict(self.msg.content[ARRAYS].to_torch_state_dict())
        return model

    def draws(self) -> torch.Generator:
        """The generator of a round's random corruptions: seeded without DP (a run repeats), from OS entropy under
        DP like every draw of the mechanism."""
        if self.cfg.dp.enabled:
            return os_entropy_generator("cpu")
        return torch.Generator().manual_seed(self.cfg.train.seed + self.round.server_round)

    # --- what a reply may carry ----------------------------------------------------------------------------------

    def noised_count(self, part: str, n: int) -> float:
        """`n` patients of `part`, noised once per (dataset, split seed), charged, and reused (at least 2): FedAvg's
        weight and DP-SGD's sample rate come from it, so neither reveals the exact count."""
        ledger, seed = self.ledger, self.cfg.train.seed
        noised = ledger.noised_once(f"{ledger.fingerprint}:seed{seed}:{part}-patients", [float(n)], 1.0,
                                    self.count_noise, label=f"{part}-patient-count")
        return max(2.0, float(np.round(noised[0])))

    def noised_patients(self, part: str) -> float:
        """The split's patient count, noised once (`noised_count`)."""
        site = self.site
        return self.noised_count(part, int(site.data.frame.loc[(site.split == part).to_numpy(), "patient_id"]
                                           .astype(str).nunique()))

    @property
    def count_noise(self) -> float:
        return max(COUNT_NOISE, self.policy.min_release_noise)

    def one_off_releases(self) -> list[tuple[float, float, int]]:
        """The noised-once releases a DP run makes besides its training steps, as (sigma, q, steps): the training
        (or pretext) patient count, the test-patient count when the run evaluates, the offset's counts when
        fair-offset is on, the calibration histograms when the run calibrates. The plan's target-epsilon covers them too (one charged in an earlier run is reserved
        again: spend <= target). Raises PolicyRefusal, before anything is released, when they alone would use the
        target up."""
        cfg, delta = self.cfg, self.ledger.delta
        releases = [(self.count_noise, 1.0, 1)] * (1 + (cfg.server.fraction_evaluate > 0) + bool(cfg.fair.offset))
        if cfg.release.calibrate:  # noised at the run's release-noise at least (a site's higher minimum spends less)
            releases.append((cfg.release.noise, 1.0, 1))
        spent = epsilon_of(releases, delta)
        if spent >= cfg.dp.target_epsilon:
            raise PolicyRefusal("target-epsilon", f"{cfg.dp.target_epsilon:g} is used up by this site's noised counts "
                                                  f"alone (epsilon {spent:.3f} at its delta {delta:g}): ask for more")
        return releases

    def dataset_tag(self) -> str:
        """Which dataset a reply's spend belongs to, as a keyed tag: the fingerprint itself stays at the site."""
        return dataset_tag(self.site.path, self.ledger.fingerprint)

    def reply(self, report: SiteReply, model: torch.nn.Module | None = None) -> Message:
        return wire.reply(self.msg, report, None if model is None else ArrayRecord(model.state_dict()))

    def keep_for_sum(self, report: SiteReply, model: torch.nn.Module) -> Message:
        """A secure round's reply: the figures only. The trained model (in the order of the model received, the
        order the server reads the sum in) and its weight wait in the site's Context for the secure sum."""
        trained = ArrayRecord(model.state_dict())
        secagg.keep_update(self.context.state, self.round.server_round,
                           ArrayRecord({k: trained[k] for k in self.msg.content[ARRAYS].keys()}),
                           float(report.metrics[NUM_EXAMPLES]))
        return wire.reply(self.msg, report)

    def refusal(self, err: PolicyRefusal | BudgetExhausted | SecAggError) -> Message:
        """An Error reply the server records under the site's name; the run goes on with the others."""
        if isinstance(err, BudgetExhausted):
            return wire.error_reply(self.msg, BUDGET_EXHAUSTED, self.name, f"budget exhausted: {err}")
        return wire.error_reply(self.msg, POLICY_REFUSED, self.name, f"refused: {err}")

