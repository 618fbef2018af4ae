"""Fixtures shared by several test modules."""

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def consortium(tmp_path) -> Path:
    """A consortium folder (`setup`) with one registered hospital, `a`, whose keys lie in tmp_path/hospital."""
    from client.cli import make_site_keys
    from server.cli import main as server_main

    cons = tmp_path / "cons"
    assert server_main(["setup", "--dir", str(cons)]) == 0
    _, pub, _ = make_site_keys(tmp_path / "hospital", "a")
    assert server_main(["register", "--dir", str(cons), "--site", "a", "--public-key", str(pub),
                        "--no-register"]) == 0
    return cons


@pytest.fixture
def task_identity():
    """Flower's runtime sets who is sending before any Message is built; tests that call
    the ClientApp's handlers in-process do the same."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


SCENARIO = """
name = "tiny"
seed = 11
image_size = 32

[defaults]
n = 160
prevalence = 0.4
lesion_contrast = 0.6

[[sites]]
name = "alpha"
p_s_a0 = 0.1
p_s_a1 = 0.5

[[sites]]
name = "beta"
p_s_a0 = 0.3
p_s_a1 = 0.7

[holdout]
n = 200
"""

FAST = ["-c", "local-epochs=2", "-c", "batch-size=16", "-c", "learning-rate=0.003", "-c", "image-size=32"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One real federated run several test modules read: our own SuperLink, Flower's simulation engine, two
    generated hospitals (one image broken) x two rounds with a holdout and the shift statistics requested."""
    from simulations.generator import generate_consortium
    from simulations.run import main as simulate

    out = tmp_path_factory.mktemp("sim")
    scenario = out / "tiny.toml"
    scenario.write_text(SCENARIO)
    sites = generate_consortium(scenario, out / "data")
    broken = sorted((sites[1] / "images").glob("*.dcm"))[0]
    broken.write_bytes(b"this is not a DICOM file")
    code = simulate([str(scenario), "--out", str(out), "--rounds", "2", "--timeout", "600", *FAST,
                     "-c", "statistics=shift", "-c", "release-noise=2.0"])
    assert code == 0
    return out
