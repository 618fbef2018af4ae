"""Federated lesion detection in a real run (our own SuperLink, Flower's simulation engine): two generated
hospitals, one of which supplies no boxes.csv and still trains (the classifier), the holdout's mAP@0.5 rising; and
how the strategy averages the detection head."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from core_models.model_card import read_card
from core_models.networks import build_model
from fairness.cli import load_weights
from server.strategy import TrackedFedAvg
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
    boxed = per_site[per_site.phase == "train"].groupby("site")["box-examples"]
    assert (boxed.min()["beta"], boxed.max()["beta"]) == (0, 0) and boxed.min()["alpha"] > 0
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
    # the detector's card says what it is, and the commands that score or explain read its classifier from it
    assert read_card(out / "final_model_detector.pt") == {"model": "cnn", "num_classes": 2, "image_size": 32,
                                                          "detector": True}
    assert read_card(out / "final_model.pt")["detector"] is False
    x = torch.from_numpy(np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32))
    with torch.no_grad():
        assert torch.equal(load_weights(out / "final_model_detector.pt")(x), load_weights(out / "final_model.pt")(x))


def _train_reply(node: int, head: float, classifier: float, n: int, boxes: int) -> Message:
    sent = Message(content=RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({
        "arrays": ArrayRecord({"head.out.weight": torch.full((2, 3), head),
                               "classifier.w": torch.tensor([classifier])}),
        "metrics": MetricRecord({"num-examples": n, "box-examples": boxes, "train-loss": 0.5}),
        "site": ConfigRecord({"name": f"site{node}"})}), reply_to=sent)


def test_fedavg_weighs_the_detection_head_by_the_boxes_each_site_trained_it_on(task_identity):
    """A site without boxes returns the head it was sent (here 0): FedAvg by num-examples would give the head
    (100 * 1 + 100 * 2 + 200 * 0) / 400 = 0.75; weighted by box-examples it is (30 * 1 + 10 * 2) / 40 = 1.25. The
    classifier stays FedAvg's num-examples mean, (100 + 200 + 600) / 400 = 2.25."""
    strategy = TrackedFedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    strategy._init_tracking()
    replies = [_train_reply(1, 1.0, 1.0, 100, 30), _train_reply(2, 2.0, 2.0, 100, 10),
               _train_reply(3, 0.0, 3.0, 200, 0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    state = arrays.to_torch_state_dict()
    assert torch.allclose(state["head.out.weight"], torch.full((2, 3), 1.25))
    assert torch.allclose(state["classifier.w"], torch.tensor([2.25]))
    # a claimed weight is capped by the site's own image count, and one that is not a finite count is ignored
    replies = [_train_reply(1, 1.0, 1.0, 100, 30), _train_reply(2, 2.0, 2.0, 10, 10**12),
               _train_reply(3, 5.0, 3.0, 100, math.inf)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["head.out.weight"], torch.full((2, 3), (30 + 20) / 40))
    # a round where no site had boxes: FedAvg as it is
    arrays, _ = strategy.aggregate_train(3, [_train_reply(1, 1.0, 1.0, 100, 0), _train_reply(3, 0.0, 3.0, 300, 0)])
    assert torch.allclose(arrays.to_torch_state_dict()["head.out.weight"], torch.full((2, 3), 0.25))
