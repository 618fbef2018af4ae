"""Threat: whoever can submit a run to the SuperLink (the consortium server, or anyone who
reaches its Control API) ships an app bundle whose "client code" reads the hospital's data.

A real deployment on 127.0.0.1, every process started here and killed by PID: a
`flower-superlink` (plain HTTP: the transport is not what is tested; tests/test_deployment.py
covers TLS and authentication) and one hospital whose SuperNode and pinned ClientApp runner
are started by `client.supernode.start_node`, the function `equifed-client start` uses
(with `insecure=True`). Three runs are submitted with `flwr run`, in this order:

1. the equifed bundle with client/app.py changed: its first line writes a marker file;
2. the equifed bundle plus one extra python file (client/evil.py) that writes a marker;
3. the bundle of the unmodified checkout (what `equifed-server start` submits).

The hospital must refuse 1 and 2 with "app bundle is not the equifed installed at this
site", without executing any of their code (no marker file), log which files differ, and
train run 3 (one round, a real reply from its ClientApp). The comparison itself (one
changed byte, an extra file, a forged manifest) is checked on bundles built by Flower's
own `build_fab_from_disk`.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from flwr.cli.build import build_fab_from_disk

from client.pinned_runner import BUNDLE_REFUSED, bundle_differences, installed_bundle
from client.supernode import start_node
from core_models.processes import app_snapshot
from server.superlink import LocalSuperLink
from simulations.generator import generate_consortium

pytestmark = pytest.mark.deployment

SCENARIO = """
name = "threats"
seed = 11
image_size = 16

[defaults]
n = 24
prevalence = 0.5
lesion_contrast = 0.8

[[sites]]
name = "site_a"
"""
RUN_CONFIG = {"num-server-rounds": 1, "min-train-nodes": 1, "local-epochs": 1, "image-size": 16, "batch-size": 8,
              "fraction-evaluate": 0.0, "round-timeout": 200, "dp": True}
MARKER_CODE = "import pathlib; pathlib.Path({path!r}).write_text('attacker code ran')\n"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The equifed "installed at the site": a frozen copy of this checkout (the working tree may
    be edited while the test runs; the hospital's installation is not)."""
    return app_snapshot(tmp_path_factory.mktemp("installed") / "equifed")


def tampered_app(dest: Path, installed: Path, marker: Path, how: str) -> Path:
    """The equifed app as `flwr run` would bundle it, with attacker code that writes `marker`."""
    app = app_snapshot(dest, installed)
    if how == "changed-app":
        path = app / "client" / "app.py"
        path.write_text(MARKER_CODE.format(path=str(marker)) + path.read_text())
    elif how == "extra-file":
        (app / "client" / "evil.py").write_text(MARKER_CODE.format(path=str(marker)))
    else:
        raise ValueError(how)
    return app


# --- the comparison on real bundles (no processes) ------------------------------------------
def test_installed_checkout_bundle_is_accepted(tmp_path, installed):
    reference = installed_bundle(installed)
    assert installed_bundle(installed) == reference  # deterministic: fixed dates, sorted files
    # what `flwr run` sends for an unmodified checkout (server/cli.py: a snapshot of it)
    assert bundle_differences(build_fab_from_disk(app_snapshot(tmp_path / "app", installed)), reference) == []


def test_one_changed_byte_or_an_extra_file_is_refused(tmp_path, installed):
    reference = installed_bundle(installed)
    app = app_snapshot(tmp_path / "one_byte", installed)
    path = app / "client" / "app.py"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one byte
    path.write_bytes(bytes(raw))
    assert bundle_differences(build_fab_from_disk(app), reference) == ["changed: client/app.py"]

    app = app_snapshot(tmp_path / "extra", installed)
    (app / "client" / "evil.py").write_text("x = 1\n")
    assert bundle_differences(build_fab_from_disk(app), reference) == ["extra (not installed here): client/evil.py"]

    app = app_snapshot(tmp_path / "missing", installed)
    (app / "client" / "audit.py").unlink()
    assert bundle_differences(build_fab_from_disk(app), reference) == ["missing (installed here): client/audit.py"]

    app = app_snapshot(tmp_path / "config", installed)
    text = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(text.replace('clientapp = "client.app:app"', 'clientapp = "client.evil:app"'))
    assert bundle_differences(build_fab_from_disk(app), reference) == ["changed: pyproject.toml"]


def test_a_forged_manifest_does_not_help(tmp_path, installed):
    """Files are hashed from their bytes: copying the genuine .info/CONTENT over a tampered bundle changes nothing."""
    reference = installed_bundle(installed)
    app = app_snapshot(tmp_path / "forged", installed)
    (app / "client" / "app.py").write_text("raise SystemExit\n")
    tampered = build_fab_from_disk(app)
    genuine_manifest = zipfile.ZipFile(io.BytesIO(reference)).read(".info/CONTENT")
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(tampered)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, genuine_manifest if info.filename == ".info/CONTENT" else src.read(info))
    assert bundle_differences(buf.getvalue(), reference) == ["changed: client/app.py"]
    assert bundle_differences(b"not a zip", reference)[0].startswith("not a readable app bundle")


# --- the attack against a running hospital ----------------------------------------------------
@pytest.fixture(scope="module")
def attacked_site(tmp_path_factory, installed):
    root = tmp_path_factory.mktemp("threats")
    (root / "scenario.toml").write_text(SCENARIO)
    (data,) = generate_consortium(root / "scenario.toml", root / "data")
    markers = {how: root / f"marker_{how}" for how in ("changed-app", "extra-file")}
    facts: dict = {"root": root, "data": data, "markers": markers, "runs": {}, "installed": installed.resolve()}
    t0 = time.time()
    node = None
    with LocalSuperLink(simulation=False, log_path=root / "superlink.log") as link:
        try:
            # the hospital's SuperNode and pinned runner as `equifed-client start` starts them (plain HTTP here)
            node = start_node(link.address, None, None, {"site": "site_a", "data-path": str(data)},
                              log_file=root / "client.log", insecure=True, app_dir=installed)
            link.wait_for_nodes(1, timeout=60, poll=0.5)
            site_log = Path(data) / ".equifed" / "client_errors.log"

            # all three runs at once: the ServerApps start side by side, the SuperNode answers one message at a time
            for how, marker in markers.items():
                app = tampered_app(root / f"app_{how}" / "app", installed, marker, how)
                facts["runs"][how] = link.submit(app, {**RUN_CONFIG, "out-dir": str(root / f"out_{how}")})
            facts["runs"]["genuine"] = link.submit(app_snapshot(root / "app_genuine" / "app", installed),
                                                   {**RUN_CONFIG, "out-dir": str(root / "out_genuine")})
            for how, run_id in facts["runs"].items():
                facts[f"status_{how}"] = link.wait(run_id, timeout=240, poll=1.0)
            facts["site_log"] = site_log.read_text()
            facts["node_alive"] = node.alive()
            facts["wall_s"] = time.time() - t0
            yield facts
        finally:
            if node is not None:
                node.stop()


def test_tampered_bundles_are_refused_and_never_run(attacked_site):
    facts = attacked_site
    for how, marker in facts["markers"].items():
        assert not marker.exists(), f"the {how} bundle's code ran at the site"
    log = facts["site_log"]
    changed, extra = facts["runs"]["changed-app"], facts["runs"]["extra-file"]
    assert f"run {changed}: refused: {BUNDLE_REFUSED}" in log
    assert f"run {extra}: refused: {BUNDLE_REFUSED}" in log
    chunks = log.split("--- ")
    changed_chunk = next(c for c in chunks if f"run {changed}: refused" in c)
    extra_chunk = next(c for c in chunks if f"run {extra}: refused" in c)
    assert "changed: client/app.py" in changed_chunk and "extra" not in changed_chunk
    assert "extra (not installed here): client/evil.py" in extra_chunk and "changed:" not in extra_chunk
    for how in ("changed-app", "extra-file"):  # the ServerApp got its answer (an Error reply) and ended
        assert str(facts[f"status_{how}"]["status"]).startswith("finished"), facts[f"status_{how}"]


def test_the_installed_equifed_still_trains(attacked_site):
    facts = attacked_site
    assert facts["status_genuine"]["status"] == "finished:completed", facts["status_genuine"]
    rows = pd.read_csv(facts["root"] / "out_genuine" / "per_site.csv")
    train = rows[rows["phase"] == "train"]
    assert list(train["site"]) == ["site_a"] and list(train["status"]) == ["ok"], train.to_dict("records")
    assert f"run {facts['runs']['genuine']}: refused" not in facts["site_log"]
    assert facts["node_alive"]
    # the runner pinned the installed copy, not the working tree the test runs from
    assert f"pinned ClientApp runner: equifed from {facts['installed']}," in (facts["root"] / "client.log").read_text()
    print(f"threat scenario wall time {facts['wall_s']:.0f}s")
