"""Attacks by a curious or hostile server on what a site sends, each shown to fail.

The server writes the run config and every message; the site trusts only its own code, its own `site.toml`
and its SuperNode's node config. Each test plays one attack from docs/PRIVACY.md against the real handlers,
the real ledger and real Opacus DP-SGD.
"""

import json
import math
import os
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import evaluate_global, statistics, train
from client.dp import DPSettings, PatientData, PatientPoissonSampler, plan_dp, train_dp
from client.ledger import BudgetExhausted, LedgerError, PrivacyLedger, dataset_fingerprint, ledger_path
from client.policy import SitePolicy, default_delta
from client.site import LocalSite
from client.producers import PRODUCERS
from client.statistics import Releaser
from core_models.data import ManifestError, SiteData
from core_models.networks import build_model
from core_models.protocol import POLICY_REFUSED
from simulations.generator import FAIRNESS_RUN_CONFIG, generate_consortium

RUN_CONFIG = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
RUN_CONFIG = {**RUN_CONFIG, **FAIRNESS_RUN_CONFIG, "model": "cnn"}  # the generator's columns, named as a user names theirs

SCENARIO = """
name = "threats"
seed = 11
image_size = 32
[defaults]
n = 80
[[sites]]
name = "alpha"
"""

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("threats")
    (out / "s.toml").write_text(SCENARIO)
    return generate_consortium(out / "s.toml", out / "data")[0]


@pytest.fixture
def site(pristine, tmp_path):
    """A fresh copy of the generated site per test: ledgers and settings never leak between tests."""
    dest = tmp_path / "alpha"
    shutil.copytree(pristine, dest, ignore=shutil.ignore_patterns(".equifed"))
    return dest


def _context(node_config, **overrides):
    run_config = {**RUN_CONFIG, "image-size": 32, "local-epochs": 1, "num-server-rounds": 3, **overrides}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def _message(kind="train", model=None, **config):
    model = model or build_model("cnn")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type=kind)


# ------------------------------------------------------------------------------------------ 1. predictable noise

def _toy(n_images=48, n_patients=16, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_images, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n_images)
    return x, y, np.repeat(np.arange(n_patients), n_images // n_patients)


def _noise_of_one_step(tmp_path, name, x, y, patients):
    """The gradient DP-SGD applies in one step where Poisson sampling drew nobody: pure noise."""
    plan = plan_dp(16, 4, 1, 1, 8.0, 1e-4)
    plan = type(plan)(plan.noise_multiplier, 1e-9, 1, plan.expected_batch_size)  # q ~ 0: every batch empty
    ledger = PrivacyLedger.open(_dir(tmp_path / name), delta=1e-4, fingerprint="toy")
    model = build_model("cnn")
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)  # what the old code did with the server's seed: it must not matter now
    np.random.seed(0)
    train_dp(model, PatientData(x, y, patients), plan, ledger,
             DPSettings(max_grad_norm=1.0, physical_batch_size=4, optimizer="sgd", lr=1.0))
    return torch.cat([(b - p.detach()).ravel() for b, p in zip(before, model.parameters())]), plan


def _dir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_dp_noise_cannot_be_regenerated_from_the_run_seed(tmp_path):
    x, y, patients = _toy()
    first, plan = _noise_of_one_step(tmp_path, "a", x, y, patients)
    x2, y2, _ = _toy(seed=1)  # a different private dataset, the same public seed
    second, _ = _noise_of_one_step(tmp_path, "b", x2, y2, patients)
    moved = first != 0
    assert moved.sum() > 1000  # the noise reached the (unfrozen) weights
    assert not torch.equal(first, second)  # same seed, different noise
    assert abs(float(torch.corrcoef(torch.stack([first[moved], second[moved]]))[0, 1])) < 0.05
    # regenerating with the run's seed (what a server knowing the seed would do) matches nothing
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        guess = torch.randn(int(moved.sum()))
        assert abs(float(torch.corrcoef(torch.stack([first[moved], guess]))[0, 1])) < 0.05


class EntropySpy:
    """os.urandom, counted: who asked for OS entropy (the function and its caller, as (file, function) pairs)."""

    def __init__(self, monkeypatch):
        self.real = os.urandom
        self.calls: list[tuple[tuple[str, str], tuple[str, str]]] = []
        monkeypatch.setattr(os, "urandom", self)

    def __call__(self, n):
        frame = sys._getframe(1)
        self.calls.append((_where(frame), _where(frame.f_back)))
        return self.real(n)

    def asked_by(self, function: tuple[str, str], caller: tuple[str, str]) -> int:
        return sum(1 for f, c in self.calls if f == function and c == caller)


def _where(frame) -> tuple[str, str]:
    path = Path(frame.f_code.co_filename).resolve()
    root = Path(__file__).resolve().parent.parent
    return (path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix(), frame.f_code.co_name)


LEDGER_RNG = ("client/ledger/privacy_ledger.py", "os_entropy_rng")
NOISE_GENERATOR = ("client/dp.py", "os_entropy_generator")
TRAIN_DP = ("client/dp.py", "train_dp")
RELEASE = ("client/ledger/privacy_ledger.py", "release")


class Draws:
    """What DP-SGD really drew: the sampler's batches and the Gaussian noise Opacus added, per run."""

    def __init__(self, monkeypatch):
        import opacus.optimizers.optimizer as opacus_optimizer

        self.batches: list[list[int]] = []
        self.noise: list[torch.Tensor] = []
        draws, real_noise = self, opacus_optimizer._generate_noise

        class Sampler(PatientPoissonSampler):
            def __iter__(self):
                for batch in super().__iter__():
                    draws.batches.append(list(batch))
                    yield batch

        def noise(*args, **kwargs):
            out = real_noise(*args, **kwargs)
            draws.noise.append(out.detach().ravel()[:200].clone())
            return out

        monkeypatch.setattr("client.dp.PatientPoissonSampler", Sampler)
        monkeypatch.setattr(opacus_optimizer, "_generate_noise", noise)

    def take(self) -> tuple[list[list[int]], torch.Tensor]:
        """(the batches, the noise) drawn since the last take."""
        out = (self.batches, torch.cat(self.noise) if self.noise else torch.zeros(0))
        self.batches, self.noise = [], []
        return out


def _train_round(site, server_round, draws):
    """The real train handler, DP on, every public seed fixed (what a server knowing them would replay)."""
    draws.take()
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model("cnn")  # the same global model for every copy (seeded just above)
    reply = train(_message(model=model, **{"server-round": server_round}),
                  _context({"data-path": str(site), "site": "alpha"}, dp=True, seed=0))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply, *draws.take()


def test_poisson_batches_are_not_reproducible_from_a_seed(site, tmp_path, monkeypatch):
    """Two copies of one site, identical config, ledger and global model: the production path (the train handler,
    no generator passed in) draws its patient batches and its DP noise from OS entropy, so they differ."""
    entropy, draws = EntropySpy(monkeypatch), Draws(monkeypatch)
    _train_round(site, 1, draws)  # round 1 noises the patient count once: both copies then share it
    assert entropy.asked_by(LEDGER_RNG, RELEASE) >= 1  # the noised count's noise came from the OS
    twin = tmp_path / "twin" / "alpha"
    shutil.copytree(site, twin)  # the ledger, witness and noised count too
    entropy.calls.clear()
    first, batches_first, noise_first = _train_round(site, 2, draws)
    # train_dp's own defaults (no generator passed in): the sampler's and the noise's, seeded from the OS
    sampling, noise = entropy.asked_by(LEDGER_RNG, TRAIN_DP), entropy.asked_by(NOISE_GENERATOR, TRAIN_DP)
    assert sampling >= 1 and noise >= 1
    second, batches_second, noise_second = _train_round(twin, 2, draws)
    assert entropy.asked_by(LEDGER_RNG, TRAIN_DP) > sampling and entropy.asked_by(NOISE_GENERATOR, TRAIN_DP) > noise
    # the two rounds ran the same plan: the same noised count, noise multiplier and number of steps
    m1, m2 = dict(first.content["metrics"]), dict(second.content["metrics"])
    assert m1["num-examples"] == m2["num-examples"] and m1["noise-multiplier"] == m2["noise-multiplier"]
    assert m1["epsilon"] == pytest.approx(m2["epsilon"])
    assert len(batches_first) == len(batches_second) == int(m1["steps"]) > 1
    assert len(noise_first) == len(noise_second) > 1000
    # ...but different patients in the batches and unrelated noise
    assert batches_first != batches_second
    assert not torch.equal(noise_first, noise_second)
    assert abs(float(torch.corrcoef(torch.stack([noise_first, noise_second]))[0, 1])) < 0.1
    assert not all(torch.equal(x, y) for x, y in zip(first.content["arrays"].to_torch_state_dict().values(),
                                                       second.content["arrays"].to_torch_state_dict().values()))


def test_release_noise_differs_between_identical_requests(pristine, tmp_path, monkeypatch):
    """`PrivacyLedger.release` as the client calls it (no rng) on two copies of one site: OS-entropy noise."""
    entropy = EntropySpy(monkeypatch)
    releases = []
    for copy in ("a", "b"):
        dest = tmp_path / copy / "alpha"
        shutil.copytree(pristine, dest, ignore=shutil.ignore_patterns(".equifed"))
        ledger = PrivacyLedger.open(dest, delta=1e-5, max_epsilon=None)
        np.random.seed(0)
        releases.append(ledger.release(np.zeros(50), 1.0, 3.0, label="x", round=1, run_id="1"))
    assert entropy.asked_by(LEDGER_RNG, RELEASE) == 2  # each release seeded its own generator from the OS
    assert not np.array_equal(releases[0], releases[1])
    assert abs(float(np.corrcoef(releases[0], releases[1])[0, 1])) < 0.6
    assert releases[0].std() == pytest.approx(3.0, rel=0.4)


# ------------------------------------------------------------------------------------------ 2. the server's settings

def test_server_delta_is_ignored(site):
    reply = train(_message(), _context({"data-path": str(site)}, dp=True, **{"target-delta": 0.5}))
    assert not reply.has_error()
    entries = json.loads(ledger_path(site).read_text())["datasets"]
    deltas = {e["delta"] for ds in entries.values() for e in ds["entries"]}
    n_patients = pd.read_csv(site / "manifest.csv")["patient_id"].nunique()
    assert deltas == {default_delta(n_patients)} and default_delta(n_patients) <= 1 / (10 * n_patients)
    # the epsilon reported is the ledger's at the site's delta, not at 0.5 (where it would be tiny)
    ledger = PrivacyLedger.open(site, delta=default_delta(n_patients))
    assert reply.content["metrics"]["epsilon"] == pytest.approx(ledger.epsilon())
    assert ledger.epsilon() > 2 * ledger.epsilon(delta=0.5)


def test_site_delta_setting_is_the_stricter_of_file_and_node_config(site):
    (site / "site.toml").write_text("delta = 1e-7\nmax-epsilon = 6\n")
    policy = SitePolicy.load(site, {"data-path": str(site), "delta": 1e-6, "max-epsilon": 4.0})
    assert policy.delta_for(100) == 1e-7 and policy.max_epsilon == 4.0


def test_dp_off_is_refused_in_deployment(site):
    reply = train(_message(), _context({"data-path": str(site), "site": "alpha"}, dp=False))
    assert reply.has_error() and reply.error.code == POLICY_REFUSED
    assert "require-dp" in reply.error.reason and reply.error.reason.startswith("site alpha:")
    assert not ledger_path(site).exists()  # nothing was trained, nothing charged


def test_forbidden_statistic_and_low_noise_are_refused(site):
    (site / "site.toml").write_text('release = ["shift"]\nmin-release-noise = 4.0\n')
    node = {"data-path": str(site), "site": "alpha"}
    refused = statistics(_message("query", statistics="fairness"), _context(node, **{"release-noise": 5.0}))
    assert refused.has_error() and refused.error.code == POLICY_REFUSED and "release" in refused.error.reason
    quiet = statistics(_message("query", statistics="shift"), _context(node, **{"release-noise": 0.5}))
    assert quiet.has_error() and "min-release-noise" in quiet.error.reason
    assert not ledger_path(site).exists()


# ------------------------------------------------------------------------------------------ 3. resetting the ledger

def _spend(site):
    ledger = PrivacyLedger.open(site, delta=1e-5, max_epsilon=50)
    ledger.charge(1.0, 0.1, 30)
    return ledger.epsilon()


def test_reformatted_manifest_keeps_epsilon(site):
    spent = _spend(site)
    manifest = site / "manifest.csv"
    frame = pd.read_csv(manifest, dtype=str)
    frame[list(reversed(frame.columns))].to_csv(manifest, index=False)  # columns reordered
    manifest.write_text(manifest.read_text() + "\n\n")  # blank lines
    assert PrivacyLedger.open(site, delta=1e-5, max_epsilon=50).epsilon() == pytest.approx(spent)


def test_adding_patients_carries_the_history_over(site):
    spent = _spend(site)
    frame = pd.read_csv(site / "manifest.csv", dtype=str)
    extra = frame.iloc[:3].assign(patient_id=[f"new-{i}" for i in range(3)])
    pd.concat([frame, extra]).to_csv(site / "manifest.csv", index=False)
    ledger = PrivacyLedger.open(site, delta=1e-5, max_epsilon=50)
    assert ledger.dataset_epsilon() == 0.0  # a new dataset's own history...
    assert ledger.epsilon() == pytest.approx(spent)  # ...but the site's budget counts everything
    with pytest.raises(BudgetExhausted, match="max-epsilon"):
        PrivacyLedger.open(site, delta=1e-5, max_epsilon=spent).charge(1.0, 0.1, 1)


def test_deleted_ledger_is_refused(site):
    _spend(site)
    ledger_path(site).unlink()
    with pytest.raises(LedgerError, match="missing.*witness"):
        PrivacyLedger.open(site, delta=1e-5)
    assert not ledger_path(site).exists()  # and no fresh one was written


def test_rolled_back_ledger_is_refused(site):
    ledger = PrivacyLedger.open(site, delta=1e-5, max_epsilon=50)
    ledger.charge(1.0, 0.1, 5)
    old = ledger_path(site).read_bytes()
    ledger.charge(1.0, 0.1, 5)
    ledger_path(site).write_bytes(old)  # an older (valid, checksummed) copy put back
    with pytest.raises(LedgerError, match="older copy"):
        PrivacyLedger.open(site, delta=1e-5)


# ------------------------------------------------------------------------------------------ 4. the patient as unit

def test_dp_sgd_takes_at_most_one_image_per_patient_per_step():
    patients = np.repeat(np.arange(30), 5)  # five images each
    sampler = PatientPoissonSampler(patients, 0.5, 200, rng=np.random.default_rng(3))
    sizes = []
    for batch in sampler:
        assert len(set(patients[batch])) == len(batch)
        sizes.append(len(batch))
    assert np.mean(sizes) == pytest.approx(15, abs=1.0)  # q x patients, not q x images


class RecordingReleaser(Releaser):
    """The Releaser with no noise, remembering the declared sensitivity of each released vector."""

    def __init__(self):
        super().__init__(ledger=None, noise_multiplier=0.0, min_count=-1e9)
        self.sensitivity: dict[str, float] = {}

    def release(self, label, value, sensitivity):
        self.sensitivity[label] = sensitivity
        return super().release(label, value, sensitivity)


def _local_site(frame, images, path):
    split = frame["split"].reset_index(drop=True)
    data = SiteData(images=images, labels=frame["label"].to_numpy(np.int64), frame=frame.reset_index(drop=True),
                    rejected=[])
    return LocalSite(name="alpha", path=path, data=data, split=split)


def test_a_five_image_patient_moves_each_release_by_at_most_its_sensitivity(tmp_path):
    rng = np.random.default_rng(7)
    n = 120
    frame = pd.DataFrame({
        "patient_id": [f"p{i}" for i in range(n)], "label": rng.integers(0, 2, n),
        "split": rng.choice(["train", "val", "test"], n), "group": rng.integers(0, 2, n),
        "scanner_legacy": rng.integers(0, 2, n), "age": rng.uniform(30, 80, n).round(),
        "manufacturer": rng.choice(["GE", "Siemens"], n),
    })
    images = rng.uniform(0, 1, (n, 1, 32, 32)).astype(np.float32)
    for split in ("val", "test"):
        target = frame.index[frame["split"] == split][0]
        extra = frame.loc[[target] * 4]
        with_patient = pd.concat([frame, extra], ignore_index=True)
        images_with = np.concatenate([images, rng.uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)])
        without = frame.drop(index=target).reset_index(drop=True)
        images_without = np.delete(images, target, axis=0)
        model = build_model("cnn")
        request = {**RUN_CONFIG, "fair-pool-split": "val", "seed": 0, "server-round": 1}
        for kind in ("shift", "fairness", "fair-pse"):
            a, b = RecordingReleaser(), RecordingReleaser()
            out_a = PRODUCERS[kind](_local_site(with_patient, images_with, tmp_path), model, request, a)
            out_b = PRODUCERS[kind](_local_site(without, images_without, tmp_path), model, request, b)
            assert a.sensitivity, kind
            for label, value in _flat(out_a).items():
                moved = float(np.linalg.norm(np.asarray(value) - np.asarray(_flat(out_b)[label])))
                sensitivity = a.sensitivity[_label_of(label, a.sensitivity)]
                assert moved <= sensitivity + 1e-9, (kind, split, label, moved, sensitivity)


def _flat(out: dict) -> dict:
    return {k: v for k, v in out.items() if isinstance(v, (list, np.ndarray))}


def _label_of(key: str, labels: dict) -> str:
    """The Releaser label a producer's output key came from (labels are the keys, or end with them)."""
    hits = [lab for lab in labels if lab == key or lab.endswith(key) or key.endswith(lab)]
    return hits[0] if len(hits) == 1 else min(hits, key=len)


# ------------------------------------------------------------------------------------------ 5. exact values

def _crafted(sign):
    """An over-confident model: a huge bias on one logit, so accuracy x n would be an exact label count."""
    model = build_model("cnn")
    with torch.no_grad():
        list(model.parameters())[-1].copy_(torch.tensor([sign * 50.0, -sign * 50.0]))
    return model


def test_crafted_models_learn_nothing_exact_under_dp(site):
    node = {"data-path": str(site), "site": "alpha"}
    replies = [evaluate_global(_message("evaluate", model=_crafted(s)), _context(node, dp=True)) for s in (1, -1)]
    metrics = [dict(r.content["metrics"]) for r in replies]
    assert metrics[0] == pytest.approx(metrics[1], nan_ok=True)  # the reply does not depend on the model
    assert all(math.isnan(metrics[0][k]) for k in ("eval-auroc", "eval-accuracy", "eval-loss"))
    assert replies[0].content["disclosure"]["noised"] == "num-examples"
    trained = train(_message(model=_crafted(1)), _context(node, dp=True))
    sent = dict(trained.content["metrics"])
    assert all(math.isnan(sent[k]) for k in ("train-loss", "val-auroc", "val-loss", "rejected"))
    # the weight FedAvg uses is the noised count, noised once and the same every round
    again = train(_message(model=_crafted(-1)), _context(node, dp=True))
    assert again.content["metrics"]["num-examples"] == sent["num-examples"]
    labels = [e["label"] for ds in json.loads(ledger_path(site).read_text())["datasets"].values()
              for e in ds["entries"] if e["kind"] == "release"]
    assert labels.count("train-patient-count") == 1 and labels.count("test-patient-count") == 1


def test_offset_under_dp_comes_from_charged_counts(site):
    node = {"data-path": str(site), "site": "alpha"}
    reply = train(_message(), _context(node, dp=True, **{"fair-offset": True}))
    assert not reply.has_error()
    doc = json.loads(ledger_path(site).read_text())
    labels = [e["label"] for ds in doc["datasets"].values() for e in ds["entries"]]
    assert "fair-offset-counts" in labels
    assert any(k.endswith(":fair-offset:" + "|".join(str(RUN_CONFIG.get(c, "")) for c in (
        "fair-sensitive", "fair-mediator", "fair-covariate", "fair-covariate-edges", "fair-mediator-levels")))
               for k in doc["noised"])


def test_fingerprint_ignores_manifest_bytes_but_not_images(site):
    first = dataset_fingerprint(site)
    manifest = site / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("\n", "\r\n"))
    assert dataset_fingerprint(site) == first
    image = site / pd.read_csv(manifest)["image_path"].iloc[0]
    image.write_bytes(image.read_bytes() + b"\0")
    assert dataset_fingerprint(site) != first


def test_site_image_caps_reach_the_decoder(site):
    from client.site import open_site

    (site / "site.toml").write_text("max-image-pixels = 100\n")  # every generated image is larger
    # every image is rejected undecoded (one bad file never stops a site), so the site has nothing usable
    with pytest.raises(ManifestError, match=r"all rejected.*image too large.*limit 100 pixel values"):
        open_site(site, image_size=32, seed=0)
