"""Start and drive a Flower SuperLink that we own: a free loopback port, our own
FLWR_HOME, no `uv sync` at run time, killed by PID when we are done.

Flower's auto-started local SuperLink needs the network and outlives the command, so
simulations, tests and CI use this instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CONNECTION = "equifed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """Flower's console scripts next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class LocalSuperLink:
    """A SuperLink in simulation mode on 127.0.0.1, used as a context manager."""

    def __init__(self, log_path: Path | None = None, simulation: bool = True, startup_timeout: float = 60):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.home = Path(tempfile.mkdtemp(prefix="equifed-flwr-home-"))
        self.log_path = Path(log_path) if log_path else self.home / "superlink.log"
        self.simulation = simulation
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=str(self.home))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def __enter__(self) -> "LocalSuperLink":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.simulation:
            cmd.append("--simulation")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SuperLink exited at start (code {self.process.returncode}); see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SuperLink did not open port {self.port} within {self.startup_timeout}s; see {self.log_path}")

    def stop(self) -> None:
        """Kill the SuperLink and everything it started (SuperExec, ServerApp, Ray)."""
        if self.process is None:
            return
        try:
            parent = psutil.Process(self.process.pid)
            family = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            family = []
        for proc in family:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.process = None
        self._log.close()

    # --- runs ----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, app_dir: Path, run_config: dict | None = None, federation_config: dict | None = None) -> int:
        """Start a run of the Flower app in `app_dir`; return its run id."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())]
        done = self.flwr(*args)
        try:
            payload = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            payload = {}
        if done.returncode != 0 or not payload.get("success"):
            raise RuntimeError(f"flwr run failed (code {done.returncode}):\n{done.stdout}\n{done.stderr}")
        return int(payload["run-id"])

    def status(self, run_id: int) -> dict:
        """The run's row from `flwr ls` (status, sub-status, ...)."""
        done = self.flwr("ls", "--run-id", str(run_id), "--format", "json")
        payload = json.loads(done.stdout[done.stdout.index("{"):])
        runs = payload.get("runs", [])
        if not runs:
            raise RuntimeError(f"run {run_id} unknown to the SuperLink: {done.stdout}")
        return runs[0]

    def wait(self, run_id: int, timeout: float, poll: float = 2.0, on_poll=None) -> dict:
        """Block until the run finishes; return its status row. Raises TimeoutError."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            row = self.status(run_id)
            if on_poll:
                on_poll()
            if str(row.get("status", "")).startswith("finished"):
                return row
            time.sleep(poll)
        self.flwr("stop", str(run_id), CONNECTION)
        raise TimeoutError(f"run {run_id} did not finish within {timeout}s")

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show").stdout


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
