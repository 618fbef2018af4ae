"""Fixtures shared by several test modules, and how `make test` spreads the suite over two workers."""

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

# Tests that start Flower's simulation engine: the fixtures that run one, and the `simulation` mark.
SIMULATION_FIXTURES = {"tiny_run", "run_dir", "dp_run", "stopped_run", "sites_run"}
DEPLOYMENT_MODULES = {"test_deployment", "test_threats_deployment"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist's `--dist loadgroup`: every simulation in one worker (two Ray clusters on one
    machine can race for Ray's default ports), the deployments together, every other module as one unit (its
    module fixtures are built once). The two long groups go first, so neither is left for the end."""
    def group(item) -> str:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if SIMULATION_FIXTURES & set(item.fixturenames) or item.get_closest_marker("simulation"):
            return "simulation"
        return "deployment" if module in DEPLOYMENT_MODULES else module

    order = {"simulation": 0, "deployment": 1}
    groups = {item.nodeid: group(item) for item in items}
    items.sort(key=lambda item: order.get(groups[item.nodeid], 2))  # stable: each group keeps its order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))


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

# one Ray actor (on the 2 CPUs the suite has): the sites train one after the other, the ClientApp is imported once
ONE_ACTOR = ["--cpus-per-client", "2"]
FAST = ["-c", "local-epochs=2", "-c", "batch-size=16", "-c", "learning-rate=0.003", "-c", "image-size=32", *ONE_ACTOR]


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
