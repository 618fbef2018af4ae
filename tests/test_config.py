"""The typed run config: the dataclasses and pyproject's table name the same keys with the same types,
and every bad override is named before any work starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from core_models.config import (AUTO, AUTO_KEYS, PLAIN_RECIPE, ConfigError, RunConfig, app_defaults, auto_settings,
                                check_overrides, schema)

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = app_defaults(ROOT / "pyproject.toml")


def test_dataclasses_and_pyproject_declare_the_same_keys_and_types():
    types = schema()
    assert set(types) == set(DEFAULTS)
    for name, value in DEFAULTS.items():
        if value == AUTO:  # resolved per run (core_models.config.resolve_auto), or per machine (device)
            assert name in AUTO_KEYS or name == "device", name
            continue
        # a TOML integer is a valid float setting (e.g. round-timeout = 600)
        assert isinstance(value, types[name]) or (types[name] is float and type(value) is int), name
        assert not (types[name] is int and isinstance(value, bool)), name


def test_defaults_build_a_config():
    cfg = RunConfig.from_flower(DEFAULTS)
    assert cfg.train.batch_size == PLAIN_RECIPE.batch_size and cfg.dp.enabled is DEFAULTS["dp"]
    assert cfg.server.num_rounds == PLAIN_RECIPE.rounds == 5
    dp = RunConfig.from_flower({**DEFAULTS, "dp": True})  # the DP recipe's rounds, unless the run names its own
    assert (dp.server.num_rounds, RunConfig.from_flower({**DEFAULTS, "dp": True, "num-server-rounds": 3})
            .server.num_rounds) == (20, 3)
    assert cfg.fair.active is False and cfg.fair.columns == []  # no default names a manifest column


def test_unknown_key_is_named_with_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"unknown run-config key 'strategi' \(did you mean 'strategy'\?\)"):
        check_overrides({"strategi": "fedprox"}, DEFAULTS)
    with pytest.raises(ConfigError, match=r"unknown run-config key 'zzz'$"):
        check_overrides({"zzz": 1}, DEFAULTS)


@pytest.mark.parametrize("name, value, expected", [
    ("batch-size", "big", "'batch-size' must be int"),
    ("batch-size", 1.5, "'batch-size' must be int"),
    ("dp", 1, "'dp' must be bool"),
    ("learning-rate", True, "'learning-rate' must be float"),
    ("strategy", "fedsgd", r"'strategy' must be one of \['fedavg', 'fedprox', 'fedadam'\]"),
    ("local-epochs", 0, "'local-epochs' must be >= 1"),
    ("stats-fairness-noise", -1.0, r"'stats-fairness-noise' must be a finite number in \[0, 1e\+06\]"),
])
def test_wrong_values_are_named(name, value, expected):
    with pytest.raises(ConfigError, match=expected):
        check_overrides({name: value}, DEFAULTS)


def test_good_overrides_are_typed():
    merged = check_overrides({"round-timeout": 30, "learning-rate": 1, "dp": "true"}, DEFAULTS)
    assert merged["round-timeout"] == 30.0 and isinstance(merged["learning-rate"], float) and merged["dp"] is True


@pytest.mark.parametrize("other, named", [
    ({"dp": True}, "dp"), ({"central-dp": True}, "central-dp"), ({"pretext": "rotation"}, "pretext"),
    ({"model": "resnet"}, "model = 'resnet'"),
    ({"fair-offset": True, "fair-sensitive": "race", "fair-mediator": "scanner"}, "fair-offset"),
])
def test_detection_refuses_what_it_cannot_train_with(other, named):
    with pytest.raises(ConfigError, match=f"'detection' = true is not available with {named}"):
        check_overrides({"detection": True, **other}, DEFAULTS)
    assert RunConfig.from_flower(check_overrides({"detection": True}, DEFAULTS)).train.detection


def test_fairness_features_need_their_columns_named():
    with pytest.raises(ConfigError, match="set fair-sensitive and fair-mediator"):
        check_overrides({"fair-lambda": 5.0}, DEFAULTS)
    with pytest.raises(ConfigError, match="set fair-mediator"):
        check_overrides({"fair-offset": True, "fair-sensitive": "race"}, DEFAULTS)
    cfg = RunConfig.from_flower(check_overrides({"fair-offset": True, "fair-sensitive": "race",
                                                 "fair-mediator": "scanner", "fair-covariate": "age"}, DEFAULTS))
    assert cfg.fair.active and cfg.fair.columns == ["race", "scanner", "age"]


def test_a_missing_key_is_named():
    partial = {k: v for k, v in DEFAULTS.items() if k != "seed"}
    with pytest.raises(ConfigError, match="run config has no 'seed'"):
        RunConfig.from_flower(partial)


def test_a_typo_in_a_simulation_override_exits_2_before_any_work(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "simulations.run", "--out", str(out), "-c", "strategi=fedprox"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "unknown run-config key 'strategi' (did you mean 'strategy'?)" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not out.exists()  # no data generated, nothing started


def test_a_typo_in_a_server_override_exits_2_before_any_work(tmp_path, consortium, capsys):
    from server.cli import main as server_cli

    capsys.readouterr()
    code = server_cli(["start", "--dir", str(consortium), "--out", str(tmp_path / "run"), "--host", "127.0.0.1",
                       "--port", "0", "-c", "batch-size=big"])
    assert code == 2 and "'batch-size' must be int" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (consortium / "state" / "server.lock").exists()


def test_override_text_keeps_its_type():
    from server.console import parse_overrides

    given = parse_overrides(["fair-covariate-edges=45", "learning-rate=1", "dp=true", "strategy=fedprox"])
    assert given == {"fair-covariate-edges": "45", "learning-rate": 1, "dp": True, "strategy": "fedprox"}
    assert check_overrides(given, DEFAULTS)["learning-rate"] == 1.0  # typed as the run config types it
    with pytest.raises(ConfigError, match="expects KEY=VALUE, got 'dp'"):
        parse_overrides(["dp"])


def test_checks_only_the_assembled_config_can_make():
    with pytest.raises(ConfigError, match="'patience' must be >= 0"):
        check_overrides({"patience": -1}, DEFAULTS)
    cfg = RunConfig.from_flower(check_overrides({"best-by": "holdout-auroc"}, DEFAULTS))
    with pytest.raises(ConfigError, match="needs a holdout set"):
        cfg.server.check_holdout()
    RunConfig.from_flower({**DEFAULTS, "best-by": "holdout-auroc", "holdout-path": "/h"}).server.check_holdout()


def _training(**overrides):
    t = RunConfig.from_flower(check_overrides(overrides, DEFAULTS)).train
    return t.model, t.optimizer, t.learning_rate, t.batch_size, t.local_epochs


def test_auto_keys_are_the_old_defaults_without_dp_and_the_dp_recipe_with_it():
    assert _training() == ("cnn", "adam", 0.002, 16, 2)  # make demo trains exactly as before
    assert _training(dp=True) == ("scatter-linear", "sgd", 0.5, 256, 1)  # benchmarks/RESULTS.md's DP recipe
    assert auto_settings({**DEFAULTS, "dp": True}) == {"model": "scatter-linear", "optimizer": "sgd",
                                                       "learning-rate": 0.5, "batch-size": 256, "local-epochs": 1,
                                                       "num-server-rounds": 20}


def test_a_value_the_run_gives_wins_over_auto():
    assert _training(dp=True, **{"learning-rate": 0.1}) == ("scatter-linear", "sgd", 0.1, 256, 1)
    assert _training(dp=True, model="cnn") == ("cnn", "adam", 0.002, 16, 2)  # the recipe is scatter-linear's
    assert _training(dp=True, model="cnn", **{"batch-size": 64}) == ("cnn", "adam", 0.002, 64, 2)
    assert _training(model="scatter-linear", optimizer="sgd") == ("scatter-linear", "sgd", 0.002, 16, 2)
    assert auto_settings({**DEFAULTS, "dp": True, "model": "cnn", "optimizer": "sgd"}) == {
        "learning-rate": 0.002, "batch-size": 16, "local-epochs": 2, "num-server-rounds": 5}
    assert _training(**{"batch-size": "auto", "learning-rate": "auto"}) == _training()  # -c KEY=auto: the default


def test_under_dp_a_run_that_needs_a_trainable_encoder_keeps_the_cnn():
    for extra in ({"pretext": "rotation"}, {"pretrained-path": "/models/start.pt"}):
        assert _training(dp=True, **extra) == ("cnn", "adam", 0.002, 16, 2), extra
    assert _training(detection=True) == ("cnn", "adam", 0.002, 16, 2)


def test_auto_is_named_in_the_choices_and_checked_after_resolving():
    with pytest.raises(ConfigError, match=r"'model' must be one of \['auto', 'cnn', 'resnet'"):
        check_overrides({"model": "vgg"}, DEFAULTS)
    with pytest.raises(ConfigError, match=r"'optimizer' must be one of \['auto', 'adam', 'sgd'\], got 'rmsprop'"):
        check_overrides({"optimizer": "rmsprop"}, DEFAULTS)
    with pytest.raises(ConfigError, match="'image-size' must be a multiple of 4, got 30"):
        check_overrides({"dp": True, "image-size": 30}, DEFAULTS)  # the scattering of the DP recipe
    check_overrides({"image-size": 30}, DEFAULTS)  # the cnn takes any size


def test_the_server_starts_from_the_network_the_sites_build():
    """server/app.py's round-0 model and a site's network come from the same resolved run config."""
    from core_models.networks import ScatterLinear, SmallCNN, build_model
    from server.app import initial_model

    for overrides, kind in (({}, SmallCNN), ({"dp": True}, ScatterLinear)):
        cfg = RunConfig.from_flower(check_overrides(overrides, DEFAULTS))
        server, site = initial_model(cfg), build_model(cfg.train.model, cfg.train.num_classes, cfg.train.in_channels)
        assert type(server) is type(site) is kind
        assert {k: v.shape for k, v in server.state_dict().items()} == {k: v.shape for k, v in site.state_dict().items()}
