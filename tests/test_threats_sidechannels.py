"""Side channels a curious server could read from a site's replies, each attack run through the real handlers
with and without a target patient (or a target fact about the site): the observable must not change.

- the delta the budget is checked at cannot be moved by the run config (the patient count behind it is every
  manifest row's);
- the dataset's fingerprint never leaves the site (a keyed tag does: no membership test);
- a fairness column the site lacks is not an error (success or failure would say whether the site holds it);
- requests are bounded by the site's ceilings and every numeric setting is range-checked before any data are read;
- the manifest is normalised once: a padded header or patient id is the same column or patient everywhere.
"""

import json
import math
import re
import shutil
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from PIL import Image

import client.app as client_app
import client.session as client_session
import client.site as client_site
from client.adapt import adapt_site
from client.app import evaluate_global, statistics, train
from client.ledger import SITE_KEY, LedgerError, PrivacyLedger, dataset_fingerprint, dataset_tag, ledger_path, ledger_report
from client.policy import PolicyRefusal, SitePolicy, default_delta
from core_models.config import APP_PYPROJECT, app_defaults, run_config_of
from core_models.data import load_site
from core_models.networks import build_model
from core_models.protocol import DATASET_TAG, POLICY_REFUSED, PRIVACY

RUN_CONFIG = {**app_defaults(APP_PYPROJECT), "fair-sensitive": "group", "fair-mediator": "scanner_legacy", "model": "cnn"}
TRIALS = 4

pytestmark = pytest.mark.usefixtures("task_identity")


def write_site(folder: Path, labels, seed: int = 0, header=("patient_id", "image_path", "label")) -> Path:
    """A site of 16 x 16 PNGs, one per patient, with the fairness columns the run names."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(labels):
        name = f"images/p{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / name)
        rows.append({header[0]: f"p{i:04d}", header[1]: name, header[2]: int(label),
                     "group": int(rng.integers(0, 2)), "scanner_legacy": int(rng.integers(0, 2)),
                     "age": int(rng.integers(30, 80))})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def without_patient(folder: Path, dest: Path, patient: str) -> Path:
    """A copy of the site whose manifest leaves one patient out."""
    dest.mkdir(parents=True)
    shutil.copytree(folder / "images", dest / "images")
    frame = pd.read_csv(folder / "manifest.csv", dtype=str)
    frame[frame["patient_id"].str.strip() != patient].to_csv(dest / "manifest.csv", index=False)
    return dest


def context(site: Path, **overrides) -> Context:
    run_config = {**RUN_CONFIG, "image-size": 16, "local-epochs": 1, "num-server-rounds": 3, **overrides}
    return Context(run_id=1, node_id=7, node_config={"data-path": str(site), "site": "alpha"}, state=RecordDict(),
                   run_config=run_config)


def message(kind="train", model=None, **config) -> Message:
    model = model or build_model("cnn")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def outcome(reply: Message) -> tuple:
    """What a reply says beyond its noised numbers: error or not (and the refusal's code), the records it holds."""
    if reply.has_error():
        return ("error", reply.error.code)
    return ("ok", tuple(sorted(reply.content.metric_records)), tuple(sorted(reply.content.config_records)))


# ------------------------------------------------------------------------------------- the delta is the site's

@pytest.fixture
def three_class_site(tmp_path) -> Path:
    """130 patients (default delta 1e-4), 46 of them with label 2: a run with num-classes = 2 that rejected those
    rows would leave 84 (default delta 1e-3, ten times looser)."""
    labels = [0] * 42 + [1] * 42 + [2] * 46
    return write_site(tmp_path / "three", np.random.default_rng(1).permutation(labels))


def test_num_classes_cannot_move_the_delta_with_or_without_the_target(three_class_site, tmp_path):
    frame = pd.read_csv(three_class_site / "manifest.csv", dtype=str)
    target = frame.loc[frame["label"] == "2", "patient_id"].iloc[0]
    sites = {"with": three_class_site, "without": without_patient(three_class_site, tmp_path / "w", target)}
    assert default_delta(130) == 1e-4 and default_delta(129) == 1e-4 and default_delta(84) == 1e-3
    seen = {}
    for who, site in sites.items():
        deltas = set()
        for trial in range(TRIALS):
            for classes in (2, 3):  # the setting that drops every label-2 row, then the honest one
                client_site._LOADED.clear()
                reply = evaluate_global(message("evaluate", model=build_model("cnn", classes)),
                                        context(site, dp=True, **{"num-classes": classes}))
                assert not reply.has_error()
                deltas.add(json.loads(ledger_path(site).read_text())["delta"])
        seen[who] = deltas
    assert seen["with"] == seen["without"] == {1e-4}
    # num-classes = 1 (the review's probe: every label-1 row rejected) is refused before the data are read
    for site in sites.values():
        with pytest.raises(client_app.SiteError, match="ConfigError"):
            evaluate_global(message("evaluate"), context(site, dp=True, **{"num-classes": 1}))


def test_the_ledger_keeps_its_first_delta_and_only_tightens_it(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    ledger = PrivacyLedger.open(folder, delta=1e-4, max_epsilon=10, fingerprint="a")
    ledger.charge(1.0, 0.1, 100)
    full = ledger.epsilon()
    looser = PrivacyLedger.open(folder, delta=1e-3, max_epsilon=10, fingerprint="b")  # other data, a looser ask
    assert looser.delta == 1e-4 and looser.epsilon() == pytest.approx(full)
    assert looser.epsilon(delta=1e-3) < full  # what the server would have gained
    tighter = PrivacyLedger.open(folder, delta=1e-6, max_epsilon=10, fingerprint="a")
    assert tighter.delta == 1e-6 and tighter.epsilon() > full
    assert PrivacyLedger.open(folder, delta=1e-4, fingerprint="a").delta == 1e-6  # never loosened again
    assert json.loads(ledger_path(folder).read_text())["delta"] == 1e-6


def test_a_full_budget_stays_full_whatever_the_run_says(three_class_site):
    """The review's attack: a site whose budget is full at its own delta must not accept more releases because a
    run setting makes its data look smaller."""
    reply = evaluate_global(message("evaluate", model=build_model("cnn", 3)),
                            context(three_class_site, dp=True, **{"num-classes": 3}))
    assert not reply.has_error()
    ledger = PrivacyLedger.open(three_class_site, fingerprint=dataset_fingerprint(three_class_site))
    ledger.charge(1.0, 0.1, 300)  # a long training history: at delta 1e-3 it would read 1.7 lower
    spent = ledger.epsilon()
    assert ledger.epsilon(delta=1e-3) < spent - 1.0
    (three_class_site / "site.toml").write_text(f"max-epsilon = {spent + 1e-3}\n")
    before = ledger_path(three_class_site).read_bytes()
    for classes in (2, 3):
        client_site._LOADED.clear()  # each task as in a fresh process: nothing loaded by the call before
        query = message("query", model=build_model("cnn", classes), statistics="shift", seed=0,
                        **{k: v for k, v in RUN_CONFIG.items() if k.startswith("stats-")})
        reply = statistics(query, context(three_class_site, dp=True, **{"num-classes": classes}))
        assert reply.has_error() and "budget exhausted" in reply.error.reason
    assert ledger_path(three_class_site).read_bytes() == before


# ------------------------------------------------------------------------------------- no exact fingerprint

def test_replies_carry_a_keyed_tag_never_the_fingerprint(tmp_path):
    site = write_site(tmp_path / "s", [0, 1] * 20)
    target = "p0003"
    other = without_patient(site, tmp_path / "other", target)
    tags = []
    for _ in range(2):
        reply = train(message(), context(site, dp=True))
        assert not reply.has_error()
        record = dict(reply.content.config_records[PRIVACY])
        assert set(record) == {DATASET_TAG}
        tags.append(record[DATASET_TAG])
    assert tags[0] == tags[1]  # the server can still tell "the same data as before"
    # an adversary holding every other record computes the fingerprint of each candidate dataset: none matches
    candidates = {dataset_fingerprint(site), dataset_fingerprint(other)}
    assert tags[0] not in candidates and len(tags[0]) == 64
    key = site / ".equifed" / SITE_KEY
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # another site with the same data has another key, so another tag
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copytree(site / "images", twin / "images")
    (twin / "manifest.csv").write_bytes((site / "manifest.csv").read_bytes())
    assert dataset_fingerprint(twin) == dataset_fingerprint(site)
    twin_reply = train(message(), context(twin, dp=True))
    assert twin_reply.content.config_records[PRIVACY][DATASET_TAG] != tags[0]


# ------------------------------------------------------------------------------------- failure as an oracle

def test_a_missing_fairness_column_is_no_error(tmp_path):
    """Whether the site holds the column the run names ("group") must not decide success or failure."""
    site = write_site(tmp_path / "s", [0, 1] * 20)
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    shutil.copytree(site / "images", lacking / "images")
    pd.read_csv(site / "manifest.csv").drop(columns="group").to_csv(lacking / "manifest.csv", index=False)
    fair = {k: v for k, v in RUN_CONFIG.items() if k.startswith("fair-")}
    seen = {}
    for name, folder in (("has", site), ("lacks", lacking)):
        outcomes = set()
        for trial in range(TRIALS):
            query = message("query", statistics="fair-pse", **fair)
            outcomes.add(outcome(statistics(query, context(folder, dp=True))))
        outcomes.add(outcome(train(message(), context(folder, dp=True, **{"fair-offset": True}))))
        seen[name] = outcomes
    assert seen["has"] == seen["lacks"]
    assert all(o[0] == "ok" for o in seen["has"])


# ------------------------------------------------------------------------------------- bounded requests

@pytest.fixture
def never_read(monkeypatch):
    """Fails the test if a handler reads the site's data."""
    def refuse(*args, **kwargs):
        raise AssertionError("the site's data were read")
    monkeypatch.setattr(client_session, "open_site", refuse)


@pytest.mark.parametrize("override, setting", [
    ({"image-size": 20000}, "max-image-size"),
    ({"local-epochs": 10**6}, "max-local-epochs"),
    ({"num-server-rounds": 10**6}, "max-rounds"),
    ({"statistics": "shift", "stats-rff-dim": 2 * 10**6}, "max-stats-dim"),
    ({"statistics": "fairness", "stats-fairness-score-bins": 10**7}, "max-stats-dim"),
])
def test_oversized_requests_are_refused_before_any_data_are_read(tmp_path, never_read, override, setting):
    site = write_site(tmp_path / "s", [0, 1] * 5)
    for handler, kind in ((train, "train"), (evaluate_global, "evaluate")):
        reply = handler(message(kind), context(site, dp=True, **override))
        assert reply.has_error() and reply.error.code == POLICY_REFUSED and setting in reply.error.reason
    assert not ledger_path(site).exists()


def test_the_site_sets_its_own_ceilings(tmp_path, never_read):
    site = write_site(tmp_path / "s", [0, 1] * 5)
    (site / "site.toml").write_text("max-image-size = 32\nmax-local-epochs = 3\n")
    for override, setting in (({"image-size": 64}, "max-image-size = 32"), ({"local-epochs": 4}, "max-local-epochs = 3")):
        reply = train(message(), context(site, dp=True, **override))
        assert reply.has_error() and setting in reply.error.reason


@pytest.mark.parametrize("key, value", [
    ("stats-rff-bandwidth", 2.14e-308), ("learning-rate", math.nan), ("max-grad-norm", math.inf),
    ("target-epsilon", -1.0), ("release-noise", math.nan), ("stats-feature-clip", 0.0), ("fair-lambda", math.inf),
    ("fair-covariate-edges", "65,45"), ("fair-covariate-edges", "nan"), ("proximal-mu", -1.0),
])
def test_out_of_range_settings_are_refused_before_any_data_are_read(tmp_path, never_read, key, value):
    site = write_site(tmp_path / "s", [0, 1] * 5)
    with pytest.raises(client_app.SiteError, match="ConfigError"):
        train(message(), context(site, dp=True, **{key: value}))


@pytest.mark.parametrize("key, value", [("server-round", -1), ("proximal-mu", math.nan), ("proximal-mu", 1e300)])
def test_out_of_range_message_values_are_refused_before_any_data_are_read(tmp_path, never_read, key, value):
    site = write_site(tmp_path / "s", [0, 1] * 5)
    with pytest.raises(client_app.SiteError, match="ValueError"):
        train(message(**{key: value}), context(site, dp=True))


def test_adapt_checks_the_consortium_file_before_allocating(tmp_path, monkeypatch):
    site = write_site(tmp_path / "s", [0, 1] * 5)
    monkeypatch.setattr("client.adapt._load_images", lambda *a, **k: pytest.fail("images were loaded"))
    for bad in ({"image_size": 20000, "num_classes": 2}, {"image_size": 64, "num_classes": 10**6},
                {"image_size": "64", "num_classes": 2}, {"image_size": 64, "num_classes": 1}):
        consortium = tmp_path / "consortium.json"
        consortium.write_text(json.dumps({"model": "cnn", **bad}))
        with pytest.raises(ValueError, match="consortium file"):
            adapt_site(site, tmp_path / "model.pt", consortium, tmp_path / "out")


# ------------------------------------------------------------------------------------- one normalised manifest

def test_padded_header_and_ids_are_read_alike_by_loader_and_fingerprint(tmp_path):
    site = write_site(tmp_path / "s", [0, 1] * 4, header=("patient_id", " image_path", "label"))
    text = (site / "manifest.csv").read_text().replace("\np0000,", "\n p0000 ,")
    (site / "manifest.csv").write_text(text)
    data = load_site(site, image_size=16, cache=False)
    assert "image_path" in data.frame.columns and "p0000" in set(data.frame["patient_id"])
    first = dataset_fingerprint(site)
    image = site / "images" / "p0000.png"
    image.write_bytes(image.read_bytes() + b"\0")  # the bytes of an image the padded header names
    assert dataset_fingerprint(site) != first
    # a second row for " p0000 " is the same patient for the splits and for the fingerprint
    frame = pd.read_csv(site / "manifest.csv", dtype=str)
    extra = frame.iloc[[0]].assign(**{" image_path": "images/p0001.png", "patient_id": "p0000"})
    pd.concat([frame, extra]).to_csv(site / "manifest.csv", index=False)
    data = load_site(site, image_size=16, cache=False)
    assert data.frame["patient_id"].nunique() == 8 and len(data.frame) == 9


def test_the_site_raises_or_lowers_its_own_ceilings(tmp_path, never_read):
    site = write_site(tmp_path / "s", [0, 1] * 5)
    (site / "site.toml").write_text("max-image-size = 1024\n")
    raised = SitePolicy.load(site)
    assert raised.ceilings["max-image-size"] == 1024
    raised.check_request(run_config_of({"image-size": 1000}))  # the hospital's own, larger bound stands
    both = SitePolicy.load(site, {"max-image-size": 256})  # node config and site.toml: the stricter
    assert both.ceilings["max-image-size"] == 256


@pytest.mark.parametrize("override, asked", [
    ({"num-classes": 5000}, "num-classes = 5000"),
    ({"num-classes": 200, "statistics": "shift", "stats-rff-dim": 2}, "num-classes x outputs x log-odds bins"),
    ({"num-classes": 100, "statistics": "shift", "stats-rff-dim": 64}, "num-classes x stats-rff-dim"),
    ({"in-channels": 3, "image-size": 400}, "3 x 400^2"),
])
def test_products_of_sizes_are_bounded_too(override, asked):
    policy = SitePolicy()
    with pytest.raises(PolicyRefusal, match=re.escape(asked)):
        policy.check_request(run_config_of(override))


def test_a_short_or_readable_site_key_is_refused_and_racing_creators_agree(tmp_path):
    site = write_site(tmp_path / "s", [0, 1] * 5)
    key = site / ".equifed" / SITE_KEY
    with ProcessPoolExecutor(4) as pool:  # four processes making the key at once
        tags = set(pool.map(dataset_tag, [site] * 8, ["fp"] * 8))
    assert len(tags) == 1 and len(key.read_text().strip()) == 64
    assert not list(key.parent.glob("*.tmp"))
    key.chmod(0o644)
    with pytest.raises(LedgerError, match="owner-only"):
        dataset_tag(site, "fp")
    key.write_text("")
    key.chmod(0o600)
    with pytest.raises(LedgerError, match="64 hex digits"):
        dataset_tag(site, "fp")


def test_the_ethics_report_states_epsilon_at_the_delta_the_ledger_keeps(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    PrivacyLedger.open(folder, delta=1e-4, max_epsilon=None, fingerprint="a").charge(1.0, 0.1, 100)
    ledger = PrivacyLedger.open(folder, delta=1e-6, max_epsilon=None, fingerprint="b")
    report = ledger_report(folder)
    assert report["delta"] == 1e-6 and report["epsilon"] == pytest.approx(ledger.epsilon())
    assert all(d["delta"] == 1e-6 for d in report["datasets"])
