"""Attacks on the files a deployment handles (threat model: the consortium server, and anyone
who reaches it, is honest-but-curious at best; a hospital trusts only its own client and
settings; nothing from outside is unpickled or executed).

1. Hospital keys: the hospital makes its own key pair (`equifed-client keygen`, private key
   0600 whatever the umask); the server-side commands (`setup`, `register`) never write a
   hospital private key, and refuse one that is sent to them by mistake.
2. The CA key: `setup` writes it outside the server folder; `start` refuses to run while a
   CA key (by name, or by content under another name) sits in the folder.
3. Pickle payloads: a model file or checkpoint whose pickle would run code is refused by
   every loader (client adapt, equifed-audit, the server's checkpoint loader), and the code
   never runs; checkpoints in the new format still round-trip (NaN in the history included).

No Flower process is started; every test takes well under a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.cli import main as client_main
from client.cli import make_site_keys
from server.certs import public_key_fingerprint, read_site_public_key
from server.checkpoint import CheckpointError, load_latest, save_checkpoint
from server.cli import main as server_main

ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")  # PKCS#8, SEC1 or OpenSSH private key


def _private_keys(folder: Path) -> list[Path]:
    return sorted(p for p, data in _files(folder).items() if PEM_PRIVATE.search(data))


# --- 1. the hospital's key pair is made at the hospital ------------------------------------------


def test_keygen_makes_an_owner_only_flower_key_pair(tmp_path, capsys):
    old = os.umask(0)  # a careless umask must not widen the private key
    try:
        assert client_main(["keygen", "--site", "st_aurelia", "--out", str(tmp_path / "keys")]) == 0
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    key, pub = tmp_path / "keys" / "st_aurelia.key", tmp_path / "keys" / "st_aurelia.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) & 0o077 == 0
    # Flower's format: an OpenSSH EC private key, whose public half is the .pub
    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert read_site_public_key(pub) == private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert b"PRIVATE" not in pub.read_bytes()
    # it says which file travels (the .pub, only that one) and the fingerprint the consortium will see
    assert "send the consortium st_aurelia.pub (only that file" in out
    assert public_key_fingerprint(pub) in out

    before = key.read_bytes()
    assert client_main(["keygen", "--site", "st_aurelia", "--out", str(tmp_path / "keys")]) == 2
    assert "not overwritten" in capsys.readouterr().err
    assert key.read_bytes() == before  # a registered key is never replaced by accident
    assert client_main(["keygen", "--site", "../evil", "--out", str(tmp_path / "keys")]) == 2


def test_equifed_client_imports_nothing_from_server(tmp_path):
    code = ("import sys; from client.cli import main; rc = main(['keygen', '--site', 'a', '--out', sys.argv[1]]); "
            "bad = sorted(m for m in sys.modules if m == 'server' or m.startswith('server.')); "
            "print(bad); sys.exit(rc or bool(bad))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "k")], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_server_commands_never_write_a_hospital_private_key(tmp_path, capsys):
    hospitals = {s: tmp_path / f"hospital_{s}" for s in ("a", "b")}
    for site, folder in hospitals.items():
        make_site_keys(folder, site)
    at_hospitals = {s: _files(f) for s, f in hospitals.items()}
    cons = tmp_path / "cons"
    assert server_main(["setup", "--dir", str(cons), "--host", "fl.example.org"]) == 0
    for site, folder in hospitals.items():
        assert server_main(["register", "--dir", str(cons), "--site", site, "--public-key",
                            str(folder / f"{site}.pub"), "--no-register"]) == 0
    out = capsys.readouterr().out
    # a private key sent by mistake is refused, and no copy of it is kept
    assert server_main(["register", "--dir", str(cons), "--site", "c", "--public-key",
                        str(hospitals["a"] / "a.key"), "--no-register"]) == 2
    assert "PRIVATE key" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the old interface that made hospital keys is gone
        server_main(["setup", "--dir", str(cons), "--site", "x"])

    server_side = _files(cons) | _files(tmp_path / "cons-ca-offline")
    assert sorted(p.name for p in _private_keys(cons)) == ["server.key"]
    assert sorted(p.name for p in _private_keys(tmp_path / "cons-ca-offline")) == ["ca.key"]
    for site, files in at_hospitals.items():
        assert _files(hospitals[site]) == files  # nothing at the hospital was touched
        secret = files[hospitals[site] / f"{site}.key"]
        assert all(secret not in data for data in server_side.values())
        assert sorted(p.name for p in (cons / "sites" / site).iterdir()) == [f"{site}.pub"]
        fingerprint = public_key_fingerprint(hospitals[site] / f"{site}.pub")
        assert json.loads((cons / "consortium.json").read_text())["sites"][site]["fingerprint"] == fingerprint
        assert fingerprint in out  # register shows it, to compare with what keygen printed
    assert "register" in out and "ca.crt" in out


# --- 2. the CA key is kept away from the running server ------------------------------------------


def test_setup_writes_the_ca_key_outside_the_server_folder(tmp_path, capsys):
    cons = tmp_path / "cons"
    assert server_main(["setup", "--dir", str(cons)]) == 0
    out = capsys.readouterr().out
    offline = tmp_path / "cons-ca-offline" / "ca.key"
    assert "keep this offline" in out and str(offline) in out
    assert not list(cons.rglob("ca.key"))
    assert stat.S_IMODE(offline.stat().st_mode) == 0o600
    # it is the key of the ca.crt the hospitals trust
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((cons / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key(offline.read_bytes(), password=None)
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()

    assert server_main(["setup", "--dir", str(tmp_path / "c2"), "--ca-key", str(tmp_path / "c2" / "k" / "ca.key")]) == 2
    assert "outside" in capsys.readouterr().err
    # a new --host re-issues the server certificate only with the offline key at hand
    offline.rename(tmp_path / "elsewhere.key")
    assert server_main(["setup", "--dir", str(cons), "--host", "fl.example.org"]) == 2
    assert "--ca-key" in capsys.readouterr().err
    assert server_main(["setup", "--dir", str(cons), "--host", "fl.example.org",
                        "--ca-key", str(tmp_path / "elsewhere.key")]) == 0
    assert not list(cons.rglob("ca.key"))


def test_setup_moves_a_ca_key_left_in_the_folder_by_an_older_layout(tmp_path, capsys):
    cons = tmp_path / "cons"
    assert server_main(["setup", "--dir", str(cons)]) == 0
    offline = tmp_path / "cons-ca-offline" / "ca.key"
    key = offline.read_bytes()
    offline.rename(cons / "ca.key")  # where equifed used to leave it
    capsys.readouterr()
    assert server_main(["setup", "--dir", str(cons)]) == 0
    assert "keep this offline" in capsys.readouterr().out
    assert not (cons / "ca.key").exists() and offline.read_bytes() == key


@pytest.mark.parametrize("where", ["ca.key", "state/ca.key", "backup/consortium-root.pem"])
def test_start_refuses_with_the_ca_key_in_the_server_folder(tmp_path, consortium, capsys, where):
    cons = consortium
    planted = cons / where
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes((tmp_path / "cons-ca-offline" / "ca.key").read_bytes())
    capsys.readouterr()
    assert server_main(["start", "--dir", str(cons), "--out", str(tmp_path / "run"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert str(planted) in err and "CA private key" in err and "offline" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran or was written
    assert not (cons / "state").exists() or not list((cons / "state").glob("superlink*"))

    # once it is gone, start gets past the check (here to the next refusal: an existing run)
    planted.unlink()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest.pt").write_bytes(b"x")
    assert server_main(["start", "--dir", str(cons), "--out", str(tmp_path / "run"), "--port", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err


# --- 3. pickle payloads --------------------------------------------------------------------------


class Payload:
    """Unpickling this calls open(marker, "w"): code from the file runs and leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Model files that look like what the loaders expect, each carrying the payload."""
    state = {"w": torch.zeros(2)}
    files = {
        "state_dict": ({**state, "x": Payload(marker)}, True),
        "round_checkpoint": ({"round": 3, "model": state, "extra": Payload(marker)}, True),
        "bare": (Payload(marker), True),
        "legacy_pickle": ({"model": state, "x": Payload(marker)}, False),
    }
    paths = {}
    for name, (obj, zipped) in files.items():
        path = tmp_path / f"{name}.pt"
        if zipped:
            torch.save(obj, path)
        else:
            with open(path, "wb") as fh:
                pickle.dump(obj, fh)
        paths[name] = path
    assert not marker.exists()
    return paths


def test_the_payload_is_live(tmp_path):
    """The attack is real: loading the file the old way (weights_only=False) runs its code."""
    marker = tmp_path / "PWNED"
    paths = _evil_files(tmp_path, marker)
    torch.load(paths["state_dict"], weights_only=False)
    assert marker.exists()


def test_model_loaders_refuse_pickle_payloads(tmp_path, capsys):
    from client.adapt import load_model_weights
    from fairness.cli import load_weights
    from fairness.cli import main as audit_main

    marker = tmp_path / "PWNED"
    (tmp_path / "no_site").mkdir()  # an empty folder: the model file is what is refused
    preds = tmp_path / "preds.csv"
    preds.write_text("A,S,D,Yhat\n0,0,1,0.7\n1,1,0,0.2\n")
    for name, path in _evil_files(tmp_path, marker).items():
        for loader in (load_model_weights, lambda p: load_weights(p, "cnn")):
            with pytest.raises(ValueError, match=f"model file {path} refused"):
                loader(path)
        # the commands: exit 2 with the file named, before reading anything else
        capsys.readouterr()
        assert client_main(["adapt", "--data", str(tmp_path / "no_site"), "--model", str(path),
                            "--consortium-stats", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
        assert str(path) in capsys.readouterr().err
        assert audit_main(["--predictions", str(preds), "--graph", "synthetic", "--out", str(tmp_path / "a"),
                           "--model", str(path), "--images", str(tmp_path / "no_site")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "weights_only=False" not in err  # no advice to load it unsafely
        assert not marker.exists(), name
    assert not (tmp_path / "o").exists() and not (tmp_path / "a").exists()


def test_model_loaders_refuse_what_is_not_a_state_dict_and_accept_what_is(tmp_path):
    from client.adapt import load_model_weights
    from core_models.networks import build_model
    from fairness.cli import load_weights

    torch.save({"w": "not a tensor"}, tmp_path / "strings.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    for bad in ("strings.pt", "list.pt"):
        with pytest.raises(ValueError, match=f"model file {tmp_path / bad} holds no state dict"):
            load_model_weights(tmp_path / bad)
    torch.manual_seed(0)
    model = build_model("cnn", 2)
    torch.save(model.state_dict(), tmp_path / "final_model.pt")
    save_checkpoint(tmp_path / "run", 1, model.state_dict(), {}, {"global": [], "sites": []})
    for path in (tmp_path / "final_model.pt", tmp_path / "run" / "checkpoints" / "round_001.pt"):
        loaded = load_model_weights(path)
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
        assert isinstance(load_weights(str(path), "cnn"), torch.nn.Module)


def test_checkpoint_loader_refuses_pickle_payloads(tmp_path):
    marker = tmp_path / "PWNED"
    save_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)}, {}, {"global": [], "sites": []})
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    real = torch.load(latest, weights_only=True)
    forged = [
        {**real, "history": Payload(marker)},
        {**real, "strategy": {"m_t": {"w": Payload(marker)}}},
        Payload(marker),
    ]
    for payload in forged:
        torch.save(payload, latest)
        with pytest.raises(CheckpointError, match=f"checkpoint {latest} refused"):
            load_latest(tmp_path / "run")
        assert not marker.exists()
    with open(latest, "wb") as fh:  # legacy (non-zip) pickle
        pickle.dump({"round": 1, "x": Payload(marker)}, fh)
    with pytest.raises(CheckpointError, match=str(latest)):
        load_latest(tmp_path / "run")
    assert not marker.exists()
    # a checkpoint of the old format (numpy arrays pickled) is refused too, with the reason
    torch.save({"round": 1, "model": {"w": torch.zeros(2)}, "strategy": {"m_t": {"w": np.zeros(2)}},
                "history": {"global": [], "sites": []}}, latest)
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        load_latest(tmp_path / "run")
    torch.save({"round": 1, "model": {"w": torch.zeros(2)}}, latest)  # loads safely but is not a checkpoint
    with pytest.raises(CheckpointError, match="not an equifed checkpoint"):
        load_latest(tmp_path / "run")


def test_checkpoint_round_trips_strategy_state_and_nan_history(tmp_path):
    rng = np.random.default_rng(0)
    model = {"conv.weight": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), "n": torch.tensor(4)}
    strategy = {"m_t": {"conv.weight": rng.normal(size=(3, 2)).astype(np.float32)},
                "v_t": {"conv.weight": rng.random((3, 2)), "scalar": np.float64(0.5) * np.ones(())}}
    history = {"global": [{"round": 0, "holdout_auroc": float("nan"), "train_loss": np.float32(0.25),
                           "sites_trained": np.int64(2), "note": None}],
               "sites": [{"round": 1, "site": "a", "status": "ok", "epsilon": float("inf"), "auroc": 0.5}]}
    save_checkpoint(tmp_path, 2, model, strategy, history)
    # the file itself needs nothing beyond weights_only
    raw = torch.load(tmp_path / "checkpoints" / "round_002.pt", weights_only=True)
    assert isinstance(raw["history"], str)
    ckpt = load_latest(tmp_path)
    assert ckpt["round"] == 2
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.items())
    for name, part in strategy.items():
        for k, v in part.items():
            got = ckpt["strategy"][name][k]
            assert isinstance(got, np.ndarray) and got.dtype == v.dtype and got.shape == np.shape(v)
            assert np.array_equal(got, v)
    row = ckpt["history"]["global"][0]
    assert math.isnan(row["holdout_auroc"]) and row["train_loss"] == 0.25 and row["sites_trained"] == 2
    assert row["note"] is None
    assert ckpt["history"]["sites"] == history["sites"]
    assert load_latest(tmp_path / "nothing") is None
