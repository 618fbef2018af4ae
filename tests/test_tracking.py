"""MLflow tracking (server/tracking.py): a run logged into a file store in tmp_path and read back with MLflow's own
client; the names MLflow accepts; the error when MLflow is not installed."""

import math
import sys

import pytest

from server.tracking import MlflowTracker, TrackingUnavailable, metric_key, name_part

ODD = "St. Mary's/ICU"  # a hospital's name with characters MLflow refuses in a metric name


def test_a_clear_error_when_mlflow_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(TrackingUnavailable, match=r"equifed\[tracking\]"):
        MlflowTracker("/nowhere")


def _rows(rnd: int) -> list[dict]:
    return [
        {"round": rnd, "phase": "train", "site": "st_aurelia", "status": "ok", "node": "7", "train-loss": 0.7 / rnd,
         "num-examples": 300.0, "epsilon": 2.0 * rnd, "val-auroc": math.nan, "withheld": "val-auroc"},
        {"round": rnd, "phase": "evaluate", "site": "st_aurelia", "status": "ok", "num-examples": 90.0,
         "eval-auroc": 0.6 + 0.1 * rnd},
        {"round": rnd, "phase": "statistics", "site": "st_aurelia", "status": "ok", "epsilon": 2.0 * rnd + 0.5},
        {"round": rnd, "phase": "train", "site": ODD, "status": "ok" if rnd == 1 else "budget exhausted",
         "train-loss": 0.9, "epsilon": math.inf},  # trained without DP: no epsilon to log
    ]


def test_a_run_read_back_with_mlflows_client(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is not installed (pip install 'equifed[tracking]')")
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import _validate_metric_name

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset by this test")  # restored (absent) after it: the
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # tracker's own opt-in for a folder is what is tested
    out = tmp_path / "run"
    (out / "data" / "site_a").mkdir(parents=True)
    (out / "data" / "site_a" / "manifest.csv").write_text("patient_id\n1\n")  # patient data: never sent
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest.pt").write_bytes(b"x")
    (out / "final_model.pt").write_bytes(b"weights")
    (out / "final_model.json").write_text('{"model": "cnn"}')
    (out / "summary.json").write_text('{"status": "completed"}')

    tracker = MlflowTracker(tmp_path / "mlruns", experiment="consortium", run_name="demo")
    run_id = tracker.start({"strategy": "fedavg", "learning-rate": 0.002, "dp": True})
    for rnd in (1, 2):
        tracker.log_round(rnd, {"round": rnd, "holdout_auroc": 0.5 + 0.2 * rnd, "best_metric": "val-loss",
                                "val_loss": math.nan}, _rows(1) + _rows(2))
    sent = tracker.log_artifacts(out)
    tracker.end("completed")
    assert tracker.failures == []

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert client.get_experiment(run.info.experiment_id).name == "consortium"
    assert run.data.params == {"strategy": "fedavg", "learning-rate": "0.002", "dp": "True"}

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]

    assert history("holdout_auroc") == [(1, 0.7), (2, 0.9)]
    assert history("site/st_aurelia/eval-auroc") == [(1, 0.7), (2, 0.8)]
    assert history("site/st_aurelia/eval-num-examples") == [(1, 90.0), (2, 90.0)]
    assert history("site/st_aurelia/epsilon") == [(1, 2.5), (2, 4.5)]  # the ledger after the round's last release
    odd = metric_key("site", ODD, "trained")
    _validate_metric_name(odd)  # MLflow's own rule
    assert history(odd) == [(1, 1.0), (2, 0.0)]  # its budget ran out in round 2
    logged = set(run.data.metrics)
    assert not {"val_loss", "best_metric", "site/st_aurelia/val-auroc"} & logged  # withheld (NaN) or not a number
    assert metric_key("site", ODD, "epsilon") not in logged  # inf: no guarantee, nothing logged
    listed = {f.path for folder in ("models", "reports") for f in client.list_artifacts(run_id, folder)}
    assert listed == set(sent) == {"models/final_model.pt", "models/final_model.json", "reports/summary.json"}


def test_names_mlflow_accepts_and_keeps_apart():
    pytest.importorskip("mlflow", reason="MLflow is not installed (pip install 'equifed[tracking]')")
    from mlflow.utils.validation import _validate_metric_name

    names = [ODD, "St. Mary's ICU", "St. Mary_s_ICU", "..", "", "<script>", "Hôpital Nord", "a" * 300]
    keys = [metric_key("site", n, "eval-auroc") for n in names]
    for key in keys:
        _validate_metric_name(key)
    assert len(set(keys)) == len(keys) and all(k.endswith("/eval-auroc") for k in keys)
    assert name_part("st_aurelia") == "st_aurelia" and name_part("Hôpital Nord") == "Hôpital Nord"  # unchanged


def test_a_failing_store_never_raises_after_start(tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is not installed (pip install 'equifed[tracking]')")
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with pytest.raises(TrackingUnavailable, match="a_file"):  # before training: loud
        MlflowTracker(blocked).start({})
    tracker = MlflowTracker(tmp_path / "mlruns")
    tracker.log_round(1, {"holdout_auroc": 0.5}, [])  # never started: recorded, not raised
    tracker.end("failed")
    assert [(f["round"], f["analysis"]) for f in tracker.failures] == [(1, "tracking round"), (None, "tracking end")]
