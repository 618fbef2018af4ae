"""The names of what a run folder holds (run config out-dir), in one place: the ServerApp writes them, the console,
the CLIs and the reports read them."""

from __future__ import annotations

from pathlib import Path

# the run's tables and summary (server/results.py)
METRICS_CSV = "metrics.csv"  # one row per round: the global model's figures
PER_SITE_CSV = "per_site.csv"  # one row per (round, phase, site): each site's answer
SUMMARY_JSON = "summary.json"
LEARNING_CURVE_PNG = "learning_curve.png"
FLOWER_LOG = "flower.log"  # Flower's own log of the run (the console keeps it)
SAVED_OVERRIDES = "run_overrides.json"  # the run's -c overrides, for a resume
ANALYSIS_ERRORS_LOG = "analysis_errors.log"  # the tracebacks of analyses that failed (training went on)
PRIVACY_REGISTRY_JSON = "privacy_registry.json"  # each dataset's spend as reported (unless registry-path says where)

# models (plain state dicts, each with its model card beside it: core_models/model_card.py)
FINAL_MODEL = "final_model.pt"
BEST_MODEL = "best_model.pt"
CALIBRATED_MODEL = "calibrated_model.pt"
DETECTOR_SUFFIX = "_detector"  # final_model_detector.pt: a detection run's whole LesionDetector
CHECKPOINTS = "checkpoints"  # round_NNN.pt and latest.pt
LATEST_CHECKPOINT = "latest.pt"

# the analysers' reports (server/analysers.py)
SHIFT_CSV = "shift.csv"
SHIFT_PNG = "shift.png"
SHIFT_CONSORTIUM_JSON = "shift_consortium.json"  # what a new site adapts with (client/adapt.py)
CALIBRATION_JSON = "calibration.json"
CALIBRATION_DIR = "calibration"  # calibration/round_NNN.json
FAIRNESS_AUDIT_JSON = "fairness_audit.json"
FAIRNESS_DIR = "fairness"  # fairness/round_NNN.json
HOLDOUT_BOXES_PNG = "holdout_boxes.png"


def round_file(folder: Path, server_round: int, suffix: str) -> Path:
    """`folder`/round_NNN`suffix`: a round's checkpoint or report."""
    return Path(folder) / f"round_{server_round:03d}{suffix}"


def detector_file(model: Path) -> Path:
    """The whole detector's file beside a detection run's classifier file (final_model.pt ->
    final_model_detector.pt)."""
    return Path(model).with_name(Path(model).stem + DETECTOR_SUFFIX + ".pt")
