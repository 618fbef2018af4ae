"""What an operator is told when something is off: a busy port or a second server on the same folder is named
before anything starts, and a resume keeps the run's own settings."""

import fcntl
import json
import socket
from pathlib import Path

import pytest

from client.cli import make_site_keys
from core_models.config import ConfigError, app_defaults
from server.cli import main as server_main
from server.console import SAVED_CONFIG, resume_overrides, save_overrides
from simulations.run import main as simulate

DEFAULTS = app_defaults(Path(__file__).resolve().parent.parent / "pyproject.toml")


def test_busy_port_is_named_before_anything_starts(tmp_path, consortium, capsys):
    cons = consortium
    with socket.socket() as other:  # another program already listens on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        capsys.readouterr()
        code = server_main(["start", "--dir", str(cons), "--out", str(tmp_path / "run"), "--host", "127.0.0.1",
                            "--port", str(port), "--connect-timeout", "600"])
    err = capsys.readouterr()
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in err.err
    assert "listening" not in err.out and not (tmp_path / "run").exists()


def test_second_server_on_the_same_folder_is_refused(tmp_path, consortium, capsys):
    cons = consortium
    (cons / "state").mkdir(exist_ok=True)
    with open(cons / "state" / "server.lock", "w") as held:  # what a running server holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        capsys.readouterr()
        code = server_main(["start", "--dir", str(cons), "--out", str(tmp_path / "run"), "--host", "127.0.0.1",
                            "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "another equifed-server (pid 4242)" in err and not (tmp_path / "run").exists()


def test_resume_keeps_the_saved_settings_and_reports_allowed_changes(tmp_path):
    save_overrides(tmp_path, {"strategy": "fedprox", "proximal-mu": 0.5, "num-server-rounds": 3})
    kept, notes = resume_overrides(tmp_path, {}, DEFAULTS)
    assert kept == {"strategy": "fedprox", "proximal-mu": 0.5, "num-server-rounds": 3} and notes == []
    longer, notes = resume_overrides(tmp_path, {"num-server-rounds": 5, "strategy": "fedprox"}, DEFAULTS)
    assert longer["num-server-rounds"] == 5 and longer["strategy"] == "fedprox"
    assert notes == ["num-server-rounds: 3 -> 5"]
    with pytest.raises(ConfigError, match=r"strategy: 'fedprox' -> 'fedavg'.*--force-config"):
        resume_overrides(tmp_path, {"strategy": "fedavg"}, DEFAULTS)
    with pytest.raises(ConfigError, match=r"learning-rate: 'auto' -> 0.1"):  # against the default it ran with
        resume_overrides(tmp_path, {"learning-rate": 0.1}, DEFAULTS)
    forced, notes = resume_overrides(tmp_path, {"strategy": "fedavg"}, DEFAULTS, force=True)
    assert forced["strategy"] == "fedavg" and notes == ["strategy: 'fedprox' -> 'fedavg'"]


def test_simulate_resume_refuses_a_changed_experiment_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest.pt").write_bytes(b"x")  # a run to resume (never read: refused before)
    (out / SAVED_CONFIG).write_text(json.dumps({"strategy": "fedprox"}))
    code = simulate(["--out", str(out), "--resume", "-c", "strategy=fedavg"])
    assert code == 2
    assert "strategy: 'fedprox' -> 'fedavg'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", SAVED_CONFIG]  # no data generated


def test_simulate_refuses_a_folder_that_holds_a_run_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest.pt").write_bytes(b"x")  # an earlier run: its sites' ledgers are spent
    assert simulate(["--out", str(out)]) == 2
    assert "already holds a run (checkpoints/latest.pt); continue it with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing generated


def test_a_bad_scenario_or_a_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    from client.cli import main as client_main

    (tmp_path / "bad.toml").write_text("name = 'x'\nseed = 1\nimage_size = 32\n[[sites]]\nname = 'a'\nn = -3\n")
    assert simulate([str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "must be >= 1" in err and "Traceback" not in err and not (tmp_path / "run").exists()
    for command in (["check"], ["ledger"]):
        assert client_main([*command, "--data", str(tmp_path / "hospitl_data")]) == 2
        assert f"no folder {tmp_path / 'hospitl_data'}" in capsys.readouterr().err


def test_a_model_worse_than_round_zero_is_flagged_and_no_holdout_line_without_a_holdout():
    from server.results import regressions, round_table
    from server.site_rows import SiteRow

    rows = [{"round": 0, "holdout_auroc": 0.66, "holdout_loss": 0.69},
            {"round": 1, "holdout_auroc": 0.70, "holdout_loss": 0.60},
            {"round": 2, "holdout_auroc": 0.58, "holdout_loss": 0.72}]
    warnings = regressions(rows, best_round=1)
    assert warnings == ["the final global model (round 2) is worse than the round-0 model it started from "
                        "on the holdout: auroc 0.660 -> 0.580",
                        "the final global model (round 2) is worse than the round-0 model it started from "
                        "on the holdout: loss 0.690 -> 0.720"]
    assert regressions(rows[:2], best_round=1) == []  # better than round 0: nothing to say
    within_noise = [{"round": 0, "holdout_auroc": 0.9893, "holdout_loss": 0.143},
                    {"round": 1, "holdout_auroc": 0.9887, "holdout_loss": 0.145}]
    assert regressions(within_noise) == []  # 0.989 -> 0.989 and +1.4 % loss: not a regression
    assert regressions([{"round": 0}, {"round": 1, "val_loss": 0.5}]) == []  # no holdout, no verdict
    site = [SiteRow.from_row({"round": 1, "site": "a", "phase": "train", "status": "ok", "train-loss": 0.5,
                              "num-examples": 10})]
    assert "HOLDOUT" not in round_table(1, site, {"round": 1, "sites_trained": 1})
    assert "HOLDOUT (global)" in round_table(1, site, rows[1])


def test_an_unknown_graph_name_lists_the_shipped_ones():
    from fairness.graph import SpecError, load_graph_spec

    with pytest.raises(SpecError, match=r"synthtic: graph spec not found \(a TOML path, or a shipped name: synthetic"):
        load_graph_spec("synthtic")


def test_a_completed_run_in_which_no_site_trained_is_a_failure():
    from server.console import nothing_trained

    assert nothing_trained({"status": "completed", "sites_trained": 0}).startswith("no site trained in any round")
    assert nothing_trained({"status": "completed", "sites_trained": 3}) is None
    assert nothing_trained(None) is None  # no summary: the run's own failure is reported instead
