"""The federated self-supervised phase: a pretext run trains the encoder on every site's images, the manifest's
unlabelled rows included (never those of held-out patients), under DP-SGD charged to the site's own ledger, and
writes an encoder that a label run takes as its pretrained-path."""

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import SiteError, train
from client.dp import DPSettings, PatientData, plan_dp, train_dp
from client.ledger import PrivacyLedger
from core_models.config import ConfigError, check_overrides
from core_models.data import load_site
from core_models.networks import build_model
from core_models.pretext import ContrastiveTask, PretextModel, pretext_loss_fn
from core_models.splits import assign_splits
from simulations.generator import generate_consortium
from simulations.run import main as simulate

RUN_CONFIG = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

SCENARIO = """
name = "pretext-test"
seed = 9
image_size = 32
[defaults]
n = 60
[[sites]]
name = "gamma"
[[sites]]
name = "delta"
"""
N_UNLABELLED = 10


def _add_unlabelled(site: Path) -> str:
    """N_UNLABELLED pretraining-only rows (new patients, empty label) and two of a test-split patient; returns
    that patient's id."""
    manifest = pd.read_csv(site / "manifest.csv", dtype=str)
    split = assign_splits(load_site(site, image_size=32, cache=False).frame, seed=RUN_CONFIG["seed"])
    frame = load_site(site, image_size=32, cache=False).frame.assign(split=split.to_numpy())
    held = str(frame.loc[frame["split"] == "test", "patient_id"].iloc[0])
    rows = []
    for i, image in enumerate(manifest["image_path"].iloc[:N_UNLABELLED + 2]):
        copy = f"unlabelled_{i}{Path(image).suffix}"
        shutil.copy(site / image, site / copy)
        rows.append({"patient_id": f"u{i}" if i < N_UNLABELLED else held, "image_path": copy, "label": ""})
    pd.concat([manifest, pd.DataFrame(rows)]).to_csv(site / "manifest.csv", index=False)
    return held


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretext")
    (out / "s.toml").write_text(SCENARIO)
    found = generate_consortium(out / "s.toml", out / "data")
    _add_unlabelled(found[0])
    return out, found


def _message() -> Message:
    model = PretextModel(build_model("cnn"), "rotation")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type="train")


def _context(site: Path, **overrides) -> Context:
    run_config = {**RUN_CONFIG, "image-size": 32, "local-epochs": 1, "pretext": "rotation", **overrides}
    return Context(run_id=1, node_id=7, node_config={"data-path": str(site), "site": site.name, "require-dp": False},
                   state=RecordDict(), run_config=run_config)


@pytest.mark.usefixtures("task_identity")
def test_pretext_round_uses_unlabelled_rows_but_not_held_out_patients(sites):
    _, (gamma, _) = sites
    n_train = int((assign_splits(load_site(gamma, image_size=32).frame, seed=RUN_CONFIG["seed"]) == "train").sum())
    reply = train(_message(), _context(gamma))
    assert set(reply.content["arrays"].to_torch_state_dict()) == set(PretextModel(build_model("cnn")).state_dict())
    metrics = reply.content["metrics"]
    # the train split and the ten new patients' images; the test patient's two unlabelled images stay out
    assert metrics["num-examples"] == n_train + N_UNLABELLED
    assert metrics["train-loss"] > 0 and metrics["val-loss"] > 0


@pytest.mark.usefixtures("task_identity")
def test_pretext_round_under_dp_is_charged_to_the_site_ledger(sites):
    _, (_, delta) = sites
    reply = train(_message(), _context(delta, dp=True, **{"target-epsilon": 4.0}))
    metrics = reply.content["metrics"]
    ledger = PrivacyLedger.open(delta)
    spent = ledger.summary()
    assert spent["train_steps"] == metrics["steps"] > 0  # every noised pretext step is on the ledger
    assert metrics["epsilon"] == pytest.approx(ledger.epsilon()) and 0 < metrics["epsilon"] < 4.0
    entries = json.loads((delta / ".equifed" / "privacy_ledger.json").read_text())
    labels = {e["label"] for ds in entries["datasets"].values() for e in ds["entries"]}
    assert "pretext-patient-count" in labels  # its sample rate comes from a noised, charged patient count
    assert metrics["train-loss"] != metrics["train-loss"]  # withheld (NaN) under DP


def test_pretext_cannot_be_combined_with_label_only_features():
    with pytest.raises(ConfigError, match="cannot be combined with fair-lambda, statistics"):
        check_overrides({"pretext": "rotation", "fair-lambda": 5.0, "fair-sensitive": "A", "fair-mediator": "S",
                         "statistics": "shift"}, RUN_CONFIG)
    with pytest.raises(ConfigError, match="must be one of"):
        check_overrides({"pretext": "jigsaw"}, RUN_CONFIG)


@pytest.mark.simulation
def test_federated_pretext_run_writes_an_encoder_for_the_label_run(sites, tmp_path):
    out, _ = sites
    run = tmp_path / "ssl"
    code = simulate([str(out / "s.toml"), "--out", str(run), "--rounds", "1", "--timeout", "300",
                     "--cpus-per-client", "2", "-c", "pretext=inpainting", "-c", "local-epochs=1"])
    assert code == 0
    encoder = torch.load(run / "final_model.pt", weights_only=True)
    network = build_model("cnn")
    before = {k: v.clone() for k, v in network.state_dict().items()}
    network.load_state_dict(encoder, strict=True)  # a plain network state dict: what pretrained-path reads
    assert not torch.equal(before["features.block4.0.weight"], encoder["features.block4.0.weight"])
    rows = pd.read_csv(run / "metrics.csv")
    assert "holdout_auroc" not in rows.columns or rows["holdout_auroc"].isna().all()  # nothing to score yet
    assert json.loads((run / "summary.json").read_text())["sites_trained"] == 2


@pytest.mark.usefixtures("task_identity")
def test_a_site_with_no_labels_at_all_takes_part_in_the_pretext_phase(sites, tmp_path):
    _, (_, delta) = sites
    site = tmp_path / "unlabelled_site"
    shutil.copytree(delta, site, ignore=shutil.ignore_patterns(".equifed", ".equifed_cache"))
    manifest = pd.read_csv(site / "manifest.csv", dtype=str)
    manifest["label"] = ""
    manifest.to_csv(site / "manifest.csv", index=False)
    reply = train(_message(), _context(site))
    assert reply.content["metrics"]["num-examples"] == len(manifest)  # every image, no split to hold out


def test_check_counts_unlabelled_images_and_accepts_a_pretext_only_site(sites, tmp_path):
    from client.supernode import check_data

    _, (gamma, delta) = sites
    summary = check_data(gamma, image_size=32)
    assert summary.unlabelled == N_UNLABELLED + 2
    assert f"  unlabelled {N_UNLABELLED + 2} images (self-supervised pretext runs only)" in summary.lines()
    site = tmp_path / "pretext_only"
    shutil.copytree(delta, site, ignore=shutil.ignore_patterns(".equifed", ".equifed_cache"))
    manifest = pd.read_csv(site / "manifest.csv", dtype=str).assign(label="")
    manifest.to_csv(site / "manifest.csv", index=False)
    only = check_data(site, image_size=32)  # no labelled image: not a broken folder
    assert only.images == 0 and only.unlabelled == len(manifest)
    assert "takes part in pretext runs only" in "\n".join(only.lines())


@pytest.mark.usefixtures("task_identity")
def test_a_target_the_noised_counts_alone_would_use_up_is_refused_before_any_release(sites):
    _, (gamma, _) = sites
    reply = train(_message(), _context(gamma, dp=True, **{"target-epsilon": 0.05}))
    assert reply.has_error() and "used up by this site's noised counts" in reply.error.reason
    assert PrivacyLedger.open(gamma).summary()["n_entries"] == 0  # refused before anything was charged


def _copy_of(site: Path, tmp_path: Path) -> Path:
    """A copy of a site without its ledger or caches."""
    copy = tmp_path / site.name
    shutil.copytree(site, copy, ignore=shutil.ignore_patterns(".equifed"))
    return copy


def _contrastive_message() -> Message:
    model = PretextModel(build_model("cnn"), "contrastive")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type="train")


@pytest.mark.usefixtures("task_identity")
def test_a_contrastive_round_under_dp_is_refused_before_the_site_is_read(sites, tmp_path):
    """Its loss compares each image with the batch: per-sample clipping would not bound a patient's influence."""
    _, (gamma, _) = sites
    site = _copy_of(gamma, tmp_path)
    with pytest.raises(SiteError, match="ConfigError during train"):
        train(_contrastive_message(), _context(site, dp=True, pretext="contrastive"))
    assert "cannot run with dp = true" in (site / ".equifed" / "client_errors.log").read_text()
    assert not (site / ".equifed" / "privacy_ledger.json").exists()  # nothing spent, nothing opened
    with pytest.raises(ConfigError, match="per-sample clipping"):
        check_overrides({"pretext": "contrastive", "dp": True}, RUN_CONFIG)


@pytest.mark.usefixtures("task_identity")
def test_a_contrastive_round_without_dp_trains_the_encoder(sites):
    _, (gamma, _) = sites
    message = _contrastive_message()
    before = message.content["arrays"].to_torch_state_dict()
    reply = train(message, _context(gamma, pretext="contrastive", **{"batch-size": 32}))
    after = reply.content["arrays"].to_torch_state_dict()
    assert set(after) == set(before)
    assert not torch.equal(after["network.features.block4.0.weight"], before["network.features.block4.0.weight"])
    assert torch.equal(after["network.head.weight"], before["network.head.weight"])  # the label head takes no part
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and 0 < metrics["train-loss"] and 0 < metrics["val-loss"]


def test_dp_training_of_a_contrastive_model_stops_before_its_first_step(sites, tmp_path):
    """The library path under the config check: DP-SGD on the batch-coupled loss is refused, nothing spent."""
    _, (gamma, _) = sites
    images = load_site(_copy_of(gamma, tmp_path), image_size=32).images[:32]
    plan = plan_dp(len(images), batch_size=16, local_epochs=1, rounds=1, target_epsilon=8, delta=1e-5)
    ledger = PrivacyLedger.open(tmp_path / "gamma", delta=1e-5, max_epsilon=100, fingerprint="toy")
    model = PretextModel(build_model("cnn"), "contrastive")
    with pytest.raises(ValueError, match="cannot be trained under DP-SGD"):
        train_dp(model, PatientData(images, np.zeros(len(images), dtype=np.int64)), plan, ledger,
                 DPSettings(max_grad_norm=1.0, physical_batch_size=16), sampling_rng=np.random.default_rng(0),
                 noise_generator=torch.Generator().manual_seed(0),
                 loss_fn=pretext_loss_fn("contrastive", torch.Generator().manual_seed(1)))
    assert ledger.summary()["train_steps"] == 0 and ledger.epsilon() == 0.0
    with pytest.raises(TypeError):  # no task can claim per-sample gradients it does not have
        ContrastiveTask(per_sample=True)
