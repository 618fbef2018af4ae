"""A hospital's side of a real deployment: check the local data, then run Flower's
SuperNode against the consortium's server, over TLS, with the site's key.

Order matters: the data folder is validated first (manifest, readable images, patient
split without leakage, privacy ledger), so a broken folder fails here with a clear
message instead of inside a training round on the server's clock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

from client.ledger import LedgerError, ledger_report
from client.site import STATE_DIR, open_site, site_max_epsilon
from server.superlink import _bin, free_port, kill_tree

REFUSED_MARKERS = ("Failed to activate SuperNode", "No SuperNode found with the given public key")
EXIT_REFUSED = 3  # the server does not know this site's key
EXIT_UNREACHABLE = 4  # no server within --max-wait
EXIT_BAD_DATA = 2


class DataFolderError(RuntimeError):
    """The site's data folder cannot be used; the message says why."""


@dataclass
class DataSummary:
    site: str
    path: Path
    images: int
    rejected: int
    patients: int
    labels: dict[int, int]
    splits: dict[str, int]
    rejection_reasons: dict[str, int]
    max_epsilon: float
    epsilon_spent: float | None

    def lines(self) -> list[str]:
        spent = "none yet" if self.epsilon_spent is None else f"{self.epsilon_spent:.3f}"
        out = [
            f"site {self.site}: {self.path}",
            f"  images   {self.images} usable, {self.rejected} rejected; {self.patients} patients",
            f"  labels   " + ", ".join(f"{k}: {v}" for k, v in sorted(self.labels.items())),
            f"  split    " + ", ".join(f"{k} {self.splits.get(k, 0)}" for k in ("train", "val", "test"))
            + "  (per patient, no patient in two parts)",
            f"  privacy  budget epsilon {self.max_epsilon:g}, spent {spent}",
        ]
        for reason, n in sorted(self.rejection_reasons.items(), key=lambda kv: -kv[1])[:3]:
            out.append(f"  rejected {n} x {reason}")
        return out


def check_data(path: Path, site: str | None = None, image_size: int = 64, seed: int = 0,
               node_config: dict | None = None) -> DataSummary:
    """Load the site exactly as the ClientApp will; raise DataFolderError on anything unusable."""
    path = Path(path).expanduser().resolve()
    if not (path / "manifest.csv").exists():
        raise DataFolderError(f"{path} has no manifest.csv (columns patient_id, image_path, label)")
    try:
        local = open_site(path, image_size=image_size, seed=seed, name=site)
    except Exception as err:  # manifest errors, leakage, unreadable folder: all stop the site here
        raise DataFolderError(f"{path}: {type(err).__name__}: {err}") from err
    if local.count("train") == 0:
        raise DataFolderError(f"{path}: no training images after the patient split")
    try:
        report = ledger_report(path)
        spent = max((d["epsilon"] for d in report["datasets"]), default=0.0)
    except FileNotFoundError:
        spent = None
    except LedgerError as err:
        raise DataFolderError(f"privacy ledger: {err}") from err
    frame = local.data.frame
    return DataSummary(
        site=local.name, path=path, images=len(local.data.labels), rejected=len(local.data.rejected),
        patients=int(frame["patient_id"].astype(str).nunique()),
        labels={int(k): int(v) for k, v in Counter(local.data.labels.tolist()).items()},
        splits={k: local.count(k) for k in ("train", "val", "test")},
        rejection_reasons=dict(Counter(r.reason.split(":")[0] for r in local.data.rejected)),
        max_epsilon=site_max_epsilon(path, node_config or {}), epsilon_spent=spent,
    )


def probe_server(address: str, ca: Path, timeout: float = 5.0) -> None:
    """One TLS handshake with the server, verifying its certificate against the CA.
    Raises OSError when unreachable, ssl.SSLCertVerificationError on a wrong certificate."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=host.strip("[]")):
            pass


def wait_for_server(address: str, ca: Path, max_wait: float, stop: threading.Event | None = None) -> bool:
    """Back-off (1 s doubling to 30 s) until the server answers a TLS handshake; False when
    `max_wait` passes or `stop` is set first."""
    stop = stop or threading.Event()
    delay, deadline = 1.0, time.time() + max_wait
    while not stop.is_set():
        try:
            probe_server(address, ca)
            return True
        except ssl.SSLCertVerificationError:
            raise
        except OSError as err:
            if time.time() + delay > deadline:
                return False
            print(f"server {address} unreachable ({err.__class__.__name__}: {err}); retrying in {delay:.0f}s",
                  flush=True)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
    return False


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _env(flwr_home: Path) -> dict[str, str]:
    """The SuperNode starts `flower-superexec` by name: this interpreter's bin goes first on
    PATH. Its FLWR_HOME (where the consortium's app is unpacked) is the site's own."""
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def supernode_command(server: str, ca: Path, key: Path, node_config: dict, runtime_port: int) -> list[str]:
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
    return [_bin("flower-supernode"), "--superlink", server, "--root-certificates", str(Path(ca).resolve()),
            "--auth-supernode-private-key", str(Path(key).resolve()), "--node-config", config,
            "--port", str(runtime_port)]


class SuperNodeProcess:
    """flower-supernode as a child: its output is echoed (and kept, to tell a refused key
    from a network failure); stopped with its whole process tree."""

    def __init__(self, command: list[str], log_file: Path | None, env: dict | None = None):
        self.refused = False
        self._family: set[psutil.Process] = set()
        self._log = open(log_file, "a", encoding="utf-8") if log_file else None
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, bufsize=1)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            if any(marker in line for marker in REFUSED_MARKERS):
                self.refused = True
            sys.stdout.write(line)
            sys.stdout.flush()
            if self._log and not self._log.closed:
                self._log.write(line)
                self._log.flush()

    def alive(self) -> bool:
        """Whether the SuperNode runs; remembers its descendants so that stop() finds them
        even after the SuperNode itself has died."""
        try:
            self._family.update(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        return self.process.poll() is None

    def wait(self) -> int:
        code = self.process.wait()
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        kill_tree(self.process.pid)
        for proc in self._family:
            if proc.is_running():
                kill_tree(proc.pid)
        self.wait()
        if self._log and not self._log.closed:
            self._log.close()


def run_site(site: str, data: Path, server: str, ca: Path, key: Path, *, image_size: int = 64, seed: int = 0,
             max_epsilon: float | None = None, audit_log: Path | None = None, runtime_port: int | None = None,
             max_wait: float = 3600, auth_retries: int = 2, log_file: Path | None = None) -> int:
    """Validate, summarise, connect; restart the SuperNode with back-off if it stops.
    Returns the process exit code (0 after SIGTERM/Ctrl-C)."""
    for what, path in (("CA certificate", ca), ("site key", key)):
        if not Path(path).exists():
            print(f"error: {what} {path} not found", file=sys.stderr)
            return EXIT_BAD_DATA
    node_config: dict = {"site": site, "data-path": str(Path(data).expanduser().resolve())}
    if max_epsilon is not None:
        node_config["max-epsilon"] = float(max_epsilon)
    if audit_log is not None:
        node_config["audit-log"] = str(Path(audit_log).resolve())
    try:
        summary = check_data(Path(data), site=site, image_size=image_size, seed=seed, node_config=node_config)
    except DataFolderError as err:
        print(f"error: site {site} not started: {err}", file=sys.stderr)
        return EXIT_BAD_DATA
    print("\n".join(summary.lines()), flush=True)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    command = supernode_command(server, ca, key, node_config, runtime_port or free_port())
    flwr_home = Path(node_config["data-path"]) / STATE_DIR / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    delay, refusals, deadline = 2.0, 0, time.time() + max_wait
    while not stopping.is_set():
        try:
            if not wait_for_server(server, ca, max(deadline - time.time(), 0), stopping):
                if stopping.is_set():
                    break
                print(f"error: server {server} unreachable for {max_wait:.0f}s; giving up", file=sys.stderr)
                return EXIT_UNREACHABLE
        except ssl.SSLCertVerificationError as err:
            print(f"error: the server at {server} is not the consortium's (TLS: {err.verify_message}); "
                  f"check --server and --ca", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"site {site}: connecting to {server} (TLS, key {Path(key).name})", flush=True)
        node = SuperNodeProcess(command, log_file, env=_env(flwr_home))
        started = time.time()
        while node.alive() and not stopping.is_set():
            time.sleep(0.5)
        if time.time() - started > 60:  # it was connected: a later outage gets the full patience again
            delay, deadline = 2.0, time.time() + max_wait
        if stopping.is_set():
            node.stop()
            print(f"site {site}: stopped", flush=True)
            return 0
        code = node.wait()
        node.stop()  # its SuperExec and any ClientApp left behind
        if node.refused:
            refusals += 1
            if refusals > auth_retries:
                print(f"error: the server refused site {site}: its public key is not on the consortium's "
                      f"allow-list (ask the consortium to register {Path(key).with_suffix('.pub').name})",
                      file=sys.stderr)
                return EXIT_REFUSED
            print(f"site {site}: key not (yet) registered; retrying in {delay:.0f}s", flush=True)
        else:
            print(f"site {site}: SuperNode exited with code {code}; restarting in {delay:.0f}s", flush=True)
        if time.time() + delay > deadline:
            print(f"error: site {site} could not stay connected within {max_wait:.0f}s", file=sys.stderr)
            return EXIT_UNREACHABLE
        stopping.wait(delay)
        delay = min(delay * 2, 60.0)
    print(f"site {site}: stopped", flush=True)
    return 0
