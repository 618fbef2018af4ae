"""Where equifed trains: the `device` setting (auto, cpu, cuda, cuda:N) resolved on the machine that trains, a
site's own setting winning over the run config's, a card a machine lacks refused up front with the reason, and
every path (plain, DP-SGD on scattering features, pretext, detection, scoring, statistics, the server's holdout)
run on the device it is given.

"cuda:999" is a card no machine here has, so the refusals hold on a machine with CUDA too. The runs use it as the
run config's device under a site whose own setting names a real one: a path that read the run config's device
instead of the site's would stop the handler. They run on every device this machine has (the CPU; CUDA too where
torch sees it)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import evaluate_global, statistics, train
from client.dp import DPSettings, PatientData, os_entropy_generator, plan_dp, train_dp
from client.ledger import PrivacyLedger
from client.policy import DeviceRefusal, PolicyError, SitePolicy
from core_models.config import ConfigError, app_defaults, check_overrides, run_config_of
from core_models.devices import DeviceUnavailable, check_available, parse_device, resolve_device
from core_models.model_factory import ModelSpec
from core_models.networks import build_model
from core_models.protocol import (BOX_EXAMPLES, EPSILON, EPSILON_BEFORE, EVAL_AUROC, EVAL_MAP50, NOISE_MULTIPLIER,
                                  POLICY_REFUSED, VAL_AUROC, VAL_LOSS)
from core_models.training import evaluate
from server.cli import main as server_main
from server.hooks import HoldoutEvaluation
from simulations.generator import generate_consortium

RUN_CONFIG = app_defaults(Path(__file__).resolve().parent.parent / "pyproject.toml")
NOWHERE = "cuda:999"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

SCENARIO = """
name = "device-test"
seed = 3
image_size = 32
[defaults]
n = 60
[[sites]]
name = "eta"
[holdout]
n = 40
"""


def test_a_device_name_is_checked_without_asking_the_machine():
    assert parse_device("auto") == ("auto", None) and parse_device("cpu") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None) and parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "CUDA", "cuda:", "cuda:-1", "cuda:1.0", " cpu", "", "mps"):
        with pytest.raises(ValueError, match="must be one of"):
            parse_device(bad)


def test_resolution_picks_a_card_or_refuses_naming_what_the_machine_has():
    cpu, first, second = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert resolve_device("auto", cards=0) == cpu and resolve_device("auto", cards=2) == first
    assert resolve_device("cpu", cards=2) == cpu
    assert resolve_device("cuda", cards=1) == first and resolve_device("cuda:1", cards=2) == second
    with pytest.raises(DeviceUnavailable, match=r"'cuda:2' is not available here: this machine has 2 CUDA "
                                                r"device\(s\), cuda:0 to cuda:1; use 'auto' or 'cpu'"):
        resolve_device("cuda:2", cards=2)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(DeviceUnavailable, match=rf"'{name}' is not available here: this machine has no CUDA"):
            resolve_device(name, cards=0)
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0  # this machine, as torch sees it
    assert resolve_device() == (first if here else cpu)
    with pytest.raises(DeviceUnavailable, match="cuda:999"):
        resolve_device(NOWHERE)
    assert check_available("auto") is None and check_available("cpu") is None  # always there
    with pytest.raises(DeviceUnavailable, match="cuda:999"):
        check_available(NOWHERE)


def test_the_run_config_checks_the_name_and_leaves_the_card_to_the_machine_that_trains():
    assert RUN_CONFIG["device"] == "auto"
    with pytest.raises(ConfigError, match=r"run config 'device' must be one of"):
        check_overrides({"device": "gpu"}, RUN_CONFIG)
    # a server without the card reads the run config too: only where it trains is the card looked for
    assert check_overrides({"device": NOWHERE}, RUN_CONFIG)["device"] == NOWHERE


def test_the_sites_own_setting_wins_and_its_node_config_over_its_site_toml(tmp_path):
    cfg = run_config_of({"device": NOWHERE})
    assert SitePolicy.load(tmp_path).device is None
    with pytest.raises(DeviceRefusal, match=r"cannot train on device = 'cuda:999' \(the run config\)$") as refused:
        SitePolicy.load(tmp_path).device_for(cfg)
    assert "CUDA" in refused.value.why  # the site's own log says why; the reason the server gets does not
    assert SitePolicy.load(tmp_path, {"device": "cpu"}).device_for(cfg) == torch.device("cpu")
    (tmp_path / "site.toml").write_text(f'device = "{NOWHERE}"\n')
    with pytest.raises(DeviceRefusal, match=r"cannot train on the device of its own setting$"):
        SitePolicy.load(tmp_path).device_for(run_config_of({"device": "cpu"}))
    policy = SitePolicy.load(tmp_path, {"device": "cpu"})  # given to the process on this machine
    assert policy.device == "cpu" and policy.device_for(cfg) == torch.device("cpu")
    (tmp_path / "site.toml").write_text('device = "gpu"\n')
    with pytest.raises(PolicyError, match=r"site.toml: device must be one of"):
        SitePolicy.load(tmp_path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("device")
    (out / "s.toml").write_text(SCENARIO)
    return generate_consortium(out / "s.toml", out / "data")[0], out / "data" / "holdout"


@pytest.fixture
def site(generated, tmp_path):
    """A fresh copy of the site: no split written, no ledger."""
    dest = tmp_path / "eta"
    shutil.copytree(generated[0], dest, ignore=shutil.ignore_patterns(".equifed"))
    return dest


def _context(site: Path, node: dict, **run) -> Context:
    return Context(run_id=1, node_id=7, node_config={"data-path": str(site), "site": "eta", **node},
                   state=RecordDict(), run_config={**RUN_CONFIG, "image-size": 32, "local-epochs": 1, **run})


def _message(model, kind=MessageType.TRAIN, **config) -> Message:
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _moved(sent: torch.nn.Module, reply: Message) -> float:
    """Largest change of any weight between the model sent and the one in the reply (NaN if one is not finite)."""
    got = reply.content["arrays"].to_torch_state_dict()
    diffs = [(got[k].float() - v.float()).abs().max() for k, v in sent.state_dict().items()]
    return float(torch.stack(diffs).max())


@pytest.mark.usefixtures("task_identity")
def test_a_card_the_site_lacks_is_refused_with_the_reason_before_any_data_are_read(site):
    model = ModelSpec(image_size=32).build()
    asks = [(train, _message(model)), (evaluate_global, _message(model, MessageType.EVALUATE)),
            (statistics, _message(model, MessageType.QUERY, statistics="calibration", seed=0))]
    for handler, msg in asks:
        reply = handler(msg, _context(site, {"require-dp": False}, device=NOWHERE))
        assert reply.has_error() and reply.error.code == POLICY_REFUSED, handler.__name__
        assert "cannot train on device = 'cuda:999' (the run config)" in reply.error.reason
    reply = train(_message(model), _context(site, {"require-dp": False, "device": NOWHERE}, device="cpu"))
    assert reply.has_error() and "the device of its own setting" in reply.error.reason
    assert "999" not in reply.error.reason and "CUDA" not in reply.error.reason  # nor the site's setting or hardware
    assert not (site / ".equifed").exists()  # no split written, no ledger opened


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("device", DEVICES)
def test_plain_training_scoring_and_statistics_run_on_the_sites_device(site, device):
    node = {"require-dp": False, "device": device}
    torch.manual_seed(0)
    model = ModelSpec(image_size=32).build()
    reply = train(_message(model), _context(site, node, device=NOWHERE))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0 < _moved(model, reply) < 10 and reply.content["metrics"][VAL_AUROC] >= 0
    scored = evaluate_global(_message(model, MessageType.EVALUATE), _context(site, node, device=NOWHERE))
    assert not scored.has_error() and 0 <= scored.content["metrics"][EVAL_AUROC] <= 1
    released = statistics(_message(model, MessageType.QUERY, statistics="calibration", seed=0),
                          _context(site, node, device=NOWHERE))
    assert not released.has_error() and len(released.content["calibration"]["hist"]) > 0


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("device", DEVICES)
def test_dp_sgd_on_scattering_features_runs_on_the_sites_device(site, device):
    """dp = true, model auto: scatter-linear (its coefficients cached on the CPU), full-batch DP-GD, noised and
    charged; the site requires DP (deployment)."""
    torch.manual_seed(0)
    model = ModelSpec(model="scatter-linear", image_size=32).build()
    reply = train(_message(model), _context(site, {"device": device}, device=NOWHERE, dp=True))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert 0 < _moved(model, reply) < 10 and metrics[NOISE_MULTIPLIER] > 0
    assert metrics[EPSILON] > metrics[EPSILON_BEFORE]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("device", DEVICES)
def test_pretext_and_detection_rounds_run_on_the_sites_device(site, device):
    node = {"require-dp": False, "device": device}
    torch.manual_seed(0)
    pretext = ModelSpec(image_size=32, pretext="rotation").build()
    reply = train(_message(pretext), _context(site, node, device=NOWHERE, pretext="rotation"))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0 < _moved(pretext, reply) < 10 and reply.content["metrics"][VAL_LOSS] > 0
    detector = ModelSpec(image_size=32, detection=True).build()
    reply = train(_message(detector), _context(site, node, device=NOWHERE, detection=True))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0 < _moved(detector, reply) < 10 and reply.content["metrics"][BOX_EXAMPLES] > 0
    scored = evaluate_global(_message(detector, MessageType.EVALUATE),
                             _context(site, node, device=NOWHERE, detection=True))
    assert not scored.has_error() and 0 <= scored.content["metrics"][EVAL_MAP50] <= 1


def _toy(n: int, size: int = 16):
    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 0.1, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    x[y == 1, :, 4:8, 4:8] += 0.4
    return x, y


@pytest.mark.parametrize("device", DEVICES)
def test_dp_noise_comes_from_os_entropy_on_the_training_device(tmp_path, device):
    """Same patients drawn (a seeded sampling rng) and the same seeded noise generator on the device: the same model;
    the default generator: fresh OS entropy every call, on the device too."""
    on = resolve_device(device)
    x, y = _toy(64)
    plan = plan_dp(len(y), batch_size=32, local_epochs=1, rounds=1, target_epsilon=8, delta=1e-5)

    def trained(name: str, noise: torch.Generator | None) -> torch.Tensor:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.csv").write_text("patient_id,image_path,label\n")
        ledger = PrivacyLedger.open(tmp_path / name, delta=1e-5, max_epsilon=100, fingerprint="toy")
        torch.manual_seed(0)
        model = build_model("cnn")
        train_dp(model, PatientData(x, y), plan, ledger,
                 DPSettings(max_grad_norm=1.0, physical_batch_size=32, optimizer="sgd", lr=0.1),
                 sampling_rng=np.random.default_rng(1), noise_generator=noise, device=on)
        assert next(model.parameters()).device.type == on.type
        return torch.cat([p.detach().cpu().flatten() for p in model.parameters()])

    seeded = [trained(f"seeded{i}", torch.Generator(device=on).manual_seed(5)) for i in range(2)]
    fresh = [trained(f"fresh{i}", None) for i in range(2)]
    assert float((seeded[0] - seeded[1]).abs().max()) < 1e-5
    assert float((fresh[0] - fresh[1]).abs().max()) > 1e-3  # the noise (std ~ 0.1 x 1 / 32 a step) differs
    generators = [os_entropy_generator(on) for _ in range(2)]
    assert all(g.device.type == on.type for g in generators)
    assert generators[0].initial_seed() != generators[1].initial_seed()


@pytest.mark.parametrize("device", DEVICES)
def test_the_server_scores_its_holdout_on_the_runs_device_or_stops_before_round_one(generated, device):
    holdout = generated[1]
    with pytest.raises(DeviceUnavailable, match="cuda:999"):
        HoldoutEvaluation(run_config_of({"device": NOWHERE, "image-size": 32}).train, holdout)
    scoring = HoldoutEvaluation(run_config_of({"device": device, "image-size": 32}).train, holdout)
    assert scoring.device == resolve_device(device)
    torch.manual_seed(0)
    model = build_model("cnn")
    metrics = scoring.metrics(model)
    expected = evaluate(model, scoring.loader, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-4) and 0 <= metrics["ece"] <= 1


def test_the_server_refuses_a_card_it_lacks_for_its_holdout_before_it_starts(consortium, generated, tmp_path,
                                                                              capsys):
    code = server_main(["start", "--dir", str(consortium), "--out", str(tmp_path / "run"),
                        "-c", f"device={NOWHERE}", "-c", f"holdout-path={generated[1]}"])
    err = capsys.readouterr().err
    assert code == 2 and "error: run config 'device': device 'cuda:999' is not available here" in err
    assert "holdout-path" in err and not (tmp_path / "run").exists()


def test_a_simulation_asking_for_a_card_this_machine_lacks_stops_before_anything_is_written(tmp_path, capsys):
    from simulations.run import main as simulate
    (tmp_path / "s.toml").write_text(SCENARIO)
    assert simulate([str(tmp_path / "s.toml"), "--out", str(tmp_path / "run"), "-c", f"device={NOWHERE}"]) == 2
    assert "run config 'device': device 'cuda:999' is not available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
