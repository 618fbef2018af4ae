"""A hospital's side of a real deployment: check the local data, then run Flower's
SuperNode against the consortium's server, over TLS, with the site's key.

Order matters: the data folder is validated first (manifest, readable images, patient
split without leakage, privacy ledger), so a broken folder fails here with a clear
message instead of inside a training round on the server's clock.

Only the equifed installed at this site runs here: the SuperNode is started with
`--isolation process` (it then starts no ClientApp itself) and its Runtime API on the
loopback, and this module starts, next to it, client/pinned_runner.py, which takes the
SuperNode's ClientApp tasks, refuses any app bundle that differs from the installed
equifed and runs `client.app:app` from the installed package, never from the bundle
(the module docstring there says what is pinned and why). Task acquisition is
HMAC-protected with a secret made anew at every start (Flower's SuperExec auth), so no
other local process can take the tasks and run the bundle with Flower's stock runner.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from client.ledger import LedgerError, ledger_report
from client.site import SITE_LOG, STATE_DIR, open_site, site_max_epsilon
from client.pinned_runner import launcher
from core_models.data.volumes import VolumeSettings, names_volumes
from core_models.processes import APP_DIR, flower_bin, flower_config, free_port, kill_tree

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
    unlabelled: int = 0  # images without a label: self-supervised pretext runs only

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
        if self.unlabelled:
            out.insert(2, f"  unlabelled {self.unlabelled} images (self-supervised pretext runs only"
                          + ("; no labelled image: this site takes part in pretext runs only)" if not self.images
                             else ")"))
        for reason, n in sorted(self.rejection_reasons.items(), key=lambda kv: -kv[1])[:3]:
            out.append(f"  rejected {n} x {reason}")
        return out


def check_data(path: Path, site: str | None = None, image_size: int = 64, seed: int = 0,
               node_config: dict | None = None) -> DataSummary:
    """Load the site exactly as the ClientApp will; raise DataFolderError on anything unusable."""
    path = Path(path).expanduser().resolve()
    if not (path / "manifest.csv").exists():
        raise DataFolderError(f"{path} has no manifest.csv (columns patient_id, image_path, label)")
    # a folder of studies is checked as volumes with the default settings (a run's own window and grid come with it)
    volume = VolumeSettings() if names_volumes(path) else None
    try:
        local = open_site(path, image_size=image_size, seed=seed, name=site, node_config=node_config, volume=volume)
    except Exception as err:  # manifest errors, leakage, unreadable folder: all stop the site here
        raise DataFolderError(f"{path}: {type(err).__name__}: {err}") from err
    if local.count("train") == 0 and len(local.data.unlabelled) == 0:
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
        unlabelled=len(local.data.unlabelled),
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


def _env(flwr_home: Path) -> dict[str, str]:
    """The SuperNode starts `flower-superexec` by name: this interpreter's bin goes first on
    PATH. Its FLWR_HOME (where the consortium's app is unpacked) is the site's own."""
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


SECRET_FILE = "superexec.secret"  # in the site's flwr-home; a new one at every start


def supernode_command(server: str, ca: Path | None, key: Path | None, node_config: dict, runtime_port: int,
                      secret_file: Path, insecure: bool = False) -> list[str]:
    """flower-supernode over TLS with the site's key; its Runtime API on the loopback, in
    process isolation (it starts no ClientApp: the pinned runner takes its tasks).
    `insecure=True` (plain HTTP, no key) exists for tests against an insecure SuperLink."""
    config = flower_config(node_config)
    cmd = [flower_bin("flower-supernode"), "--superlink", server]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(ca).resolve()), "--auth-supernode-private-key", str(Path(key).resolve())]
    return cmd + ["--node-config", config, "--isolation", "process", "--host", "127.0.0.1",
                  "--port", str(runtime_port), "--superexec-auth-secret-file", str(Path(secret_file).resolve())]


def runner_command(runtime_port: int, secret_file: Path, site_log: Path, parent_pid: int,
                   app_dir: Path = APP_DIR) -> list[str]:
    """client/pinned_runner.py serving the SuperNode's ClientApp tasks (exits with `parent_pid`),
    pinned to the equifed in `app_dir` (default: the one this interpreter imports). Neither the
    working directory nor PYTHONPATH can put another `client` package first."""
    return launcher(app_dir) + ["serve",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--superexec-auth-secret-file", str(Path(secret_file).resolve()),
            "--site-log", str(Path(site_log).resolve()), "--parent-pid", str(parent_pid)]


def new_secret(path: Path) -> Path:
    """A fresh random SuperExec secret, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32))
    os.chmod(path, 0o600)
    return path


class SuperNodeProcess:
    """flower-supernode and the pinned ClientApp runner as children: their output is echoed
    (and kept, to tell a refused key from a network failure); stopped with their whole
    process trees. `runner(pid)` gives the runner's command for a SuperNode of that PID."""

    def __init__(self, command: list[str], log_file: Path | None, env: dict | None = None,
                 runner: Callable[[int], list[str]] | None = None):
        self.refused = False
        self._family: set[psutil.Process] = set()
        self._log = open(log_file, "a", encoding="utf-8") if log_file else None
        self._lock = threading.Lock()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, bufsize=1)
        self.runner = None
        if runner is not None:
            self.runner = subprocess.Popen(runner(self.process.pid), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        self._readers = [threading.Thread(target=self._pump, args=(p,), daemon=True)
                         for p in (self.process, self.runner) if p is not None]
        for reader in self._readers:
            reader.start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if any(marker in line for marker in REFUSED_MARKERS):
                self.refused = True
            with self._lock:
                sys.stdout.write(line)
                sys.stdout.flush()
                if self._log and not self._log.closed:
                    self._log.write(line)
                    self._log.flush()

    def _procs(self) -> list[subprocess.Popen]:
        return [p for p in (self.process, self.runner) if p is not None]

    def alive(self) -> bool:
        """Whether the SuperNode and its runner run (one without the other is restarted);
        remembers their descendants so that stop() finds them even after they have died."""
        for proc in self._procs():
            try:
                self._family.update(psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return all(p.poll() is None for p in self._procs())

    def wait(self) -> int:
        code = self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def exit_reason(self) -> str:
        """Which child stopped first and with what code (call before stop())."""
        if self.process.poll() is not None:
            return f"SuperNode exited with code {self.process.returncode}"
        if self.runner is not None and self.runner.poll() is not None:
            return f"pinned ClientApp runner exited with code {self.runner.returncode}"
        return "stopped"

    def stop(self) -> None:
        for proc in self._procs():
            kill_tree(proc.pid)
        for proc in self._family:
            if proc.is_running():
                kill_tree(proc.pid)
        if self.runner is not None:
            self.runner.wait()
        self.wait()
        with self._lock:
            if self._log and not self._log.closed:
                self._log.close()


def start_node(server: str, ca: Path | None, key: Path | None, node_config: dict, *, runtime_port: int | None = None,
               log_file: Path | None = None, insecure: bool = False, app_dir: Path = APP_DIR) -> SuperNodeProcess:
    """The SuperNode (process isolation, Runtime API on the loopback) and the pinned runner
    beside it, as `equifed-client start` runs them; a fresh SuperExec secret each time.
    Flower's files go to `<data-path>/.equifed/flwr-home`, refusals and failures of the
    ClientApp to `<data-path>/.equifed/client_errors.log`. `insecure=True` and `app_dir` (another
    equifed checkout to pin, e.g. a frozen copy) are for tests."""
    state = Path(node_config["data-path"]) / STATE_DIR
    flwr_home = state / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    secret = new_secret(flwr_home / SECRET_FILE)
    port = runtime_port or free_port()
    command = supernode_command(server, ca, key, node_config, port, secret, insecure=insecure)

    def runner(supernode_pid: int) -> list[str]:
        return runner_command(port, secret, Path(node_config["data-path"]) / SITE_LOG, supernode_pid, app_dir)

    return SuperNodeProcess(command, log_file, env=_env(flwr_home), runner=runner)


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
    port = runtime_port or free_port()
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
        node = start_node(server, ca, key, node_config, runtime_port=port, log_file=log_file)
        started = time.time()
        while node.alive() and not stopping.is_set():
            time.sleep(0.5)
        if time.time() - started > 60:  # it was connected: a later outage gets the full patience again
            delay, deadline = 2.0, time.time() + max_wait
        if stopping.is_set():
            node.stop()
            print(f"site {site}: stopped", flush=True)
            return 0
        reason = node.exit_reason()
        node.stop()  # both, and any ClientApp task left behind
        if node.refused:
            refusals += 1
            if refusals > auth_retries:
                print(f"error: the server refused site {site}: its public key is not on the consortium's "
                      f"allow-list (ask the consortium to register {Path(key).with_suffix('.pub').name})",
                      file=sys.stderr)
                return EXIT_REFUSED
            print(f"site {site}: key not (yet) registered; retrying in {delay:.0f}s", flush=True)
        else:
            print(f"site {site}: {reason}; restarting in {delay:.0f}s", flush=True)
        if time.time() + delay > deadline:
            print(f"error: site {site} could not stay connected within {max_wait:.0f}s", file=sys.stderr)
            return EXIT_UNREACHABLE
        stopping.wait(delay)
        delay = min(delay * 2, 60.0)
    print(f"site {site}: stopped", flush=True)
    return 0
