"""A real federated run: our own SuperLink on loopback, Flower's simulation engine (Ray),
`flwr run` of this app, 2 hospitals x 2 rounds; then a resume. (A run that fails, and the command's
exit 1, is tried on `equifed-server start` in tests/test_deployment.py: both commands read the run's
end from `LocalSuperLink.wait` and exit 1 unless Flower says it completed.)"""

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pandas as pd
import pytest

from simulations.run import main as simulate

from tests.conftest import FAST


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run


def test_two_sites_two_rounds_beat_round_zero(run_dir):
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2]
    assert metrics["holdout_auroc"].iloc[-1] > metrics["holdout_auroc"].iloc[0] + 0.05
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flower_status"] == "finished:completed"
    assert summary["final_holdout_auroc"] == pytest.approx(metrics["holdout_auroc"].iloc[-1])
    assert summary["sites_trained"] == 4  # 2 sites x 2 rounds: the count nothing_trained reads


def test_per_site_metrics_are_kept(run_dir):
    per_site = pd.read_csv(run_dir / "per_site.csv")
    for phase in ("train", "evaluate"):
        rows = per_site[per_site["phase"] == phase]
        assert sorted(rows["site"].unique()) == ["alpha", "beta"]
        assert sorted(rows["round"].unique()) == [1, 2]
        assert (rows["status"] == "ok").all()
    train = per_site[per_site["phase"] == "train"]
    # each site reports its own rejection count: beta lost one image to the broken file
    assert set(train[train["site"] == "beta"]["rejected"]) == {1}
    assert set(train[train["site"] == "alpha"]["rejected"]) == {0}


def test_broken_image_listed_with_reason(run_dir):
    rejected = pd.read_csv(run_dir / "rejected.csv")
    assert len(rejected) == 1
    assert rejected["site"].iloc[0] == "beta"
    assert rejected["image_path"].iloc[0].endswith(".dcm")
    assert "DICOM" in rejected["reason"].iloc[0] or "read" in rejected["reason"].iloc[0].lower()


def test_run_folder_contents(run_dir):
    for name in ("learning_curve.png", "final_model.pt", "flower.log", "checkpoints/round_001.pt",
                 "checkpoints/round_002.pt", "checkpoints/latest.pt"):
        assert (run_dir / name).stat().st_size > 0, name
    # the model card: what scoring the model later needs, never guessed
    assert json.loads((run_dir / "final_model.json").read_text()) == {"model": "cnn", "num_classes": 2,
                                                                       "image_size": 32}
    warnings = json.loads((run_dir / "summary.json").read_text())["warnings"]
    assert not [w for w in warnings if w.startswith("the final")]  # the final model beat round 0


def test_resume_continues_round_count(run_dir, tmp_path, monkeypatch):
    resumed = tmp_path / "sim"  # a copy: the shared run stays as other tests read it
    shutil.copytree(run_dir, resumed)
    page_before = (resumed / "index.html").read_text()
    tracking = find_spec("mlflow") is not None  # the extra equifed[tracking]; without it the run page alone
    mlflow = ["--mlflow", str(tmp_path / "mlruns")] if tracking else []
    code = simulate([str(resumed / "tiny.toml"), "--out", str(resumed), "--rounds", "3", "--resume", *FAST, *mlflow])
    assert code == 0
    metrics = pd.read_csv(resumed / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2, 3]
    per_site = pd.read_csv(resumed / "per_site.csv")
    assert sorted(per_site["round"].unique()) == [1, 2, 3]
    assert (resumed / "checkpoints" / "round_003.pt").exists()
    saved = json.loads((resumed / "run_overrides.json").read_text())
    assert saved["num-server-rounds"] == 3 and saved["statistics"] == "shift"  # the resume's own, kept for the next

    # the run page: rewritten by the resumed run, every site's row and the final round, the run marked finished
    assert "completed, 2 round(s)" in page_before and 'http-equiv="refresh"' not in page_before
    page = (resumed / "index.html").read_text()
    assert "completed, 3 round(s)" in page and 'http-equiv="refresh"' not in page
    assert "<td>alpha</td>" in page and "<td>beta</td>" in page and "<th>3</th>" in page
    refused = per_site[per_site["status"] != "ok"]  # round 3's statistics go over the sites' budgets
    assert len(refused) and all(f"<td>{r.round}</td><td>{r.phase}</td><td>{r.site}</td>" in page
                                for r in refused.itertuples())
    if not tracking:
        return
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a folder store only when asked to
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("equifed").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["num-server-rounds"] == "3"
    # the rounds done before the resume too: the MLflow run holds the whole history
    history = client.get_metric_history(run.info.run_id, "holdout_auroc")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [
        (r, round(v, 6)) for r, v in zip(metrics["round"], metrics["holdout_auroc"])]
    for site in ("alpha", "beta"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, f"site/{site}/train-loss"))
        assert steps == [1, 2, 3]
    models = [f.path for f in client.list_artifacts(run.info.run_id, "models")]
    assert "models/final_model.pt" in models and "models/final_model.json" in models
    assert "reports/index.html" in [f.path for f in client.list_artifacts(run.info.run_id, "reports")]


def test_unknown_network_is_a_config_error(tmp_path, run_dir, capsys):
    code = simulate([str(run_dir / "tiny.toml"), "--out", str(tmp_path / "run"), "-c", "model=vgg", *FAST])
    assert code == 2
    assert "'model' must be one of ['auto', 'cnn', 'resnet', 'resnet18', 'scatter', 'scatter-linear'], got 'vgg'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
