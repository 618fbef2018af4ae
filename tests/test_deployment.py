"""A real deployment on 127.0.0.1: `equifed-server` (SuperLink with TLS, SuperNode
authentication, a database file) and one `equifed-client` per hospital, all separate
processes started and killed by PID here. One scenario, in this order:

1. each hospital makes its own key pair (`equifed-client keygen`) and sends the public key;
   set-up makes the CA (its key outside the server folder) and the server certificate, and
   `register` puts the 3 public keys on the allow-list; a 4th hospital (a stranger) makes a
   key pair that is never registered. Each hospital receives only ca.crt;
2. the 3 hospitals and the stranger start first and back off (no server yet); the server
   starts a 2-round DP run with secure aggregation (`secagg=true`); the hospitals connect; the
   stranger is refused;
3. once site_b has received round 1's task its client is killed: round 1's secure sum is that
   of site_a and site_c (threshold 2 of 2), site_b is restarted at once;
4. as soon as round 1 is checkpointed the whole server (command, SuperLink, ServerApp) is
   SIGKILLed and restarted with --resume: round 2 is a secure sum of the 3 sites (threshold 2);
5. a run whose ServerApp fails makes `equifed-server start` exit 1.

Each test below checks one part of the outcome. Runs alone with
`pytest -q tests/test_deployment.py` (or `-m deployment`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from client.ledger import dataset_fingerprint, ledger_report
from client.supernode import EXIT_REFUSED, probe_server
from core_models.networks import build_model
from core_models.secagg import (STAGE_ADVERTISE_KEYS, STAGE_COLLECT_MASKED_INPUT, STAGE_SHARE_KEYS, STAGE_UNMASK,
                                STAGES, VectorLayout)
from client.cli import main as client_main
from client.cli import make_site_keys
from server.cli import main as server_main
from core_models.processes import free_port, kill_tree
from simulations.generator import generate_consortium

pytestmark = pytest.mark.deployment

SITES = ["site_a", "site_b", "site_c"]
ROUNDS = 2
SCENARIO = """
name = "deploy"
seed = 5
image_size = 32

[defaults]
n = 40
prevalence = 0.4
lesion_contrast = 0.8

[[sites]]
name = "site_a"

[[sites]]
name = "site_b"

[[sites]]
name = "site_c"
"""
RUN_CONFIG = ["model=cnn", "local-epochs=1", "image-size=32", "batch-size=16", "dp=true", "fraction-evaluate=0",
              "round-timeout=300", "strategy=fedprox", "secagg=true"]
TRAIN_METRICS = {"train-loss", "val-auroc", "val-loss", "num-examples", "rejected", "steps", "epsilon-before",
                 "epsilon", "epsilon-train", "epsilon-release", "noise-multiplier"}


class Procs:
    """Every process the scenario starts; whatever is left is killed at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
        log.close()
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def kill_all(self) -> None:
        for proc in self.started.values():
            kill_tree(proc.pid, hard=True)
            proc.wait()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")


def tls_checks(port: int, ca: Path) -> dict:
    """The SuperLink speaks TLS with a certificate that only the consortium's CA vouches for."""
    out = {}
    probe_server(f"127.0.0.1:{port}", ca)  # raises if the handshake or the verification fails
    out["verified_with_ca"] = True
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            with ssl.create_default_context().wrap_socket(sock, server_hostname="127.0.0.1"):
                out["verified_without_ca"] = True
    except ssl.SSLCertVerificationError:
        out["verified_without_ca"] = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        try:
            out["plain_http_reply"] = sock.recv(100)
        except (socket.timeout, ConnectionResetError):
            out["plain_http_reply"] = b""
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    (root / "scenario.toml").write_text(SCENARIO)
    data = generate_consortium(root / "scenario.toml", root / "data")
    stranger_data = root / "stranger_data"
    shutil.copytree(data[1], stranger_data)
    cons, out = root / "consortium", root / "run"
    procs = Procs(root)
    facts: dict = {"root": root, "data": dict(zip(SITES, data)), "out": out, "procs": procs, "cons": cons}
    t0 = time.time()
    try:
        def cli(module: str, *args: str) -> subprocess.CompletedProcess:
            """The command's main() in this process (the same code `equifed-client` / `equifed-server` run,
            without a Python start-up per call); its output captured."""
            main = {"client.cli": client_main, "server.cli": server_main}[module]
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
            assert code == 0, out.getvalue() + err.getvalue()
            return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

        hospital = {s: root / f"hospital_{s}" for s in [*SITES, "stranger"]}  # what each hospital keeps
        facts["hospital"] = hospital
        for site, folder in hospital.items():
            cli("client.cli", "keygen", "--site", site, "--out", str(folder))
        facts["setup_stdout"] = cli("server.cli", "setup", "--dir", str(cons), "--host", "127.0.0.1").stdout
        for i, site in enumerate(SITES):  # the last call registers them all with the SuperLink's database
            extra = ["--no-register"] if i < len(SITES) - 1 else []
            facts[f"register_{site}"] = cli("server.cli", "register", "--dir", str(cons), "--site", site,
                                            "--public-key", str(hospital[site] / f"{site}.pub"), *extra).stdout
        for folder in hospital.values():  # all the consortium sends a hospital (with the server address)
            shutil.copyfile(cons / "ca.crt", folder / "ca.crt")
        stranger_key = hospital["stranger"] / "stranger.key"

        port = free_port()
        base_args = ["server.cli", "start", "--dir", str(cons), "--out", str(out), "--host", "127.0.0.1",
                     "--port", str(port), "--rounds", str(ROUNDS), "--min-sites", "2", "--connect-timeout", "120",
                     "--timeout", "600"]
        server_args = base_args + [a for c in RUN_CONFIG for a in ("-c", c)]

        def client_args(site: str, data_dir: Path, key: Path, *extra: str) -> list[str]:
            return ["client.cli", "start", "--site", site, "--data", str(data_dir), "--server",
                    f"127.0.0.1:{port}", "--ca", str(hospital[site] / "ca.crt"), "--key", str(key),
                    "--image-size", "32", "--audit-log", str(root / f"audit_{site}.jsonl"), *extra]

        clients = {s: procs.start(f"client_{s}", client_args(s, facts["data"][s], hospital[s] / f"{s}.key"))
                   for s in SITES}
        stranger = procs.start("stranger", client_args("stranger", stranger_data, stranger_key,
                                                       "--auth-retries", "0", "--max-wait", "300"))
        # the hospitals are up before the server: they back off and retry until it listens
        wait_for(lambda: "unreachable" in procs.log("client_site_a"), 120, "site_a to find no server")
        server = procs.start("server1", server_args)
        facts["stranger_rc"] = stranger.wait(timeout=180)
        facts["tls"] = tls_checks(port, cons / "ca.crt")

        # round 1 has reached site_b: kill its client (the hospital goes away), then bring it back
        ckpt = out / "checkpoints"
        wait_for(lambda: "Receiving: train message" in procs.log("client_site_b"), 300, "site_b's round 1 task")
        clients["site_b"].send_signal(signal.SIGTERM)
        facts["site_b_stop_rc"] = clients["site_b"].wait(timeout=60)
        clients["site_b"] = procs.start("client_site_b_again",
                                        client_args("site_b", facts["data"]["site_b"],
                                                    hospital["site_b"] / "site_b.key"))

        # the server machine dies right after round 1: SIGKILL to the command and all it started
        wait_for(lambda: (ckpt / "round_001.pt").exists(), 400, "round 1")
        kill_tree(server.pid, hard=True)
        server.wait()
        # what a resume starts from (per_site.csv may be half-written: the crash can hit anywhere)
        latest = torch.load(ckpt / "latest.pt", weights_only=True)  # tensors, numbers, strings only
        history = json.loads(latest["history"])
        facts["rounds_before_crash"] = (latest["round"], sorted({r["round"] for r in history["sites"]}))
        server = procs.start("server2", base_args + ["--resume"])  # as the README says: no -c flags again
        facts["server2_rc"] = server.wait(timeout=400)

        # a run that fails (the ServerApp raises at once on a damaged checkpoint): the command must say so, exit 1
        (root / "failing" / "checkpoints").mkdir(parents=True)
        (root / "failing" / "checkpoints" / "latest.pt").write_bytes(b"half a file")
        failing = procs.start("server3", ["server.cli", "start", "--dir", str(cons), "--out", str(root / "failing"),
                                          "--host", "127.0.0.1", "--port", str(port), "--rounds", "1",
                                          "--wait-for-sites", "1", "--resume"])
        facts["server3_rc"] = failing.wait(timeout=300)

        for site, proc in clients.items():
            proc.send_signal(signal.SIGTERM)
            facts[f"{site}_rc"] = proc.wait(timeout=60)
        try:  # Flower's helper processes notice their parent is gone within a few seconds
            wait_for(lambda: not ours(root), 20, "helper processes to exit", poll=1)
        except TimeoutError:
            pass
        facts["leftovers"] = [" ".join(p.info["cmdline"]) for p in ours(root)]
        facts["wall_s"] = time.time() - t0
        yield facts
    finally:
        procs.kill_all()
        for proc in ours(root):
            kill_tree(proc.pid, hard=True)


def ours(root: Path) -> list[psutil.Process]:
    """Processes whose command line names the test's folder (SuperLink, SuperNodes, clients)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(root) in part for part in (proc.info["cmdline"] or [])):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def train_rows(facts) -> pd.DataFrame:
    per_site = pd.read_csv(facts["out"] / "per_site.csv")
    return per_site[per_site["phase"] == "train"]


def test_setup_and_tls(deployment):
    cons = deployment["cons"]
    assert f"allow-list: {len(SITES)} site key(s)" in deployment[f"register_{SITES[-1]}"]
    assert "keep this offline" in deployment["setup_stdout"]
    assert not list(cons.rglob("ca.key")) and (cons.parent / f"{cons.name}-ca-offline" / "ca.key").is_file()
    for site in SITES:
        # the consortium holds the hospital's public key only; the private key never left the hospital
        assert sorted(p.name for p in (cons / "sites" / site).iterdir()) == [f"{site}.pub"]
        key = deployment["hospital"][site] / f"{site}.key"
        assert key.stat().st_mode & 0o777 == 0o600
        assert key.read_bytes() not in {p.read_bytes() for p in cons.rglob("*") if p.is_file()}
    pem_private = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")  # any PEM/OpenSSH private key
    private = [p.relative_to(cons) for p in cons.rglob("*") if p.is_file() and pem_private.search(p.read_bytes())]
    assert private == [Path("server.key")]  # the server's own TLS key, nothing else
    tls = deployment["tls"]
    assert tls["verified_with_ca"] is True
    assert tls["verified_without_ca"] is False  # nobody else vouches for the consortium's server
    assert not tls["plain_http_reply"].startswith(b"HTTP")  # no unencrypted service on the port


def test_unregistered_supernode_is_refused(deployment):
    procs = deployment["procs"]
    assert deployment["stranger_rc"] == EXIT_REFUSED
    assert "public key is not on the consortium's allow-list" in procs.log("stranger")
    superlink_log = (deployment["cons"] / "state" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert "stranger" not in set(pd.read_csv(deployment["out"] / "per_site.csv")["site"])
    # the data summary came first: the stranger's folder was checked before it tried to connect
    assert procs.log("stranger").index("images   40 usable") < procs.log("stranger").index("connecting to")


def test_every_site_completes_the_run(deployment):
    assert deployment["server2_rc"] == 0, deployment["procs"].log("server2")
    summary = json.loads((deployment["out"] / "summary.json").read_text())
    assert summary["flower_status"] == "finished:completed"
    train = train_rows(deployment)
    assert sorted(train["round"].unique()) == [1, 2]
    ok = train[(train["round"] == 2) & (train["status"] == "ok")]
    assert sorted(ok["site"]) == SITES
    for site in SITES:
        assert "images   40 usable" in deployment["procs"].log(f"client_{site}")
        assert deployment[f"{site}_rc"] == 0  # SIGTERM stops a client cleanly
    assert deployment["leftovers"] == []


def test_clients_retry_until_the_server_is_back(deployment):
    procs = deployment["procs"]
    log_a = procs.log("client_site_a")
    # started before the server: the client backed off, then connected
    assert log_a.index("unreachable") < log_a.index("connecting to")
    # the server crash did not need the hospital: the same SuperNode reconnected by itself
    assert log_a.count("connecting to") == 1
    assert "Connection attempt failed, retrying" in log_a


def test_failed_run_exits_non_zero(deployment):
    assert deployment["server3_rc"] == 1
    assert re.search(r"run \d+ FAILED \(finished:failed: .*latest\.pt refused", deployment["procs"].log("server3"))
    assert not (deployment["root"] / "failing" / "summary.json").exists()


def test_dropout_in_round_1_and_rejoin(deployment):
    assert deployment["site_b_stop_rc"] == 0
    train = train_rows(deployment)
    round1 = train[train["round"] == 1]
    assert sorted(round1[round1["status"] == "ok"]["site"]) == ["site_a", "site_c"]
    # a site that has never replied is known to the server by its node id only: the id site_b replies from later
    site_b_node = train[(train["round"] == 2) & (train["site"] == "site_b")]["node"].iloc[0]
    missing = round1[round1["status"] != "ok"]
    assert missing[["site", "node", "status"]].values.tolist() == [[f"node-{site_b_node}", site_b_node, "no reply"]]
    metrics = pd.read_csv(deployment["out"] / "metrics.csv").set_index("round")
    assert metrics.loc[1, "sites_trained"] == 2
    assert metrics.loc[2, "sites_trained"] == 3
    assert ((train["round"] == 2) & (train["site"] == "site_b") & (train["status"] == "ok")).sum() == 1


def test_server_crash_resumes_round_count(deployment):
    assert deployment["rounds_before_crash"] == (1, [1])
    server2 = deployment["procs"].log("server2")
    assert re.search(r"stopped run\(s\) \d+ left unfinished", server2)  # the crashed run is closed
    flower_log = (deployment["out"] / "flower.log").read_text()
    assert "resuming" in flower_log and "after round 1 of 2" in flower_log
    assert "Number of rounds: 1" in flower_log  # the resumed ServerApp runs round 2 only
    resumed = flower_log[flower_log.index("resuming"):]
    assert "TrackedFedProx" in resumed and "TrackedFedAvg" not in resumed  # the run's own settings, not defaults
    summary = json.loads((deployment["out"] / "summary.json").read_text())
    assert summary["strategy"] == "fedprox" and summary["run_config"]["dp"] is True
    assert summary["run_config"]["secagg"] is True
    metrics = pd.read_csv(deployment["out"] / "metrics.csv")
    assert metrics["round"].tolist() == [0, 1, 2]  # history kept, counter continued, nothing redone
    train = train_rows(deployment)
    assert train.groupby(["round", "site"]).size().max() == 1
    ckpts = sorted(p.name for p in (deployment["out"] / "checkpoints").glob("round_*.pt"))
    assert ckpts == ["round_001.pt", "round_002.pt"]


def test_each_round_is_a_secure_sum_of_the_sites_that_trained(deployment):
    """Round 1 sums site_a and site_c (site_b left before replying), round 2 all three; the server records every
    trained model as reaching the global one only inside the sum, and round 2's sum moved the global model."""
    train = train_rows(deployment)
    ok = train[train["status"] == "ok"]
    assert sorted(ok["aggregation"].unique()) == ["secure"]
    assert len(ok) == 5  # 2 + 3: no trained site was left out of its round's sum
    summary = json.loads((deployment["out"] / "summary.json").read_text())
    assert summary["secure_aggregation"] is True
    assert sorted(ok[ok["round"] == 1]["site"]) == ["site_a", "site_c"]  # threshold 2 of 2
    # flower.log is the resumed run's (round 2): its sum and its round table
    flower_log = (deployment["out"] / "flower.log").read_text()
    assert re.search(r"round 2: secure sum of 3 site\(s\), 0 left", flower_log)
    assert "no secure sum" not in flower_log
    secure = sorted(re.findall(r"round +2 \| (site_\w) +\|.*\| ok \(secure sum\)", flower_log))
    assert secure == SITES
    ckpt = deployment["out"] / "checkpoints"
    before, after = (torch.load(ckpt / f"round_00{r}.pt", weights_only=True)["model"] for r in (1, 2))
    assert before.keys() == after.keys()
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = max(float((after[k].double() - before[k].double()).abs().max()) for k in after)
    assert changed > 1e-4, changed  # the 3-site sum moved the model (quantisation alone is below 1e-6)


def test_epsilon_never_decreases(deployment):
    train = train_rows(deployment)
    ok = train[train["status"] == "ok"].sort_values("round")
    for site in SITES:
        rows = ok[ok["site"] == site]
        eps = rows["epsilon"].tolist()
        assert all(b > a for a, b in zip(eps, eps[1:])), (site, eps)
        # what a site had spent before a round is at least what it had after the previous one
        assert all(before >= prev - 1e-9 for prev, before in zip(eps, rows["epsilon-before"].tolist()[1:]))
        spent = ledger_report(deployment["data"][site])["epsilon"]  # every history composed
        assert spent >= eps[-1] - 1e-9
        assert spent < 10.0  # the default site budget was never passed
    # the consortium's registry (kept across runs, in the consortium's state) holds each
    # site's last epsilon, so a site coming back with a reset ledger would be refused
    registry = json.loads((deployment["cons"] / "state" / "privacy_registry.json").read_text())
    last = {r["site"]: r["epsilon"] for r in registry.values()}
    assert last == pytest.approx({s: ok[ok["site"] == s]["epsilon"].iloc[-1] for s in SITES})


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_message_audit(deployment):
    """Every message a site sent: in a train reply the declared scalar metrics, the site's name and a dataset hash,
    no model (it waits at the site for the secure sum); then, per round, the four secure-sum replies: two public
    keys, one encrypted share per peer, one masked vector of the model's length and the shares asked for; nothing
    else."""
    model = {k: v.numpy() for k, v in build_model("cnn", 2).state_dict().items()}
    vector = [VectorLayout.of(model).size + 1]  # weight x model, then the weight
    train = train_rows(deployment)
    for site in SITES:
        manifest = pd.read_csv(deployment["data"][site] / "manifest.csv", dtype=str)
        secrets = set(manifest["patient_id"]) | {Path(p).name for p in manifest["image_path"]}
        secrets.add(dataset_fingerprint(deployment["data"][site]))  # what an adversary could hash for itself
        entries = [json.loads(line) for line in (deployment["root"] / f"audit_{site}.jsonl").read_text().splitlines()]
        assert entries, site
        stages: dict[int, list[str]] = {}
        for entry in entries:
            assert "error" not in entry and "raised" not in entry, entry
            if entry["message_type"] == "train":
                _check_train_reply(entry, site)
            else:
                assert entry["message_type"] == "train.secagg", entry
                stages.setdefault(entry["server_round"], []).append(_check_secagg_reply(entry, vector))
            for text in _strings({k: v for k, v in entry.items() if k not in ("message_type", "reply_to")}):
                assert "/" not in text and str(deployment["root"]) not in text, text
                assert text not in secrets, text
        # every round the server recorded for this site is in the site's own log, with the whole secure sum
        audited = {e["server_round"] for e in entries if e["message_type"] == "train"}
        recorded = set(train[(train["site"] == site) & (train["status"] == "ok")]["round"])
        assert recorded <= audited, (site, recorded, audited)
        # (a task Flower re-ran after its token lapsed may be logged twice: one stage, answered from the same state)
        stages = {r: [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]] for r, seq in stages.items()}
        assert stages == {r: list(STAGES) for r in recorded}, (site, stages)


def _check_train_reply(entry: dict, site: str) -> None:
    assert entry["arrays"] == {}  # the trained model stays in the site's Context until the secure sum
    assert set(entry["metrics"]) == {"metrics"}
    metrics = entry["metrics"]["metrics"]
    assert set(metrics) == TRAIN_METRICS
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # scalars, no per-record lists
    assert set(entry["configs"]) == {"site", "privacy", "disclosure"}
    assert entry["configs"]["site"] == {"name": site}
    # under DP the FedAvg weight is the noised patient count; losses and AUROCs are withheld (NaN)
    assert entry["configs"]["disclosure"] == {"noised": "num-examples",
                                              "withheld": "train-loss,val-auroc,val-loss,rejected"}
    assert all(math.isnan(metrics[k]) for k in ("train-loss", "val-auroc", "val-loss", "rejected"))
    assert set(entry["configs"]["privacy"]) == {"dataset-tag"}  # keyed: never the fingerprint itself
    assert re.fullmatch(r"[0-9a-f]{64}", entry["configs"]["privacy"]["dataset-tag"])


def _check_secagg_reply(entry: dict, vector: list[int]) -> str:
    """One secure-sum reply holds exactly its stage's record; returns the stage."""
    assert entry["metrics"] == {}
    if entry["arrays"]:  # stage 3: the masked vector, nothing else
        assert entry["configs"] == {}
        assert entry["arrays"] == {"secagg": {"masked-input": {"shape": vector, "dtype": "uint32"}}}
        return STAGE_COLLECT_MASKED_INPUT
    assert set(entry["configs"]) == {"secagg"}
    record = entry["configs"]["secagg"]
    stage = record["stage"]
    if stage == STAGE_ADVERTISE_KEYS:
        assert set(record) == {"stage", "mask-key", "encryption-key"}
        assert all(set(record[k]) == {"bytes"} for k in ("mask-key", "encryption-key"))
    elif stage == STAGE_SHARE_KEYS:
        assert set(record) == {"stage", "destinations", "ciphertexts"}
        assert len(record["ciphertexts"]) == len(record["destinations"]) >= 1  # one per peer, encrypted to it
        assert all(set(c) == {"bytes"} for c in record["ciphertexts"])
    else:
        assert stage == STAGE_UNMASK, record
        assert set(record) == {"stage", "seed-owners", "seed-shares", "key-owners", "key-shares"}
        assert record["key-owners"] == record["key-shares"] == []  # no site dropped after sharing keys
        assert len(record["seed-shares"]) == len(record["seed-owners"]) >= 2  # the survivors' self-mask seeds
    return stage


# --- quick checks of the commands' own refusals (no Flower process needed) -------------------------


def test_client_refuses_a_broken_data_folder_before_connecting(tmp_path, capsys):
    from client.cli import main as client_main

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.csv").write_text("patient_id,image_path,label\np1,missing.dcm,1\n")
    key, pub, _ = make_site_keys(tmp_path / "keys", "x")
    code = client_main(["start", "--site", "x", "--data", str(tmp_path / "site"), "--server", "127.0.0.1:1",
                        "--ca", str(pub), "--key", str(key), "--max-wait", "0"])
    err = capsys.readouterr()
    assert code == 2
    assert "site x not started" in err.err and "no usable images" in err.err
    assert "connecting to" not in err.out  # it never tried the server


def test_setup_keeps_keys_and_start_protects_an_existing_run(tmp_path, capsys):
    from server.cli import main as server_main

    cons = tmp_path / "cons"
    a_key, a_pub, _ = make_site_keys(tmp_path / "hospital_a", "a")
    _, b_pub, _ = make_site_keys(tmp_path / "hospital_b", "b")
    assert server_main(["setup", "--dir", str(cons)]) == 0
    assert server_main(["register", "--dir", str(cons), "--site", "a", "--public-key", str(a_pub),
                        "--no-register"]) == 0
    index = json.loads((cons / "consortium.json").read_text())
    ca_before, cert_before = (cons / "ca.crt").read_bytes(), (cons / "server.crt").read_bytes()
    assert server_main(["setup", "--dir", str(cons)]) == 0
    assert server_main(["register", "--dir", str(cons), "--site", "b", "--public-key", str(b_pub),
                        "--no-register"]) == 0
    again = json.loads((cons / "consortium.json").read_text())
    assert again["sites"]["a"] == index["sites"]["a"]  # same key: the hospital's key stays valid
    assert sorted(again["sites"]) == ["a", "b"]
    assert (cons / "ca.crt").read_bytes() == ca_before and (cons / "server.crt").read_bytes() == cert_before
    capsys.readouterr()
    # a bad name, another site's key, a changed key without --replace, a private key: all refused
    assert server_main(["register", "--dir", str(cons), "--site", "../evil", "--public-key", str(b_pub),
                        "--no-register"]) == 2
    assert server_main(["register", "--dir", str(cons), "--site", "c", "--public-key", str(b_pub),
                        "--no-register"]) == 2
    assert "already registered for site 'b'" in capsys.readouterr().err
    _, a2_pub, _ = make_site_keys(tmp_path / "hospital_a_new", "a")
    assert server_main(["register", "--dir", str(cons), "--site", "a", "--public-key", str(a2_pub),
                        "--no-register"]) == 2
    assert "--replace" in capsys.readouterr().err
    assert server_main(["register", "--dir", str(cons), "--site", "z", "--public-key", str(a_key),
                        "--no-register"]) == 2
    assert "PRIVATE key" in capsys.readouterr().err
    assert json.loads((cons / "consortium.json").read_text()) == again

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest.pt").write_bytes(b"x")
    capsys.readouterr()
    assert server_main(["start", "--dir", str(cons), "--out", str(out), "--port", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
