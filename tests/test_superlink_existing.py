"""`equifed-simulate --superlink`: the run goes to a SuperLink that the test started itself (simulation engine,
loopback), is followed to its end and writes the run folder, and the SuperLink is left running: the command
never stops a SuperLink it did not start. Then the same folder sent to a port where no SuperLink listens."""

import json

import pandas as pd
import pytest

from server.superlink import LocalSuperLink, free_port
from simulations.generator import generate_consortium
from simulations.run import main as simulate

from tests.conftest import ONE_ACTOR

SCENARIO = """
name = "small"
seed = 5
image_size = 32

[defaults]
n = 60
prevalence = 0.4

[[sites]]
name = "alpha"

[[sites]]
name = "beta"

[holdout]
n = 60
"""


@pytest.mark.simulation  # Flower's simulation engine (Ray): with the other simulations, one at a time
def test_a_run_on_a_superlink_already_running(tmp_path, capsys):
    scenario = tmp_path / "small.toml"
    scenario.write_text(SCENARIO)
    data = tmp_path / "data"
    generate_consortium(scenario, data)
    out = tmp_path / "run"
    # theirs: started here, as an operator would start it, and stopped by PID when the test ends
    with LocalSuperLink(log_path=tmp_path / "their_superlink.log") as theirs:
        code = simulate(["--sites", str(data), "--out", str(out), "--rounds", "1", "--superlink", theirs.address,
                         "--insecure", "-c", "image-size=32", "-c", "local-epochs=1", "-c", "batch-size=32",
                         *ONE_ACTOR])
        assert code == 0, capsys.readouterr().err
        assert theirs.process.poll() is None  # still running: the command did not stop it
        summary = json.loads((out / "summary.json").read_text())
        # the run went to their SuperLink (it knows it, finished), not to one the command started
        [row] = theirs.runs()
        assert int(row["run-id"]) == summary["flower_run_id"] and row["status"] == "finished:completed"
        assert summary["superlink"] == theirs.address and summary["flower_status"] == "finished:completed"
        assert not (out / "superlink.log").exists()

        # nothing listens there: said in one line, exit 1, and their SuperLink is untouched
        nowhere = f"127.0.0.1:{free_port()}"
        code = simulate(["--sites", str(data), "--out", str(tmp_path / "nowhere"), "--superlink", nowhere,
                         "--insecure", "-c", "image-size=32"])
        assert code == 1
        assert f"SuperLink {nowhere}: flwr run failed" in capsys.readouterr().err
        assert theirs.process.poll() is None and len(theirs.runs()) == 1

    # the same run folder as with our own SuperLink
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [0, 1]
    per_site = pd.read_csv(out / "per_site.csv")
    assert sorted(per_site[per_site["phase"] == "train"]["site"]) == ["alpha", "beta"]
    assert (per_site["status"] == "ok").all()
    assert (out / "final_model.pt").stat().st_size > 0 and (out / "flower.log").stat().st_size > 0
    page = (out / "index.html").read_text()
    assert "completed, 1 round(s)" in page and "<td>alpha</td>" in page and "<td>beta</td>" in page


def test_superlink_options_checked_before_anything_runs(tmp_path, capsys):
    for argv, said in ((["--insecure"], "go with --superlink"),
                       (["--superlink", "localhost"], "is not HOST:PORT"),
                       (["--superlink", "::1:9093"], "IPv6 address in brackets"),
                       (["--superlink", "127.0.0.1:9093", "--root-certificates", str(tmp_path / "ca.crt")],
                        "no such file"),
                       (["--superlink", "127.0.0.1:9093", "--insecure", "--root-certificates", "x"],
                        "not allowed with argument")):
        with pytest.raises(SystemExit) as stop:
            simulate(["--out", str(tmp_path / "run"), *argv])
        assert stop.value.code == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
