"""Start and drive a Flower SuperLink that we own: our own FLWR_HOME, no `uv sync` at
run time, killed by PID when we are done.

Flower's auto-started local SuperLink needs the network and outlives the command, so
simulations, tests and CI use this instead. The same class runs the consortium's
deployment SuperLink (`equifed-server start`): TLS, a database file that survives a
restart, and SuperNode authentication against an allow-list of public keys.

`ExistingSuperLink` is a SuperLink someone else runs (`equifed-simulate --superlink`, e.g.
one whose simulation engine is a Ray cluster): runs are submitted to it and followed with
the same calls, and it is never started or stopped here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# re-exported: server.cli, server.deploy, simulations and the tests import them from here
from core_models.processes import flower_bin, flower_config, free_port, kill_tree

CONNECTION = "equifed"
APP_PROCESSES = ("flwr-serverapp", "flwr-simulation")  # what a SuperExec starts for a run


@dataclass(frozen=True)
class TLSFiles:
    """The SuperLink's TLS material (PEM files); `ca` is what clients trust."""

    ca: Path
    cert: Path
    key: Path


class PortTaken(RuntimeError):
    """The SuperLink could not listen: another process holds its port."""


def write_connection(home: Path, address: str, root_certificates: Path | None = None, insecure: bool = False) -> None:
    """The `flwr` CLI's connection to a SuperLink (`CONNECTION`), in the FLWR_HOME `home`: plain HTTP when
    `insecure`, else TLS trusting `root_certificates` (a PEM file) or, without one, the system's store."""
    security = (f"root-certificates = {json.dumps(str(root_certificates))}\n" if root_certificates else
                "insecure = true\n" if insecure else "")
    (Path(home) / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\naddress = {json.dumps(address)}\n{security}"
    )


class FlowerRuns:
    """A run's life on a SuperLink through the `flwr` CLI (submit, status, wait, log), with the connection in our
    own FLWR_HOME (`self.home`). `status_every`: how often a run's status is asked while nothing says it is ending
    (each ask is a `flwr` process: about a second of CPU)."""

    home: Path
    status_every = 30.0
    ending_every = 2.0

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=str(self.home))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flower_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, app_dir: Path, run_config: dict | None = None, federation_config: dict | None = None) -> int:
        """Start a run of the Flower app in `app_dir`; return its run id."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", flower_config(run_config)]
        if federation_config:
            args += ["--federation-config", flower_config(federation_config)]
        done = self.flwr(*args)
        try:
            payload = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            payload = {}
        if done.returncode != 0 or not payload.get("success"):
            said = payload.get("error-message") or f"{done.stdout}\n{done.stderr}"
            raise RuntimeError(f"flwr run failed (code {done.returncode}): {said}")
        return int(payload["run-id"])

    def status(self, run_id: int) -> dict:
        """The run's row from `flwr ls` (status, sub-status, ...)."""
        done = self.flwr("ls", "--run-id", str(run_id), "--format", "json")
        try:
            payload = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            raise RuntimeError(f"flwr ls failed (code {done.returncode}):\n{done.stdout}\n{done.stderr}") from None
        runs = payload.get("runs", [])
        if not runs:
            raise RuntimeError(f"run {run_id} unknown to the SuperLink: {done.stdout}")
        return runs[0]

    @staticmethod
    def outcome(row: dict) -> str:
        """A status row as one phrase: "finished:failed: ServerApp failed with exception: ..."."""
        details = row.get("status-details") or ""
        return f"{row.get('status')}: {details}" if details else str(row.get("status"))

    def app_running(self) -> bool:
        """Whether the run's app process is seen alive (only a SuperLink we started can be looked into)."""
        return False

    def wait(self, run_id: int, timeout: float, poll: float = 1.0, on_poll=None, status_every: float | None = None,
             ending=None) -> dict:
        """Block until the run finishes; return its status row. Raises TimeoutError.

        `on_poll` runs every `poll` seconds. The run's status (a `flwr` process: a second of CPU each) is asked
        every `ending_every` seconds once the run looks as if it is ending: its app process has been seen and has
        gone (Flower then marks the run finished), or `ending()` says so (e.g. the run wrote its summary);
        otherwise only every `status_every` seconds, in case the run dies unseen."""
        status_every = self.status_every if status_every is None else status_every
        deadline = time.time() + timeout
        asked, seen = -math.inf, False
        try:
            while time.time() < deadline:
                if on_poll:
                    on_poll()
                running = self.app_running()
                seen = seen or running
                soon = (seen and not running) or (ending is not None and ending())
                if time.time() - asked >= (self.ending_every if soon else status_every):
                    asked = time.time()
                    row = self.status(run_id)
                    if str(row.get("status", "")).startswith("finished"):
                        if on_poll:
                            on_poll()
                        return row
                time.sleep(poll)
        except KeyboardInterrupt:  # Ctrl-C: the run stops too (on a SuperLink we did not start it would go on)
            self.flwr("stop", str(run_id), CONNECTION)
            raise
        self.flwr("stop", str(run_id), CONNECTION)
        raise TimeoutError(f"run {run_id} did not finish within {timeout}s")

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show").stdout


class ExistingSuperLink(FlowerRuns):
    """A SuperLink someone else runs, at `address` (HOST:PORT of its Control API): runs are submitted to it and
    followed, and nothing here starts or stops it. `insecure`: plain HTTP (loopback, a trusted network); else
    TLS, trusting `root_certificates` (the CA's PEM) or the system's store. A context manager: on exit only our
    throw-away FLWR_HOME goes."""

    status_every = 10.0  # no process table to look into: the run's status is asked more often

    def __init__(self, address: str, root_certificates: Path | str | None = None, insecure: bool = False):
        if insecure and root_certificates:
            raise ValueError("a connection is either insecure (plain HTTP) or TLS with root certificates, not both")
        self.address = address
        self.root_certificates = Path(root_certificates).expanduser().resolve() if root_certificates else None
        if self.root_certificates is not None and not self.root_certificates.is_file():
            raise FileNotFoundError(f"root certificates {root_certificates}: no such file")
        self.insecure = insecure
        self.home = Path(tempfile.mkdtemp(prefix="equifed-flwr-home-"))
        write_connection(self.home, address, self.root_certificates, insecure)

    def __enter__(self) -> "ExistingSuperLink":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); ValueError naming what is wrong."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9092, superlink.example.org:9092)")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9092")
    return host, int(port)


class LocalSuperLink(FlowerRuns):
    """A SuperLink we start and stop by PID, used as a context manager.

    Default: simulation mode, plain HTTP on a free loopback port, a throw-away FLWR_HOME.
    Deployment: `simulation=False` with `tls`, `database` and `auth=True`, a fixed
    host/port the hospitals dial and a persistent `home` (keeps the FLWR config).
    """

    def __init__(self, log_path: Path | None = None, simulation: bool = True, startup_timeout: float = 60,
                 host: str = "127.0.0.1", port: int | None = None, tls: TLSFiles | None = None,
                 database: Path | None = None, auth: bool = False, home: Path | None = None):
        if auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it on a plain connection)")
        self.host = host
        self.chosen_port = port is None  # a free port we picked: another one is tried if it is taken meanwhile
        self.port = port or free_port()
        self.dial_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # where our `flwr` calls go
        self.home = Path(home) if home else Path(tempfile.mkdtemp(prefix="equifed-flwr-home-"))
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_path) if log_path else self.home / "superlink.log"
        self.simulation = simulation
        self.startup_timeout = startup_timeout
        self.tls = TLSFiles(*(Path(p).resolve() for p in (tls.ca, tls.cert, tls.key))) if tls else None
        self.database = Path(database).resolve() if database else None
        self.auth = auth
        self.process: subprocess.Popen | None = None
        self._write_connection()

    @property
    def address(self) -> str:
        return f"{self.dial_host}:{self.port}"

    def _write_connection(self) -> None:
        write_connection(self.home, self.address, self.tls.ca if self.tls else None, insecure=self.tls is None)

    def __enter__(self) -> "LocalSuperLink":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        # a simulation's SuperLink holds nothing worth a graceful stop once its run is over (no database):
        # SIGKILL spares the seconds Ray's helpers take to notice a SIGTERM
        self.stop(hard=self.simulation and self.database is None)

    def command(self) -> list[str]:
        cmd = [flower_bin("flower-superlink"), "--disable-runtime-dependency-installation",
               "--host", self.host, "--port", str(self.port)]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                    "--ssl-keyfile", str(self.tls.key)]
        else:
            cmd.append("--insecure")
        if self.database:
            self.database.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--database", str(self.database)]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        if self.simulation:
            cmd.append("--simulation")
        return cmd

    def start(self, attempts: int = 3) -> None:
        """Start the SuperLink and wait until its port answers. A port we picked ourselves that another
        process took in the meantime is replaced by a new free one (up to `attempts` tries)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            try:
                return self._start_once()
            except PortTaken:
                if not self.chosen_port or attempt == attempts - 1:
                    raise
                self.port = free_port()
                self._write_connection()

    def _start_once(self) -> None:
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                self._log.close()
                with open(self.log_path, "rb") as fh:
                    fh.seek(log_start)
                    said = fh.read().decode("utf-8", "replace").lower()
                if "address already in use" in said:
                    raise PortTaken(f"port {self.port} is already in use; see {self.log_path}")
                raise RuntimeError(f"SuperLink exited at start (code {code}); see {self.log_path}")
            if self._listening():
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SuperLink did not open port {self.port} within {self.startup_timeout}s; see {self.log_path}")

    def _listening(self) -> bool:
        """Whether our SuperLink itself listens on its port (a connection that succeeds could reach
        another program that holds the port)."""
        try:
            sockets = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in sockets)

    def stop(self, hard: bool = False) -> None:
        """Kill the SuperLink and everything it started (SuperExec, ServerApp, Ray).
        `hard=True` sends SIGKILL to all of them at once: what a crashed machine looks like."""
        if self.process is None:
            return
        kill_tree(self.process.pid, hard=hard)
        self.process.wait()
        self.process = None
        self._log.close()

    # --- runs ----------------------------------------------------------------------
    def app_running(self) -> bool:
        """Whether a run's app process (`flwr-serverapp`, or `flwr-simulation` with its Ray engine) is alive
        under this SuperLink: a look at the process table, far cheaper than a `flwr` status query."""
        if self.process is None:
            return False
        try:
            family = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        for proc in family:
            try:
                if any(name in part for part in proc.cmdline()[:3] for name in APP_PROCESSES):
                    return True
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return False

    def runs(self) -> list[dict]:
        """Every run the SuperLink knows (its database keeps them across restarts)."""
        done = self.flwr("ls", "--format", "json")
        try:
            return json.loads(done.stdout[done.stdout.index("{"):]).get("runs", [])
        except ValueError:
            raise RuntimeError(f"flwr ls failed (code {done.returncode}):\n{done.stdout}\n{done.stderr}") from None

    def stop_unfinished_runs(self) -> list[int]:
        """Mark runs left 'running' by a dead ServerApp (a crash) as stopped, so that they
        hand no more work to the hospitals; returns their ids."""
        stale = [int(r["run-id"]) for r in self.runs() if not str(r.get("status", "")).startswith("finished")]
        for run_id in stale:
            self.flwr("stop", str(run_id), CONNECTION)
        return stale

    # --- SuperNode allow-list ---------------------------------------------------------
    def register_node(self, public_key: Path, name: str) -> int | None:
        """Put a hospital's public key on the allow-list; returns its node id, or None
        when the key was registered before (the database remembers it)."""
        done = self.flwr("supernode", "register", str(Path(public_key).resolve()), CONNECTION,
                         "--name", name, "--format", "json")
        try:
            payload = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            payload = {}
        if payload.get("success"):
            return int(payload["node-id"])
        if "already in use" in str(payload.get("error-message", "")):
            return None
        raise RuntimeError(f"could not register {name}'s public key {public_key}:\n{done.stdout}\n{done.stderr}")

    def nodes(self) -> list[dict]:
        """The registered SuperNodes with their status (registered / online / offline)."""
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            return json.loads(done.stdout[done.stdout.index("{"):]).get("nodes", [])
        except ValueError:
            raise RuntimeError(f"flwr supernode list failed:\n{done.stdout}\n{done.stderr}") from None

    def wait_for_nodes(self, count: int, timeout: float, poll: float = 3.0) -> int:
        """Block until `count` SuperNodes are online; returns how many are. TimeoutError."""
        deadline = time.time() + timeout
        while True:
            online = sum(1 for n in self.nodes() if n.get("status") == "online")
            if online >= count:
                return online
            if time.time() > deadline:
                raise TimeoutError(f"only {online} of {count} hospital(s) connected within {timeout:.0f}s")
            time.sleep(poll)
