"""The equifed ServerApp: runs the chosen strategy, evaluates the global model on a
held-out set when one is configured, checkpoints every round, keeps the best global model
(run config best-by, optional patience), and writes the run folder. What happens after each
round is a list of round hooks (server/hooks.py)."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from core_models.config import RunConfig
from core_models.model_factory import ModelSpec
from core_models.pretext import encoder_state
from core_models.pretrained import load_pretrained
from core_models.model_card import write_card
from core_models.protocol import DETECTION_HEAD
from core_models.run_files import BEST_MODEL, FINAL_MODEL, PRIVACY_REGISTRY_JSON, detector_file
from server.checkpoint import load_latest
from server.hooks import (BestModel, CalibrationStep, Checkpointing, FairnessBroadcast, HoldoutEvaluation,
                          RoundEvaluation, RunFailed, RunHistory, SiteOutcomes, StatisticsCollection, StopEarly,
                          refresh_run_page)
from server.privacy_registry import PrivacyRegistry
from server.results import calibration_notes, calibration_summary, plot_learning_curve, regressions, write_summary
from server.strategy import SiteTrackingMixin, build_strategy
from server.tracking import MlflowTracker

__all__ = ["RunFailed", "StopEarly", "app", "main"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    out_dir = Path(cfg.server.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = None
    if cfg.server.tracking_uri:  # a store that cannot be used fails the run here, before any site trains
        tracker = MlflowTracker(cfg.server.tracking_uri, cfg.server.tracking_experiment, run_name=out_dir.name)
        tracker.start(dict(context.run_config))
    try:
        _run(grid, context, cfg, out_dir, tracker)
    except BaseException as err:  # RunFailed, a crash, or the run stopped: said on the page and in MLflow
        refresh_run_page(out_dir, cfg.server.num_rounds, dict(context.run_config),
                         [f"the run did not complete: {type(err).__name__}: {err}"], finished=True)
        if tracker is not None:
            tracker.end("killed" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed")
        raise


def _run(grid: Grid, context: Context, cfg: RunConfig, out_dir: Path, tracker: MlflowTracker | None) -> None:
    """The run itself: rounds, the final models with their cards, the run folder."""
    torch.manual_seed(cfg.train.seed)
    model = initial_model(cfg)
    best = BestModel(out_dir, cfg.server, dp=cfg.dp.enabled)
    checkpoint = _resume(out_dir, cfg, model, best)
    done = int(checkpoint["round"]) if checkpoint else 0
    saved = checkpoint["history"] if checkpoint else {"global": [], "sites": []}
    registry = PrivacyRegistry(cfg.server.registry_path or out_dir / PRIVACY_REGISTRY_JSON)
    strategy = build_strategy(cfg.server, registry, round_offset=done, site_rows=saved["sites"],
                              state=checkpoint["strategy"] if checkpoint else None)
    history = RunHistory(out_dir, strategy, list(saved["global"]), cfg.server.num_rounds, tracker=tracker,
                         run_config=dict(context.run_config))
    history.track_earlier_rounds()  # a resume: its MLflow run gets the rounds done before too
    # a pretext run has no classifier to score yet: its sites' pretext losses are its validation figures
    scored = cfg.server.holdout_path and not cfg.train.pretext
    holdout = HoldoutEvaluation(cfg.train, Path(cfg.server.holdout_path), out_dir) if scored else None
    fair = FairnessBroadcast(grid, strategy, cfg) if cfg.fair.lam > 0 else None
    statistics = StatisticsCollection(grid, strategy, cfg, out_dir) if cfg.release.kinds else None
    calibration = CalibrationStep(grid, strategy, cfg, out_dir, holdout) if cfg.release.calibrate else None
    checkpoints = Checkpointing(history, best, on_final=calibration)  # the calibration: after the last round
    evaluate_round = RoundEvaluation(history, done, before_first=[holdout, fair],
                                     after_each=[holdout, SiteOutcomes(history), fair, statistics, checkpoints])
    stopped = ""
    try:
        result = _runner(strategy, cfg).start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=max(cfg.server.num_rounds - done, 0),
            timeout=cfg.server.round_timeout, evaluate_fn=evaluate_round)
        final = result.arrays.to_torch_state_dict() if result.arrays is not None else model.state_dict()
    except StopEarly as why:
        stopped = str(why)
        log(WARNING, "equifed: stopped early after round %d: %s", history.rows[-1]["round"], stopped)
        final = checkpoints.last_arrays.to_torch_state_dict()
    torch.save(final, out_dir / FINAL_MODEL)
    if cfg.train.pretext:  # the encoder (a plain network state dict, its head untrained): a pretrained-path
        for saved in (out_dir / FINAL_MODEL, out_dir / BEST_MODEL):
            state = torch.load(saved, weights_only=True) if saved.exists() else {}
            if any(k.startswith("network.") for k in state):  # (already converted when a finished run resumed)
                torch.save(_network_of(cfg, state), saved)
    if cfg.train.detection:  # the classifier alone (what scoring and auditing load); the whole detector beside it
        for saved in (out_dir / FINAL_MODEL, out_dir / BEST_MODEL):
            state = torch.load(saved, weights_only=True) if saved.exists() else {}
            if any(k.startswith(DETECTION_HEAD) for k in state):  # (already split when a finished run resumed)
                torch.save(state, detector_file(saved))
                torch.save({k[len(CLASSIFIER):]: v for k, v in state.items() if k.startswith(CLASSIFIER)}, saved)
    for saved in (out_dir / FINAL_MODEL, out_dir / BEST_MODEL):  # what scoring the model later needs
        if saved.exists():
            write_card(saved, cfg.train.model, cfg.train.num_classes, cfg.train.image_size,
                       in_channels=cfg.train.in_channels, dims=cfg.train.dims, volume_window=cfg.train.volume_window,
                       volume_spacing=cfg.train.volume_spacing)
        detector = detector_file(saved)
        if cfg.train.detection and detector.exists():
            write_card(detector, cfg.train.model, cfg.train.num_classes, cfg.train.image_size, detector=True,
                       in_channels=cfg.train.in_channels)
    failures = (list(statistics.failures) if statistics else []) + (list(calibration.failures) if calibration else [])
    _finish(out_dir, cfg, dict(context.run_config), history, best, done, stopped, evaluate_round.started, failures,
            tracker)


CLASSIFIER = "classifier."  # a LesionDetector's state-dict prefix of its classifier


def initial_model(cfg: RunConfig) -> torch.nn.Module:
    """The round-0 global model: fresh weights, or the run config's pretrained checkpoint mapped onto them; in a
    pretext run, with the pretext task's head (PretextModel); with detection, wrapped in its LesionDetector."""
    spec = ModelSpec.of_run(cfg.train)
    network = spec.network()
    if cfg.train.pretrained_path:
        report = load_pretrained(network, cfg.train.pretrained_path, cfg.train.pretrained_key_map)
        log(INFO, "equifed: pretrained %s: %d tensors loaded (%d adapted %s), %d kept fresh: %s",
            cfg.train.pretrained_path, len(report.loaded), len(report.adapted),
            "grey -> RGB" if cfg.train.in_channels == 3 else "RGB -> grey", len(report.skipped),
            ", ".join(f"{k} ({why})" for k, why in list(report.skipped.items())[:5]) or "none")
    return spec.build(network)


def _network_of(cfg: RunConfig, pretext_state: dict) -> dict:
    """The network's own state dict from a PretextModel's."""
    model = ModelSpec.of_run(cfg.train).build()
    model.load_state_dict(pretext_state)
    return encoder_state(model)


def _resume(out_dir: Path, cfg: RunConfig, model: torch.nn.Module, best: BestModel) -> dict | None:
    """run config resume: the latest checkpoint (its model loaded, its best so far taken up); else None."""
    checkpoint = load_latest(out_dir) if cfg.server.resume else None
    if checkpoint is None:
        best.resume(None)
        return None
    model.load_state_dict(checkpoint["model"])
    best.resume(checkpoint["history"].get("best"))
    log(INFO, "equifed: resuming %s after round %d of %d", out_dir, int(checkpoint["round"]), cfg.server.num_rounds)
    return checkpoint


def _runner(strategy: SiteTrackingMixin, cfg: RunConfig):
    """The strategy, wrapped in Flower's central (site-level) DP when run config central-dp asks for it."""
    if not cfg.dp.central:
        return strategy
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=cfg.dp.central_noise,
                                                      clipping_norm=cfg.dp.central_clip,
                                                      num_sampled_clients=cfg.server.min_train_nodes)


def _finish(out_dir: Path, cfg: RunConfig, run_config: dict, history: RunHistory, best: BestModel, done: int,
            stopped: str, started: float, analysis_failures: list[dict], tracker: MlflowTracker | None) -> None:
    """The run's tables, learning curve and summary.json; then the final run page and, with tracking, the models
    and reports sent to MLflow and its run closed."""
    history.write()
    try:
        plot_learning_curve(out_dir, history.rows, history.strategy.sites.rows)
    except Exception as err:  # a figure never fails a finished run
        log(WARNING, "equifed: the learning curve could not be drawn (%s: %s)", type(err).__name__, err)
        analysis_failures.append({"round": cfg.server.num_rounds, "analysis": "learning_curve",
                                  "error": f"{type(err).__name__}: {err}"})
    last = history.rows[-1] if history.rows else {}
    first = history.rows[0] if history.rows else {}
    best_summary = best.summary(history.rows)
    warnings = regressions(history.rows, best_summary.get("best_round"))
    for line in warnings:
        log(WARNING, "equifed: %s", line)
    notes = calibration_notes(history.rows, best_summary.get("best_round"))
    for line in notes:
        log(INFO, "equifed: note: %s", line)
    write_summary(out_dir, {
        "status": "completed",
        "rounds": int(last.get("round", done)),  # fewer than planned_rounds when the run stopped early
        "planned_rounds": cfg.server.num_rounds,
        "strategy": cfg.server.strategy,
        "secure_aggregation": cfg.server.secagg,  # train rounds summed under SecAgg+ masks (server/secagg.py)
        "model": cfg.train.model,
        "initial_holdout_auroc": first.get("holdout_auroc"),
        "final_holdout_auroc": last.get("holdout_auroc"),
        **({"initial_holdout_map50": first.get("holdout_map50"), "final_holdout_map50": last.get("holdout_map50")}
           if cfg.train.detection else {}),
        **best_summary,
        "sites_trained": sum(int(r.get("sites_trained") or 0) for r in history.rows),  # site-rounds, all rounds
        "warnings": warnings,
        "notes": notes,  # e.g. a better-ranking model whose probabilities need calibration
        "calibration": calibration_summary(last),  # None unless run config calibrate fitted one
        "stopped_early": bool(stopped),
        "stopped_at_round": int(last["round"]) if stopped else None,
        "stopped_reason": stopped or None,
        "wall_time_s": round(time.time() - started, 1),
        "analysis_failures": analysis_failures + (list(tracker.failures) if tracker else []),
        "run_config": run_config,
    })
    history.write_page()  # final: no refresh, summary.json's warnings and notes
    if tracker is not None:
        tracker.log_artifacts(out_dir)
        tracker.end("completed")
