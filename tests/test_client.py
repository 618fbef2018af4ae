"""The ClientApp's handlers called with real Flower records on a generated site:
what leaves the site, how a site is found, and what the server learns on failure."""

import io
import os
import socket
import threading
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import SiteError, evaluate_global, train
from client.site import resolve_site_path
from core_models.networks import build_model
from simulations.generator import generate_consortium

RUN_CONFIG = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

SCENARIO = """
name = "client-test"
seed = 5
image_size = 32
[defaults]
n = 60
[[sites]]
name = "gamma"
[[sites]]
name = "delta"
"""


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("client")
    (out / "s.toml").write_text(SCENARIO)
    return generate_consortium(out / "s.toml", out / "data")


def _context(node_config, **overrides):
    run_config = {**RUN_CONFIG, "image-size": 32, "local-epochs": 1, **overrides}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def _message(kind="train"):
    model = build_model("cnn")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _strings(record_dict: RecordDict) -> list[str]:
    out = []
    for record in record_dict.config_records.values():
        out += [str(v) for v in record.values()]
    for record in record_dict.metric_records.values():
        out += [str(k) for k in record.keys()]
    return out


def test_site_found_by_node_config_or_partition(consortium):
    gamma, delta = consortium
    assert resolve_site_path({"data-path": str(delta)}, {"data-root": ""}) == delta
    root = gamma.parent
    assert resolve_site_path({"partition-id": 1, "num-partitions": 2}, {"data-root": str(root)}) == delta
    with pytest.raises(ValueError, match="only 2 site"):
        resolve_site_path({"partition-id": 5}, {"data-root": str(root)})
    with pytest.raises(ValueError, match="data-path"):
        resolve_site_path({}, {"data-root": ""})


def test_train_reply_holds_weights_and_aggregates_only(consortium):
    gamma = consortium[0]
    # a hospital that allows training without DP (its choice; deployment requires DP by default)
    msg = _message()
    sent = msg.content["arrays"].to_torch_state_dict()  # the global model the server sent
    reply = train(msg, _context({"data-path": str(gamma), "site": "gamma", "require-dp": False}))
    state = reply.content["arrays"].to_torch_state_dict()
    assert set(state) == set(build_model("cnn").state_dict())
    assert not any(k.startswith("_module.") for k in state)
    metrics = reply.content["metrics"]
    assert set(metrics) == {
        "train-loss", "val-auroc", "val-loss", "num-examples", "rejected", "steps", "noise-multiplier",
        "epsilon-before", "epsilon", "epsilon-train", "epsilon-release",
    }
    # DP is off by default: no privacy claim is made, and none is implied by a finite number
    assert metrics["epsilon"] == float("inf") and metrics["noise-multiplier"] == 0.0
    assert 0 < metrics["num-examples"] < 60  # the train split only
    # no patient identifiers anywhere in what is sent back
    texts = " ".join(_strings(reply.content))
    assert "gamma-0" not in texts and texts.count("gamma") == 1  # only the site's name
    # the weights moved away from the ones the server sent: every trainable tensor (freeze = "none"), not
    # merely some tensor of an unrelated random model
    trainable = {name for name, p in build_model("cnn").named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(state)
    unchanged = [k for k in trainable if torch.equal(state[k], sent[k])]
    assert not unchanged, unchanged
    assert metrics["steps"] > 0


def test_evaluate_reply(consortium):
    delta = consortium[1]
    reply = evaluate_global(_message("evaluate"), _context({"data-path": str(delta), "require-dp": False}))
    metrics = reply.content["metrics"]
    assert set(metrics) == {"eval-auroc", "eval-accuracy", "eval-loss", "num-examples"}
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0


def test_failure_reaches_server_without_details(tmp_path):
    site = tmp_path / "broken_site"
    (site / "images").mkdir(parents=True)
    (site / "images" / "PAT-SECRET-001.dcm").write_bytes(b"garbage")
    (site / "manifest.csv").write_text("patient_id,image_path,label\nPAT-SECRET-001,images/PAT-SECRET-001.dcm,1\n")
    with pytest.raises(SiteError) as err:
        train(_message(), _context({"data-path": str(site), "site": "broken"}, dp=True))  # past the policy
    assert "PAT-SECRET" not in str(err.value)
    assert "ManifestError" in str(err.value) and "site broken" in str(err.value)
    log = (site / ".equifed" / "client_errors.log").read_text()
    assert "PAT-SECRET-001" in log  # the details stay at the hospital


def test_the_server_reads_the_site_from_an_error_reply():
    from core_models.protocol import BUDGET_EXHAUSTED, error_site, error_status, site_error

    reason = site_error("north", "budget exhausted: 5.3 would be passed")
    assert error_site(reason) == "north" and error_status(BUDGET_EXHAUSTED) == "budget exhausted"
    # what Flower's simulation engine makes of a ClientApp's exception keeps the site's own text inside
    wrapped = f"<class 'flwr.clientapp.ClientAppException'>:<'\nException occurred. Message: {site_error('b_2', 'x')}'>"
    assert error_site(wrapped) == "b_2"
    assert error_site("<class 'RuntimeError'>") is None and error_status(1) == "error"


def test_a_task_background_thread_error_goes_to_the_site_log_not_the_console(tmp_path, capsys):
    from client.pinned_runner import _background_errors_to_log

    saved = threading.excepthook
    try:
        _background_errors_to_log(tmp_path / "client_errors.log")

        def heartbeat():
            raise RuntimeError("Client error '401 Unauthorized' for url .../send-task-heartbeat")

        worker = threading.Thread(target=heartbeat, name="heartbeat")
        worker.start()
        worker.join()
    finally:
        threading.excepthook = saved
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert (tmp_path / "client_errors.log").read_text() == (
        "--- background thread heartbeat: RuntimeError: Client error '401 Unauthorized' for url "
        ".../send-task-heartbeat\n")


class _RecordingSender:
    """Stands in for Flower's HeartbeatSender: records what TokenWatch builds and when it starts it."""

    made: list["_RecordingSender"] = []
    started = threading.Event()  # set by the first start()
    watch = None

    def __init__(self, heartbeat_fn):
        self.heartbeat_fn = heartbeat_fn
        self.arrived_at_start = None
        self.made.append(self)

    def start(self):
        self.arrived_at_start = self.watch.arrived.is_set()
        type(self).started.set()

    @classmethod
    def reset(cls):
        cls.made, cls.started, cls.watch = [], threading.Event(), None


def _within(fn, seconds):
    """[fn()] when it returns within `seconds`, else [] (a heartbeat that retries forever fails the test)."""
    done = []
    worker = threading.Thread(target=lambda: done.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    return done


@pytest.fixture
def refused_address():
    """A loopback address bound but not listening: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_token_watch_starts_the_heartbeat_on_the_token_and_hands_it_over(refused_address):
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse  # pylint: disable=E0611

    from client.pinned_runner import TaskState, TokenWatch

    assert TaskState().sub_status == SubStatus.FAILED  # what the exit handler reports until the task completes
    read_end, write_end = os.pipe()
    _RecordingSender.reset()
    state = TaskState()
    with open(read_end, encoding="utf-8") as stdin, open(write_end, "w", encoding="utf-8") as feed:
        watch = TokenWatch(refused_address, state, stdin=stdin, sender_cls=_RecordingSender)
        _RecordingSender.watch = watch  # set before the token is written, so before any start()
        feed.write("task-token\n")
        feed.flush()
        # the main thread is still "importing": it has not looked at the watch, yet the heartbeat runs
        assert _RecordingSender.started.wait(timeout=30)
        sender, = _RecordingSender.made
        assert sender.arrived_at_start is False  # started before the main thread was told of the token
        assert watch.arrived.wait(timeout=30) and watch.token == "task-token"
    try:
        assert len(_RecordingSender.made) == 1 and state.heartbeat is sender and watch.state is state
        # the heartbeat speaks through the very client run_task is handed ...
        state.link.client.SendTaskHeartbeat = lambda _req: SendTaskHeartbeatResponse(success=True)
        assert _within(sender.heartbeat_fn, seconds=30) == [True]
        del state.link.client.SendTaskHeartbeat
        # ... whose retries end with the link's retry policy (what run_task's exit handler sets): one refused
        # connection, and the heartbeat reports the failure instead of retrying forever
        state.link.retry_invoker.max_tries = 1
        assert _within(sender.heartbeat_fn, seconds=30) == [False]
    finally:
        state.link.client.close()


def test_token_watch_without_a_token_starts_no_heartbeat():
    from client.pinned_runner import TaskState, TokenWatch

    _RecordingSender.reset()
    for stdin in (io.StringIO("\n"), io.StringIO("")):  # the runner's "no task", or its stdin closed
        state = TaskState()
        watch = TokenWatch("127.0.0.1:9", state, stdin=stdin, sender_cls=_RecordingSender)
        assert watch.arrived.wait(timeout=30)
        assert watch.token == "" and state.link is None and state.heartbeat is None
    assert _RecordingSender.made == []
