"""Privacy claims of docs/PRIVACY.md and the client's docstrings that no other test checked: a graph path the
server names is never opened at the site, the default delta is a power of ten, and `equifed-client start` gives
up (exit 4) when no server answers within --max-wait."""

import builtins
import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import SiteError, statistics
from client.policy import default_delta
from client.supernode import EXIT_UNREACHABLE
from client.site import SITE_LOG
from core_models.networks import build_model
from simulations.generator import FAIRNESS_RUN_CONFIG, generate_consortium

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG = {**tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"],
              **FAIRNESS_RUN_CONFIG}
STATS_KEYS = {k: v for k, v in RUN_CONFIG.items() if k.startswith("stats-")}

SCENARIO = """
name = "claims"
seed = 13
image_size = 32
[defaults]
n = 40
[[sites]]
name = "a"
"""


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("claims")
    (out / "s.toml").write_text(SCENARIO)
    return generate_consortium(out / "s.toml", out / "data")[0]


# ------------------------------------------------------------------------ a graph path is never opened at the site

class FileSpy:
    """Every open, os.open and stat of `watched` (as any spelling of the path) while installed."""

    def __init__(self, monkeypatch, watched: list[Path]):
        self.watched = {os.path.abspath(p) for p in watched}
        self.touched: list[tuple[str, str]] = []
        for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "stat"), (os, "lstat"),
                            (os, "access"), (os, "scandir"), (os, "listdir")):
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, what, real):
        def spy(*args, **kwargs):
            target = args[0] if args else kwargs.get("file", kwargs.get("path"))
            if isinstance(target, (str, bytes, os.PathLike)):
                text = os.fsdecode(target)
                if os.path.abspath(text) in self.watched:  # (abspath: no file-system call, so no recursion)
                    self.touched.append((what, text))
            return real(*args, **kwargs)

        return spy


def _fairness_query(site: Path, graph: str, model) -> tuple[Message | None, str | None]:
    """The fairness statistics query with `stats-fairness-graph = graph` in the run config and the request, as a
    server would send it: (the reply, None) or (None, the SiteError the server would see)."""
    run_config = {**RUN_CONFIG, "image-size": 32, "stats-fairness-graph": graph, "release-noise": 2.0}
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(site), "site": "a"}, state=RecordDict(),
                      run_config=run_config)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({**STATS_KEYS, "stats-fairness-graph": graph,
                                                  "statistics": "fairness", "server-round": 1, "seed": 0})})
    try:
        return statistics(Message(content=content, dst_node_id=7, message_type=MessageType.QUERY), context), None
    except SiteError as err:
        return None, str(err)


@pytest.mark.usefixtures("task_identity")
def test_a_graph_path_from_the_server_is_never_opened_at_the_site(site_dir, tmp_path, monkeypatch):
    # a real graph spec (the shipped one, copied), and a path where nothing is
    real = tmp_path / "graphs" / "server_graph.toml"
    real.parent.mkdir()
    real.write_text((ROOT / "fairness" / "graphs" / "synthetic.toml").read_text())
    missing = tmp_path / "graphs" / "server_graph_absent.toml"
    old = time.time() - 3 * 86400  # atime well before mtime: any read updates it, even under relatime
    os.utime(real, (old, real.stat().st_mtime))
    atime = real.stat().st_atime
    model = build_model("cnn")
    log = site_dir / SITE_LOG

    spy = FileSpy(monkeypatch, [real, missing, real.parent])
    outcomes = {}
    for name, path in (("real", real), ("missing", missing)):
        logged = log.read_text() if log.exists() else ""
        reply, error = _fairness_query(site_dir, str(path), model)
        site_log = (log.read_text() if log.exists() else "")[len(logged):]
        what = ("error", reply.error.code, reply.error.reason) if reply is not None and reply.has_error() else \
            ("reply", None, None) if reply is not None else ("raised", None, error)
        outcomes[name] = (what[0], what[1], str(what[2]).replace(str(path), "<graph>"),
                          site_log.replace(str(path), "<graph>"))
    monkeypatch.undo()  # the spy off before the checks read anything
    assert spy.touched == []  # neither opened nor even looked up (existence is site state too)
    assert real.stat().st_atime == atime  # (and the file was not read by any other route)
    assert outcomes["real"][0] != "reply"  # refused...
    assert outcomes["real"] == outcomes["missing"]  # ...identically: same outcome, reason and local log
    assert "<graph>" in outcomes["real"][3]  # (the site's own log names what was asked for)

    # a filesystem that never updates atime would make the check above vacuous: reading the file does move it
    with open(real, "rb") as fh:
        fh.read()
    assert real.stat().st_atime != atime
    # and the refusal is the graph's, not the query's: the shipped name is answered
    reply, error = _fairness_query(site_dir, "synthetic", model)
    assert error is None and not reply.has_error() and "fairness" in reply.content.metric_records


# ------------------------------------------------------------------------------------------ the default delta

@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 60, 99, 100, 101, 999, 1000, 1001, 12_345, 99_999, 100_000,
                               250_000, 10**7 - 1, 10**7])
def test_default_delta_is_the_power_of_ten_at_most_one_tenth_of_one_over_n(n):
    delta = default_delta(n)
    k = round(math.log10(delta))
    assert delta == 10.0 ** k  # exactly a power of ten: it reveals n's order of magnitude only
    assert delta <= 1 / (10 * n)
    assert delta > 1 / (100 * n)  # the largest such power (the next one up is over 1/(10 n))
    # every n of the same decade gets the same delta: (10^(-k-2), 10^(-k-1)]
    largest = 10 ** (-k - 1)
    smallest = 10 ** (-k - 2) + 1 if k <= -2 else 1
    assert smallest <= n <= largest
    assert default_delta(smallest) == delta == default_delta(largest) and default_delta(largest + 1) == 10.0 ** (k - 1)


# ---------------------------------------------------------------------- `start` gives up when no server answers

def test_start_exits_4_after_max_wait_when_no_superlink_answers(site_dir, consortium, tmp_path):
    key = tmp_path / "hospital" / "a.key"
    assert key.exists() and (consortium / "ca.crt").exists()
    with socket.socket() as closed:  # bound, never listening: connections to it are refused, no one else gets it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        max_wait = 2.0
        script = Path(sys.executable).parent / "equifed-client"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "client.cli"]
        command += ["start", "--site", "a", "--data", str(site_dir), "--image-size", "32",
                    "--server", f"127.0.0.1:{port}", "--ca", str(consortium / "ca.crt"), "--key", str(key),
                    "--max-wait", str(max_wait)]
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # it and anything it started
                proc.wait()
    assert proc.returncode == EXIT_UNREACHABLE == 4, (out, err)
    assert f"server 127.0.0.1:{port} unreachable for {max_wait:.0f}s; giving up" in err
    assert "retrying in 1s" in out  # it did wait and try again before giving up...
    assert elapsed < max_wait + 15  # ...for about --max-wait (the rest is the start-up: imports, the data check)
    assert "connecting to" not in out  # no SuperNode was started
    assert not (site_dir / ".equifed" / "flwr-home").exists()
