"""What the ServerApp does with each new global model, one hook per job.

Flower calls one evaluate function after every round (and once before round 1). `RoundEvaluation` is that
function: it builds the round's row of metrics.csv by running the hooks in order (each adds its columns or
ends the run), then keeps the row, writes the tables and logs the round's table. Each hook owns its state:
the holdout set, the consortium's fairness counts, the analyses that failed, the best model so far.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from core_models.calibration import fold_into_head, probability_metrics
from core_models.config import RunConfig, ServerConfig, TrainingConfig, keys_of
from core_models import wire
from core_models.data import load_site
from core_models.devices import resolve_device
from core_models.model_card import card_path, write_card
from core_models.model_factory import ModelSpec
from core_models.protocol import (NUM_EXAMPLES, PSE_COUNTS, PSE_SUMS, STAT_FAIR_PSE, STAT_FAIRNESS, TRAIN_LOSS,
                                  VAL_AUROC, VAL_LOSS, StatisticsRequest)
from core_models.run_files import BEST_MODEL, CALIBRATED_MODEL, CALIBRATION_JSON, HOLDOUT_BOXES_PNG, detector_file
from core_models.training import evaluate, make_loader, predict_proba
from core_models.secagg import SecAggError
from fairness import mitigation
from fairness.federated import (SECURE_SUM, SECURE_SUM_SITE, SECURE_SUM_SITES, STATS_CLIPPING_RANGE, layout_for,
                                summed_shapes)
from server.analysers import analyse
from server.calibration import KIND as CALIBRATION, read_fit
from server.checkpoint import (BestTracker, choose_best_metric, pooled, restore_best_model,
                               save_checkpoint, save_model)
from server.results import round_table, write_tables
from server.run_page import PAGE, write_run_page
from server.site_rows import BUDGET_EXHAUSTED, OK, STATISTICS, TRAIN
from server.site_statistics import SiteRelease, request_config, to_releases
from server.strategy import SiteTrackingMixin
from server.tracking import MlflowTracker


class RunFailed(RuntimeError):
    """A round in which no site could train: the run cannot make progress."""


class StopEarly(Exception):
    """Raised from the round's evaluation when patience runs out: Flower's strategy loop has no other exit, and
    nothing of the round is left undone by then (its checkpoint and tables are written)."""


@dataclass
class Round:
    """One call of the evaluate function: Flower's round number, the run's (counting the rounds done before a
    resume), the new global model and the round's row of metrics.csv, which the hooks fill."""

    flower_round: int
    number: int
    arrays: ArrayRecord
    row: dict


Hook = Callable[[Round], None]


class RunHistory:
    """metrics.csv's rows so far and the strategy's per-site rows (per_site.csv), written after every round; then
    the run page (index.html) rebuilt from them and the round sent to the experiment tracker, when there is one.
    A page or tracker that fails is logged: neither ends a training run."""

    def __init__(self, out_dir: Path, strategy: SiteTrackingMixin, rows: list[dict], total_rounds: int,
                 tracker: MlflowTracker | None = None, run_config: dict | None = None):
        self.out_dir, self.strategy, self.rows, self.total_rounds = out_dir, strategy, rows, total_rounds
        self.tracker, self.run_config = tracker, run_config

    def write(self) -> None:
        write_tables(self.out_dir, self.rows, self.strategy.sites.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()
        log(INFO, "equifed round %d/%d\n%s", row["round"], self.total_rounds,
            round_table(row["round"], self.strategy.sites.rows, row))
        if self.tracker is not None:
            self.tracker.log_round(row["round"], row, self.strategy.sites.to_rows())
        self.write_page()

    def track_earlier_rounds(self) -> None:
        """A resumed run's rounds done before, sent to its tracker: its MLflow run holds the whole history."""
        if self.tracker is not None and self.rows:
            sites = self.strategy.sites.to_rows()
            for row in self.rows:
                self.tracker.log_round(row["round"], row, sites)

    def write_page(self) -> None:
        refresh_run_page(self.out_dir, self.total_rounds, self.run_config)


def refresh_run_page(out_dir: Path, planned_rounds: int, run_config: dict | None, warnings: list[str] = (),
                     finished: bool = False) -> None:
    """index.html rebuilt from the run folder (server/run_page.py); a page that cannot be written is logged."""
    try:
        write_run_page(out_dir, planned_rounds=planned_rounds, run_config=run_config, warnings=warnings,
                       finished=finished)
    except Exception as err:  # noqa: BLE001 - the page never ends a training run, whatever the files held
        log(WARNING, "equifed: the run page %s could not be written (%s: %s)", out_dir / PAGE, type(err).__name__,
            err)


class HoldoutEvaluation:
    """The global model's metrics on the server's labelled held-out set (run config holdout-path); with detection
    and a boxes.csv there, its mAP@0.5 too, and the boxes it predicts on a few holdout images drawn in
    ``holdout_boxes.png`` in ``out_dir`` (every round; a failing plot is logged, never fatal)."""

    def __init__(self, train: TrainingConfig, path: Path, out_dir: Path | None = None):
        self.device = resolve_device(train.device)  # the run's device on this machine, before round 1 (or an error)
        data = load_site(path, **train.load_options())
        self.images, self.labels = data.images, data.labels
        self.loader = make_loader(data.images, data.labels, batch_size=256)
        self.model = ModelSpec.of_run(train).scoring().build()
        self.boxes = None
        if train.detection:
            from core_models.data.boxes import image_boxes
            self.boxes = image_boxes(path, data.frame, train.image_size)
        self.out_dir = out_dir

    def __call__(self, rnd: Round) -> None:
        self.model.load_state_dict(rnd.arrays.to_torch_state_dict())
        rnd.row.update({f"holdout_{k}": v for k, v in self.metrics(self.model).items()})
        if self.boxes is not None:
            rnd.row["holdout_map50"] = self._map50()

    def metrics(self, model) -> dict[str, float]:
        """Loss, accuracy and AUROC (core_models.training.evaluate), and the probabilities' ECE (15 equal-width
        bins of the top-class probability) and Brier score (core_models.calibration)."""
        return {**evaluate(model, self.loader, self.device),
                **probability_metrics(predict_proba(model, self.loader, self.device), self.labels)}

    def _map50(self) -> float:
        from core_models.detection import draw_detections, score_annotated
        per_image, annotated = self.boxes
        ap, keep, found = score_annotated(self.model, self.images, per_image, annotated, device=self.device)
        truth = [per_image[i] for i in keep]
        if self.out_dir is not None and len(keep):
            try:
                shown = [i for i, t in enumerate(truth) if len(t)][:6] + [i for i, t in enumerate(truth)
                                                                          if not len(t)][:2]
                draw_detections(self.images[keep][shown], [truth[i] for i in shown], [found[i] for i in shown],
                                Path(self.out_dir) / HOLDOUT_BOXES_PNG)
            except Exception as err:  # noqa: BLE001  a plot never ends a training run
                log(WARNING, "equifed: holdout_boxes.png not drawn: %s: %s", type(err).__name__, err)
        return ap


class SiteOutcomes:
    """Who trained this round, their pooled training loss and validation metrics; the run fails when no site
    returned a model and none ran out of budget."""

    def __init__(self, history: RunHistory):
        self.history = history

    def __call__(self, rnd: Round) -> None:
        sites = self.history.strategy.sites
        train_ok = [r.metrics for r in sites.of(rnd.number, TRAIN, OK)]
        if not train_ok and not sites.of(rnd.number, status=BUDGET_EXHAUSTED):
            self.history.write()  # the sites' reasons reach per_site.csv
            raise RunFailed(f"round {rnd.number}: no site returned a model; see per_site.csv")
        row = rnd.row
        row["sites_trained"] = len(train_ok)
        losses = [(m[TRAIN_LOSS], m[NUM_EXAMPLES]) for m in train_ok if math.isfinite(m[TRAIN_LOSS])]
        if losses:  # sites under DP withhold their training loss (NaN)
            row["train_loss"] = float(np.average([v for v, _ in losses], weights=[max(w, 1.0) for _, w in losses]))
        for key in (VAL_LOSS, VAL_AUROC):  # of the sites' models after this round's local training
            value = pooled(train_ok, key)
            if math.isfinite(value):
                row[key.replace("-", "_")] = value


class FairnessBroadcast:
    """fair-lambda > 0: the consortium PSE of the new global model from the sites' noised cell counts (released
    once, summed over sites) and score sums, broadcast with the density-ratio table in the next rounds' train
    config."""

    def __init__(self, grid: Grid, strategy: SiteTrackingMixin, cfg: RunConfig):
        self.grid, self.strategy, self.cfg = grid, strategy, cfg
        self.counts: list[np.ndarray] = []  # the consortium's (A, stratum) counts

    def __call__(self, rnd: Round) -> None:
        rnd.row.update(self.collect(rnd))

    def collect(self, rnd: Round) -> dict:
        fair, current = self.cfg.fair, rnd.number
        request = StatisticsRequest((STAT_FAIR_PSE,), current, self.cfg.train.seed, fair_counts=not self.counts,
                                    settings=keys_of(fair))
        replies = self.strategy.query(self.grid, rnd.arrays, request, STAT_FAIR_PSE,
                                      timeout=self.cfg.server.round_timeout)
        releases = to_releases(replies, [STAT_FAIR_PSE])
        got = [r.records[STAT_FAIR_PSE] for r in releases if STAT_FAIR_PSE in r.records]
        missing = [f"{r.site} ({r.status})" for r in releases if STAT_FAIR_PSE not in r.records]
        if missing:  # e.g. a site's budget is exhausted: its share of the penalty is missing from now on
            log(WARNING, "equifed fairness penalty: round %d: no release from %s; see per_site.csv", current,
                ", ".join(missing))
        if not self.counts:
            got = [g for g in got if PSE_COUNTS in g]
            if not got:
                return {}
            self.counts.append(np.sum([np.asarray(g[PSE_COUNTS]) for g in got], axis=0))
        if not got:
            return {}
        try:
            consortium = mitigation.consortium_strata(
                self.counts, [np.sum([np.asarray(g[PSE_SUMS]) for g in got], axis=0)],
                mitigation.parse_edges(fair.covariate_edges), fair.mediator_levels, max_weight=fair.max_weight,
                pool_groups=fair.pool_groups, factorise_label=fair.factorise_label)
        except ValueError as err:  # e.g. the noised counts of one group are all suppressed: train unpenalised
            log(WARNING, "equifed fairness penalty: round %d: no broadcast (%s); raise the sites' pool "
                "(fair-pool-split) or lower release-noise", current, err)
            return {}
        self.strategy.broadcast(consortium.to_config())
        return {"fair_pse": consortium.pse, "fair_sites": len(got)}


class StatisticsCollection:
    """Run config statistics: every site still in the run releases them after each round, and their analysers
    write the reports. A failed analysis is recorded (the round's row, summary.json) and training goes on."""

    def __init__(self, grid: Grid, strategy: SiteTrackingMixin, cfg: RunConfig, out_dir: Path):
        self.grid, self.strategy, self.cfg, self.out_dir = grid, strategy, cfg, out_dir
        self.failures: list[dict] = []

    def __call__(self, rnd: Round) -> None:
        kinds = self.kinds(rnd.number)
        if not kinds:
            return
        secure = self.cfg.server.secagg_statistics and STAT_FAIRNESS in kinds
        request = replace(request_config(self.cfg, rnd.number), kinds=tuple(kinds))
        replies = self.strategy.query(self.grid, rnd.arrays, request, STATISTICS,
                                      timeout=self.cfg.server.round_timeout, secure=secure)
        releases = to_releases(replies, kinds)
        if secure:
            releases.extend(self.secure_fairness(rnd.number, replies))
        failed = analyse(self.out_dir, rnd.number, releases, self.cfg, kinds)
        if failed:
            self.failures.extend({"round": rnd.number, "analysis": k, "error": v} for k, v in failed.items())
            rnd.row["analysis_failed"] = "; ".join(f"{k}: {v}" for k, v in failed.items())

    def kinds(self, server_round: int) -> list[str]:
        """The statistics asked for after `server_round`: with stats-fairness-once the fairness cells only after
        the planned last round (a run that patience stops earlier has no audit), so they are released once."""
        kinds = list(self.cfg.release.kinds)
        if self.cfg.audit.once and server_round < self.cfg.server.num_rounds:
            kinds = [k for k in kinds if k != STAT_FAIRNESS]
        return kinds

    def secure_fairness(self, server_round: int, replies: list) -> list[SiteRelease]:
        """Run config secagg-statistics: the secure sum of the fairness cells the sites keep, as one release
        (site SECURE_SUM_SITE) whose noise std is that of the summed shares; none when the sum fails."""
        sites = {}
        for msg in replies:
            reply = None if msg.has_error() else wire.reply_of(msg)
            if reply is not None and SECURE_SUM in reply.statistics.get(STAT_FAIRNESS, {}):
                sites[msg.metadata.src_node_id] = (reply.site, dict(reply.statistics[STAT_FAIRNESS]))
        left: dict[int, str] = {}
        try:
            total = self.strategy.sum_statistics(self.grid, list(sites), summed_shapes(layout_for(self.cfg.audit)),
                                                 server_round, STATS_CLIPPING_RANGE, left)
        except SecAggError as err:
            log(WARNING, "equifed round %d: no secure sum of the fairness statistics (%s)", server_round, err)
            return []
        summed = total.result.weighted_sum
        members = [sites[n] for n in total.sites]
        record = {k: np.asarray(v, dtype=np.float64).ravel().tolist() for k, v in summed.items()}
        record.update({k: math.sqrt(sum(float(r.get(k, 0.0)) ** 2 for _, r in members))
                       for k in {k for _, r in members for k in r if k.startswith("sigma_")}})
        record.update({SECURE_SUM: len(members), SECURE_SUM_SITES: [name for name, _ in members]})
        log(INFO, "equifed round %d: fairness statistics securely summed over %d site(s)%s", server_round,
            len(members), f"; left: {left}" if left else "")
        return [SiteRelease(site=SECURE_SUM_SITE, status=OK, records={STAT_FAIRNESS: record})]


class CalibrationStep:
    """Run config calibrate: after the run's last round (the planned last, or the one patience stopped at) every
    site still in the run releases the calibration histograms of the final global model on its validation split
    (noised and charged like any statistic, if its policy releases "calibration"); the analyser fits the
    temperature (binary: Platt scale and bias) into calibration.json, and this hook folds the fit into the model's
    head: calibrated_model.pt (a plain state dict, with its card) and the calibrated model's holdout metrics
    (holdout_calibrated_*) in the round's row. With "calibration" among run config statistics the round's own
    release is used, not asked for again."""

    def __init__(self, grid: Grid, strategy: SiteTrackingMixin, cfg: RunConfig, out_dir: Path,
                 holdout: HoldoutEvaluation | None):
        self.grid, self.strategy, self.cfg, self.out_dir, self.holdout = grid, strategy, cfg, out_dir, holdout
        self.failures: list[dict] = []

    def __call__(self, rnd: Round) -> None:
        fit = read_fit(self.out_dir, rnd.number) if CALIBRATION in self.cfg.release.kinds else None
        if fit is None:
            request = StatisticsRequest((CALIBRATION,), rnd.number, self.cfg.train.seed)
            replies = self.strategy.query(self.grid, rnd.arrays, request, CALIBRATION,
                                          timeout=self.cfg.server.round_timeout)
            failed = analyse(self.out_dir, rnd.number, to_releases(replies, [CALIBRATION]), self.cfg, [CALIBRATION])
            self._failed(rnd, failed)
            fit = read_fit(self.out_dir, rnd.number)
        path = self.out_dir / CALIBRATED_MODEL
        path.unlink(missing_ok=True)  # an earlier run's calibrated model here would be taken for this one's
        card_path(path).unlink(missing_ok=True)
        if fit is None:
            log(WARNING, "equifed: no calibration after round %d; see %s", rnd.number,
                self.out_dir / CALIBRATION_JSON)
            return
        try:
            self._apply(rnd, fit, path)
        except Exception as err:  # noqa: BLE001  the calibrated model never ends a finished training run
            path.unlink(missing_ok=True)
            card_path(path).unlink(missing_ok=True)
            for key in [k for k in rnd.row if k.startswith(("calibration_", "holdout_calibrated_"))]:
                del rnd.row[key]
            self._failed(rnd, {CALIBRATION: f"{type(err).__name__}: {err}"})
            log(WARNING, "equifed: the calibration fitted after round %d could not be applied (%s: %s)", rnd.number,
                type(err).__name__, err)

    def _failed(self, rnd: Round, failed: dict[str, str]) -> None:
        """Failures recorded as the statistics' are: the round's row and summary.json."""
        if not failed:
            return
        self.failures.extend({"round": rnd.number, "analysis": k, "error": v} for k, v in failed.items())
        before = [rnd.row["analysis_failed"]] if rnd.row.get("analysis_failed") else []
        rnd.row["analysis_failed"] = "; ".join(before + [f"{k}: {v}" for k, v in failed.items()])

    def _apply(self, rnd: Round, fit, path: Path) -> None:
        train = self.cfg.train
        model = ModelSpec.of_run(train).scoring().build()
        model.load_state_dict(rnd.arrays.to_torch_state_dict())
        fold_into_head(model, fit)
        save_model(path, getattr(model, "classifier", model).state_dict())  # the classifier, as final_model.pt
        card = write_card(path, train.model, train.num_classes, train.image_size, in_channels=train.in_channels,
                          dims=train.dims, volume_window=train.volume_window, volume_spacing=train.volume_spacing)
        card.write_text(json.dumps({**json.loads(card.read_text()),
                                    "calibration": {"round": rnd.number, **fit.to_json()}}, indent=1) + "\n")
        rnd.row.update({"calibration_temperature": fit.temperature, "calibration_bias": fit.bias})
        if self.holdout is not None:
            rnd.row.update({f"holdout_calibrated_{k}": v for k, v in self.holdout.metrics(model).items()})
        log(INFO, "equifed: calibration after round %d: %s", rnd.number, describe(fit, rnd.row))


def describe(fit, row: dict) -> str:
    """One line on a fit and what it did to the holdout figures."""
    what = (f"Platt scale {fit.scale:.3f} (temperature {fit.temperature:.3f}), bias {fit.bias:+.3f}"
            if fit.kind == "platt" else f"temperature {fit.temperature:.3f}")
    changes = [f"{k} {row[f'holdout_{k}']:.3f} -> {row[f'holdout_calibrated_{k}']:.3f}" for k in ("loss", "ece")
               if math.isfinite(float(row.get(f"holdout_{k}", math.nan)))
               and math.isfinite(float(row.get(f"holdout_calibrated_{k}", math.nan)))]
    return what + (f"; holdout {', '.join(changes)}" if changes else "") + f"; {CALIBRATED_MODEL}"


class BestModel:
    """best_model.pt: the global model of the best round by run config best-by (and patience), kept across a
    resume through the checkpoint's history."""

    def __init__(self, out_dir: Path, server: ServerConfig, dp: bool):
        self.out_dir, self.best_by = out_dir, server.best_by
        metric, self.note = choose_best_metric(server.best_by, dp, bool(server.holdout_path))
        self.tracker = BestTracker(metric, patience=server.patience)
        if self.note:
            log(WARNING, "equifed: %s", self.note)

    def resume(self, saved: dict | None) -> None:
        """Take up the best so far from a checkpoint's history (None: a fresh run)."""
        if saved is None:
            self._forget()  # an earlier run's, in the same folder
        elif saved.get("metric") == self.tracker.metric:
            self.tracker = BestTracker.from_json(saved, patience=self.tracker.patience)
            if self.tracker.best_round is not None:
                restore_best_model(self.out_dir, self.tracker.best_round)
        else:  # the best by another metric says nothing about this one
            log(WARNING, "equifed: the run kept its best model by %s, this resume by %s: the best so far starts "
                "afresh", saved.get("metric"), self.tracker.metric)
            self._forget()

    def _forget(self) -> None:
        """No best model so far: an earlier one here, and its card, would be taken for this run's."""
        (self.out_dir / BEST_MODEL).unlink(missing_ok=True)
        card_path(self.out_dir / BEST_MODEL).unlink(missing_ok=True)
        detector_file(self.out_dir / BEST_MODEL).unlink(missing_ok=True)

    def update(self, rnd: Round, state: dict, total_rounds: int) -> None:
        """Keep the round's model when it is the best; say so in its row, and whether patience ran out."""
        best, row = self.tracker, rnd.row
        if best.update(rnd.number, row.get(best.column)):
            save_model(self.out_dir / BEST_MODEL, state)  # before the checkpoint; a resume rewrites it from round_NNN
        if best.best_round is not None:
            row.update({"best_metric": best.metric, "best_round": best.best_round, "best_value": best.best_value})
        if best.should_stop and rnd.number < total_rounds:
            row["stopped"] = (f"no improvement in {best.metric} for {best.stale} round(s) (patience "
                              f"{best.patience}); best: round {best.best_round}")

    def summary(self, rows: list[dict]) -> dict:
        """summary.json's best_* entries."""
        best = self.tracker
        note = self.note
        if best.metric != "none" and best.best_round is None:
            note = f"no round had a {best.metric} value, so no best model is kept"
        best_row = next((r for r in rows if r["round"] == best.best_round), {})
        return {
            "best_by": self.best_by,
            "best_metric": None if best.best_round is None else best.metric,
            "best_round": best.best_round,
            "best_value": best.best_value,
            "best_model": BEST_MODEL if best.best_round is not None else None,
            "best_holdout_auroc": best_row.get("holdout_auroc"),
            "best_note": note or None,
            "patience": best.patience,
        }


class Checkpointing:
    """After each round: the best model, the round's checkpoint (model, optimiser state, history), then (on the
    run's last round: the planned last, or the one patience stopped at) the `on_final` hook, e.g. the calibration,
    and the checkpoint again with what it added."""

    def __init__(self, history: RunHistory, best: BestModel, on_final: Hook | None = None):
        self.history, self.best, self.on_final = history, best, on_final
        self.last_arrays: ArrayRecord | None = None  # the latest global model (final_model.pt when the run stops early)

    def __call__(self, rnd: Round) -> None:
        state = rnd.arrays.to_torch_state_dict()
        self.last_arrays = rnd.arrays
        self.best.update(rnd, state, self.history.total_rounds)
        self._save(rnd, state)  # first: a crash in the final step must not make a resume train (and charge) again
        if self.on_final is not None and (rnd.number >= self.history.total_rounds or rnd.row.get("stopped")):
            self.on_final(rnd)
            self._save(rnd, state)  # with what the final step added to the round's row

    def _save(self, rnd: Round, state: dict) -> None:
        strategy = self.history.strategy
        save_checkpoint(self.history.out_dir, rnd.number, state, strategy.state(),
                        {"global": self.history.rows + [rnd.row], "sites": strategy.sites.to_rows(),
                         "best": self.best.tracker.to_json()})


class RoundEvaluation:
    """Flower's evaluate function: `before_first` hooks on the initial model (round 0), `after_each` hooks after
    every round; then the row joins metrics.csv and the round's table is logged. After a resume, round 0 is the
    last round done: its hooks run (the penalty's broadcast) but nothing is recorded twice."""

    def __init__(self, history: RunHistory, rounds_done: int, before_first: list[Hook | None],
                 after_each: list[Hook | None]):
        self.history, self.rounds_done = history, rounds_done
        self.before_first = [h for h in before_first if h is not None]
        self.after_each = [h for h in after_each if h is not None]
        self.started = time.time()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        rnd = Round(server_round, server_round + self.rounds_done, arrays,
                    {"round": server_round + self.rounds_done, "elapsed_s": round(time.time() - self.started, 2)})
        for hook in self.after_each if server_round > 0 else self.before_first:
            hook(rnd)
        row = rnd.row
        if server_round == 0 and self.rounds_done > 0:
            return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float))})
        self.history.add(row)
        if row.get("stopped"):
            raise StopEarly(row["stopped"])
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float))
                             and not (isinstance(v, float) and math.isnan(v))})
