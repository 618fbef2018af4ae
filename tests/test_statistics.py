"""The statistics query: what a site releases is noised for its declared sensitivity,
charged to the site's ledger, suppressed below the minimum count, and refused when the
site's budget is spent."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from client.app import BUDGET_EXHAUSTED, statistics
from client.ledger import PrivacyLedger, dataset_fingerprint
from client.producers import PRODUCERS
from client.statistics import Releaser
from tests.test_client import _context, consortium  # noqa: F401  (shared fixture)


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def label_counts(monkeypatch):
    """A minimal producer: the train split's label counts (sensitivity 1: one patient, one count)."""

    def _produce(site, model, request, releaser):
        _, y = site.part("train")
        return {"counts": releaser.release_counts("test-label-counts", np.bincount(y, minlength=2))}

    monkeypatch.setitem(PRODUCERS, "test-label-counts", _produce)


def _query(kinds="test-label-counts"):
    content = RecordDict({"config": ConfigRecord({"statistics": kinds, "server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.QUERY)


def test_release_is_noised_and_charged(consortium, label_counts):
    gamma = consortium[0]
    ctx = _context({"data-path": str(gamma), "site": "gamma"}, **{"release-noise": 2.0, "release-min-count": 0})
    before = PrivacyLedger.open(gamma, delta=1e-5, max_epsilon=None, fingerprint=dataset_fingerprint(gamma))
    n_before = len(before.history)
    reply = statistics(_query(), ctx)
    counts = list(reply.content["test-label-counts"]["counts"])
    assert len(counts) == 2 and all(isinstance(c, float) for c in counts)
    metrics = reply.content["metrics"]
    assert metrics["epsilon"] > metrics["epsilon-before"]
    after = PrivacyLedger.open(gamma, delta=1e-5, max_epsilon=None, fingerprint=dataset_fingerprint(gamma))
    assert len(after.history) == n_before + 1
    assert after.entries[-1]["kind"] == "release" and after.entries[-1]["sigma"] == 2.0
    assert after.entries[-1]["label"] == "test-label-counts"


def test_noise_scale_follows_sensitivity_and_small_cells_vanish(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, delta=1e-5, max_epsilon=None, fingerprint="f" * 64)
    rel = Releaser(ledger, noise_multiplier=3.0, min_count=5, rng=np.random.default_rng(0))
    draws = np.array([rel.release(f"v{i}", np.zeros(200), sensitivity=0.5) for i in range(10)])
    assert draws.std() == pytest.approx(1.5, rel=0.05)
    counts = rel.release_counts("c", [1000.0, 1.0], sensitivity=1.0)
    assert counts[0] == pytest.approx(1000.0, abs=15) and counts[1] == 0.0  # 1 + N(0, 3) < 5 nearly always
    assert len(ledger.history) >= 1 and len(ledger.entries) == 11


def test_unnoised_release_needs_no_ledger_and_noise_needs_one():
    assert Releaser(None, 0.0).release("x", [1.0, 2.0], 1.0) == [1.0, 2.0]
    with pytest.raises(ValueError, match="uncharged"):
        Releaser(None, 1.0)


def test_out_of_budget_site_releases_nothing(consortium, label_counts):
    delta_site = consortium[1]
    (delta_site / "site.toml").write_text("max-epsilon = 0.5\n")
    try:
        reply = statistics(_query(), _context({"data-path": str(delta_site)}, **{"release-noise": 1.0}))
        assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED
        assert "budget exhausted" in reply.error.reason
    finally:
        (delta_site / "site.toml").unlink()


def test_unknown_statistic_is_a_site_error(consortium):
    from client.app import SiteError
    with pytest.raises(SiteError, match="ValueError"):
        statistics(_query("no-such-stat"), _context({"data-path": str(consortium[0])}))
