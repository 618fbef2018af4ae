"""Federated lesion detection in a real run (our own SuperLink, Flower's simulation engine): two generated
hospitals, one of which supplies no boxes.csv and still trains (the classifier), the holdout's mAP@0.5 rising."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from core_models.networks import build_model
from simulations.generator import generate_consortium
from simulations.run import main as simulate

from tests.conftest import FAST, SCENARIO


@pytest.mark.simulation
def test_sites_without_boxes_take_part_and_the_holdout_map_rises(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO.replace('name = "tiny"', 'name = "tiny_boxes"'))
    out = tmp_path / "run"
    alpha, beta = generate_consortium(scenario, out / "data")  # where the run looks for its sites
    assert len(pd.read_csv(alpha / "boxes.csv")) == (pd.read_csv(alpha / "manifest.csv")["label"] == 1).sum()
    (beta / "boxes.csv").unlink()  # beta's radiologists drew no boxes
    code = simulate([str(scenario), "--out", str(out), "--rounds", "3", "--timeout", "600", *FAST,
                     "-c", "detection=true", "-c", "local-epochs=3"])
    assert code == 0
    per_site = pd.read_csv(out / "per_site.csv")
    assert (per_site["status"] == "ok").all() and sorted(per_site["site"].unique()) == ["alpha", "beta"]
    assert len(per_site[(per_site.phase == "train") & (per_site.site == "beta")]) == 3
    ev = per_site[per_site.phase == "evaluate"].set_index(["site", "round"])["eval-map50"]
    assert ev.loc["beta"].isna().all() and np.isfinite(ev.loc["alpha"]).all()
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["holdout_map50"].iloc[0] < 0.05 and metrics["holdout_map50"].iloc[-1] > 0.3, \
        list(metrics["holdout_map50"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_holdout_map50"] == pytest.approx(metrics["holdout_map50"].iloc[-1])
    assert (out / "holdout_boxes.png").stat().st_size > 0
    # final_model.pt is the classifier alone (what scoring and auditing load); the detector lies beside it
    build_model("cnn").load_state_dict(torch.load(out / "final_model.pt", weights_only=True))
    assert any(k.startswith("head.out") for k in torch.load(out / "final_model_detector.pt", weights_only=True))
