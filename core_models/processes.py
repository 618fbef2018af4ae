"""Small helpers shared by the client (hospital) and the server (consortium) sides:
child processes we start and kill by PID, free ports, Flower's console scripts, and the
one definition of which files make up the equifed Flower app.

They live here because client and server never import each other (core_models <-
fairness <- client, server).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import tomllib
from pathlib import Path

import psutil

APP_DIR = Path(__file__).resolve().parent.parent  # the folder holding pyproject.toml (the Flower app)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether this machine can listen on (host, port) now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def flower_config(values: dict) -> str:
    """`values` as the "key=value key=value" string Flower's --run-config, --node-config and --federation-config
    read (each value in TOML: true/false, a number, or a quoted string)."""
    return " ".join(f"{k}={_toml(v)}" for k, v in values.items())


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def flower_bin(name: str) -> str:
    """Flower's console scripts next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def kill_tree(pid: int, hard: bool = False, timeout: float = 10) -> None:
    """Signal a process and all its descendants (SIGTERM, then SIGKILL for stragglers)."""
    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def app_packages(app_dir: Path = APP_DIR) -> list[str]:
    """The top-level packages pyproject.toml installs (its setuptools `include` patterns)."""
    with open(Path(app_dir) / "pyproject.toml", "rb") as fh:
        patterns = tomllib.load(fh)["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({p.rstrip("*").rstrip(".") for p in patterns})


def app_snapshot(dest: Path, app_dir: Path = APP_DIR) -> Path:
    """A copy of the Flower app (pyproject.toml and the packages it installs) to build the FAB
    from: the FAB holds only the app, and files changed in the working tree meanwhile (a
    notebook, a benchmark) cannot break or bloat the build.

    The consortium's `flwr run` bundles this folder; a hospital's pinned ClientApp runner
    (client/pinned_runner.py) builds the same folder from the equifed installed at the site
    and bundles it with the same Flower function, to compare the two bundles file by file."""
    app_dir = Path(app_dir)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(app_dir / "pyproject.toml", dest / "pyproject.toml")
    for package in app_packages(app_dir):
        shutil.copytree(app_dir / package, dest / package, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return dest
