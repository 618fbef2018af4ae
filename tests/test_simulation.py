"""A real federated run: our own SuperLink on loopback, Flower's simulation engine (Ray),
`flwr run` of this app, 2 hospitals x 2 rounds; then a resume and a failing run."""

import json
from pathlib import Path

import pandas as pd
import pytest

from simulations.generator import generate_consortium
from simulations.run import main as simulate

SCENARIO = """
name = "tiny"
seed = 11
image_size = 32

[defaults]
n = 160
prevalence = 0.4
lesion_contrast = 0.6

[[sites]]
name = "alpha"
p_s_a0 = 0.1
p_s_a1 = 0.5

[[sites]]
name = "beta"
p_s_a0 = 0.3
p_s_a1 = 0.7

[holdout]
n = 200
"""

FAST = ["-c", "local-epochs=2", "-c", "batch-size=16", "-c", "learning-rate=0.003", "-c", "image-size=32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Generate the two sites, break one image, and run two rounds."""
    out = tmp_path_factory.mktemp("sim")
    scenario = out / "tiny.toml"
    scenario.write_text(SCENARIO)
    sites = generate_consortium(scenario, out / "data")
    broken = sorted((sites[1] / "images").glob("*.dcm"))[0]
    broken.write_bytes(b"this is not a DICOM file")
    code = simulate([str(scenario), "--out", str(out), "--rounds", "2", "--timeout", "600", *FAST])
    assert code == 0
    return out


def test_two_sites_two_rounds_beat_round_zero(run_dir):
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2]
    assert metrics["holdout_auroc"].iloc[-1] > metrics["holdout_auroc"].iloc[0] + 0.05
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flower_status"] == "finished:completed"
    assert summary["final_holdout_auroc"] == pytest.approx(metrics["holdout_auroc"].iloc[-1])


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


def test_resume_continues_round_count(run_dir):
    code = simulate([str(run_dir / "tiny.toml"), "--out", str(run_dir), "--rounds", "3", "--resume", *FAST])
    assert code == 0
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2, 3]
    per_site = pd.read_csv(run_dir / "per_site.csv")
    assert sorted(per_site["round"].unique()) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "round_003.pt").exists()


def test_failed_run_exits_non_zero(tmp_path, run_dir):
    # an unknown network makes the ServerApp raise: Flower marks the run failed, we exit 1
    code = simulate([str(run_dir / "tiny.toml"), "--out", str(tmp_path), "--rounds", "1", "-c", "model=vgg", *FAST])
    assert code == 1
    assert not (tmp_path / "summary.json").exists()
