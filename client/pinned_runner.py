"""The hospital's own ClientApp runner: only the equifed installed at this site ever runs here.

Why. A Flower SuperNode normally runs whatever app bundle (FAB) the SuperLink hands it:
in its default `--isolation subprocess` mode it starts `flower-superexec`, which starts
`flwr-clientapp` per message, and that unpacks the run's FAB into FLWR_HOME/apps/ and
imports the `clientapp` named in the FAB's own pyproject.toml from the unpacked folder
(flwr/supernode/runtime/run_clientapp.py: `install_from_fab`, then
`get_load_client_app_fn(multi_app=True)` -> `load_app(ref, ..., project_dir)`). Anyone who
can submit a run (the consortium server, or anyone who reaches its unauthenticated Control
API) could therefore ship "client code" that reads the hospital's data folder. Flower's
own remedy, `flower-supernode --trusted-entities`, only accepts bundles signed by Flower
Hub, so it cannot pin an app built and submitted offline.

What is pinned. `equifed-client start` runs the SuperNode with `--isolation process`: the
SuperNode then only queues tasks on its Runtime API (loopback, HMAC-protected task
acquisition with a per-start secret) and starts nothing. This module is the process that
takes those tasks instead of `flower-superexec` + `flwr-clientapp`:

* `serve` polls the SuperNode's Runtime API for ClientApp tasks (AcquireTask, like
  flwr/supercore/superexec/run_superexec.py) and hands each task to its own `flwr-clientapp`
  task process of this module (a fresh interpreter per task, as Flower does). From the first
  task on, the next task's process is started ahead: it imports the installed ClientApp and
  builds the reference bundle while the site waits; its task's token comes on stdin (never on
  its command line, which other local users can read) and starts the task's heartbeat at once,
  even while the imports are still running (TokenWatch), so later rounds do not
  wait seconds for torch and Opacus to import (a site that never gets a task starts none);
* the task process pulls the message, context, run and FAB (Flower's own
  `pull_task_input`), then compares the FAB with the bundle built from the installed
  equifed: `core_models.processes.app_snapshot` of the installed packages (the folder the
  consortium's `flwr run` bundles) packed by Flower's own `build_fab_from_disk` (the
  function `flwr run` uses). Every file of both bundles is compared by the SHA-256 of its
  bytes, pyproject.toml included (Flower rewrites it deterministically); only Flower's
  metadata under `.info/` (the CONTENT manifest, signatures) is ignored. Any changed,
  missing or extra file refuses the bundle: the reply is an Error
  ("app bundle is not the equifed installed at this site", code INVALID_FAB), the list of
  differing files goes to the site's `.equifed/client_errors.log` and to its console;
* an identical bundle is still never executed: the FAB is not unpacked, nothing of it is
  put on sys.path, and `client.app:app` is imported from the INSTALLED package (checked:
  the module file lies inside the installed app folder). The comparison only makes a
  consortium that runs another version (or a tampered one) fail loudly instead of
  training with code the hospital did not install.

Nothing from the server is executed, so the run config the server sends (`flwr run -c`)
stays data that the installed code reads; the site's own limits (node config, site.toml:
data path, max-epsilon, audit log) are set by the hospital when it starts its client.

The reference bundle needs the app's pyproject.toml next to the installed packages (a
source checkout installed with `pip install -e .`, as the deployment guide does); when it
is missing every bundle is refused, with that reason in the site's log.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from core_models.processes import APP_DIR, app_snapshot
from core_models.protocol import site_error

BUNDLE_REFUSED = "app bundle is not the equifed installed at this site"
CLIENTAPP_REF = ("client.app", "app")  # what runs, whatever the bundle's pyproject.toml names
TASK_COMMAND = "flwr-clientapp"  # the task sub-command: the role Flower's `flwr-clientapp` has
POLL_SECONDS = 0.5


# --- the comparison -------------------------------------------------------------------
def bundle_files(fab: bytes) -> dict[str, str]:
    """path -> SHA-256 of every file in a FAB, hashed from the bytes themselves (never from
    the bundle's own manifest); Flower's metadata folder `.info/` is left out."""
    out: dict[str, str] = {}
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        for info in zf.infolist():
            if info.is_dir() or info.filename.startswith(".info/"):
                continue
            if info.filename in out:
                raise ValueError(f"bundle lists {info.filename} twice")
            out[info.filename] = hashlib.sha256(zf.read(info)).hexdigest()
    return out


def installed_bundle(app_dir: Path = APP_DIR) -> bytes:
    """The FAB that `flwr run` would build from the equifed installed here."""
    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory(prefix="equifed-pinned-") as tmp:
        return build_fab_from_disk(app_snapshot(Path(tmp) / "app", app_dir))


def bundle_differences(fab: bytes, reference: bytes | Exception | None = None) -> list[str]:
    """Why `fab` is not the installed equifed: one line per changed, missing or extra file
    (empty when every file is identical). `reference`: the installed bundle (built here when
    None), or the error that building it raised."""
    if reference is None:
        try:
            reference = installed_bundle()
        except Exception as err:  # noqa: BLE001  (no pyproject.toml next to the packages, unreadable file, ...)
            reference = err
    if isinstance(reference, Exception):
        err = reference
        return [f"cannot build the installed equifed's bundle from {APP_DIR}: {type(err).__name__}: {err}"]
    try:
        got = bundle_files(fab)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        return [f"not a readable app bundle: {type(err).__name__}: {err}"]
    want = bundle_files(reference)
    lines = [f"changed: {p}" for p in sorted(set(got) & set(want)) if got[p] != want[p]]
    lines += [f"extra (not installed here): {p}" for p in sorted(set(got) - set(want))]
    lines += [f"missing (installed here): {p}" for p in sorted(set(want) - set(got))]
    return lines


def load_installed_clientapp():
    """`client.app:app` from the installed package, never from a bundle."""
    module = importlib.import_module(CLIENTAPP_REF[0])
    origin = Path(module.__file__).resolve()
    if not origin.is_relative_to(APP_DIR / "client"):
        raise ImportError(f"{CLIENTAPP_REF[0]} was imported from {origin}, not from the installed {APP_DIR}")
    return getattr(module, CLIENTAPP_REF[1])


def _site_log(path: Path | None, text: str) -> None:
    print(text, flush=True)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text.rstrip("\n") + "\n")


def _background_errors_to_log(site_log: Path | None) -> None:
    """An exception in one of Flower's background threads of a task (e.g. its task heartbeat, answered
    '401 Unauthorized' once the task has ended and its token is void) goes to the site's log in one line instead
    of a traceback on the operator's console: the task's own outcome is reported on its own."""
    def hook(args: threading.ExceptHookArgs) -> None:
        line = f"--- background thread {args.thread.name if args.thread else '?'}: " \
               f"{args.exc_type.__name__}: {args.exc_value}"
        if site_log is None:
            print(line, flush=True)
            return
        site_log.parent.mkdir(parents=True, exist_ok=True)
        with open(site_log, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    threading.excepthook = hook


# --- one task (the role of flwr-clientapp) ----------------------------------------------
@dataclass(frozen=True)
class TaskLink:
    """The task's one client of the SuperNode's Runtime API and the retry policy it calls through: the
    heartbeat, the task's pulls and pushes and the exit report share them, and on exit the retries end
    (`max_tries = 1`) for every one of them, as in flwr-clientapp."""

    client: Any
    retry_invoker: Any

    @classmethod
    def open(cls, runtime_api_address: str, token: str) -> "TaskLink":
        from flwr.supercore.retry import make_simple_http_retry_invoker

        retry_invoker = make_simple_http_retry_invoker()
        return cls(_runtime_client(runtime_api_address, token, retry_invoker), retry_invoker)


@dataclass
class TaskState:
    """What the task's exit handler reports and closes, filled in as the task goes (hence not frozen): its
    link and heartbeat once the token came, its context once pulled, its outcome at the end."""

    link: TaskLink | None = None
    heartbeat: Any = None  # a started HeartbeatSender
    context: Any = None
    sub_status: str = "failed"  # flwr.common.constant.SubStatus.FAILED, until the task completes
    details: str = "ClientApp task failed"


def register_exit_handlers(state: TaskState) -> None:
    """Flower's SIGINT/SIGTERM/SIGQUIT handlers, reporting `state` to the SuperNode on the way out (main
    thread only). Registered before any heartbeat runs: Flower's task heartbeat raises SIGINT in this
    process when the SuperNode answers that the task is over (make_task_heartbeat_fn_http), and its retry
    policy does the same on '401 Unauthorized' (make_simple_http_retry_invoker). Without these handlers that
    SIGINT is a KeyboardInterrupt in whatever the main thread runs (importing torch, building the bundle),
    and the process dies with a traceback and no task output pushed."""
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.telemetry import EventType
    from flwr.supernode.runtime.run_clientapp import push_task_output  # imported now, not mid-signal

    def on_exit() -> None:
        link = state.link
        if link is None:  # no task yet (a pre-started process stopped while waiting): nothing to report
            return
        link.retry_invoker.max_tries = 1
        push_task_output(client=link.client, context=state.context, sub_status=state.sub_status,
                         details=state.details)
        if state.heartbeat is not None and state.heartbeat.is_running:
            state.heartbeat.stop()
        link.client.close()

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.",
                             exit_handlers=[on_exit])


def wait_for_task(runtime_api_address: str, site_log: Path | None, parent_pid: int | None) -> None:
    """A task process started before its task: load what every task needs, then answer the
    task whose token arrives on stdin (none when the runner stops first: exit quietly)."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    _background_errors_to_log(site_log)
    state = TaskState()
    register_exit_handlers(state)  # before the parent monitor or the heartbeat can raise SIGINT
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    watch = TokenWatch(runtime_api_address, state)
    try:
        loaded = load_installed_clientapp()
    except Exception as err:  # noqa: BLE001  (answered as the task's failure, below)
        loaded = err
    try:
        reference: bytes | Exception = installed_bundle()
    except Exception as err:  # noqa: BLE001  (no pyproject.toml next to the packages, unreadable file, ...)
        reference = err
    watch.arrived.wait()
    if watch.token:
        run_task(runtime_api_address, watch.token, site_log, loaded, reference, state=state)


class TokenWatch:
    """The task's token read from stdin in the background, and kept alive with heartbeats from the moment it
    arrives: a task handed over while this process still imports torch (seconds, minutes on a loaded machine)
    would otherwise send no heartbeat until the imports end, and the SuperNode voids a silent task's token.
    The task's link and started heartbeat go into `state`, which run_task then uses as they are; the exit
    handlers must be registered on `state` first (register_exit_handlers says why). `sender_cls`: the
    heartbeat's class, Flower's HeartbeatSender when None (imported in the background, with the token)."""

    def __init__(self, runtime_api_address: str, state: TaskState, stdin: TextIO | None = None,
                 sender_cls: type | None = None):
        self.token: str = ""
        self.state = state
        self.arrived = threading.Event()
        threading.Thread(target=self._read, args=(runtime_api_address, stdin or sys.stdin, sender_cls),
                         name="task-token", daemon=True).start()

    def _read(self, runtime_api_address: str, stdin: TextIO, sender_cls: type | None) -> None:
        token = stdin.readline().strip()
        if token:
            try:
                from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http

                self.state.link = TaskLink.open(runtime_api_address, token)
                sender = (sender_cls or HeartbeatSender)(make_task_heartbeat_fn_http(self.state.link.client))
                sender.start()
                self.state.heartbeat = sender
            except Exception:  # noqa: BLE001  (run_task opens what is missing itself, as before)
                pass
        self.token = token
        self.arrived.set()


def _runtime_client(runtime_api_address: str, token: str, retry_invoker):
    """A client of the SuperNode's Runtime API that speaks for the task holding `token`."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker,
    )


def run_task(runtime_api_address: str, token: str, site_log: Path | None, loaded, reference,
             state: TaskState | None = None) -> None:
    """Answer one ClientApp task; modelled on flwr.supernode.runtime.run_clientapp.run_clientapp,
    with the FAB compared instead of installed and the ClientApp imported from this site
    (`loaded`: the ClientApp, or why it could not be imported; `reference`: the installed
    bundle, or why it could not be built; `state`: the task so far, its exit handlers registered,
    from TokenWatch; None: a task started here, as flwr-clientapp does)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.exit import ExitCode, flwr_exit
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message

    if state is None:
        state = TaskState()
        register_exit_handlers(state)
    if state.link is None:
        state.link = TaskLink.open(runtime_api_address, token)
    client = state.link.client
    message = reply = None
    exit_code = ExitCode.SUCCESS
    try:
        if state.heartbeat is None:
            state.heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
            state.heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        state.context = context
        problems = bundle_differences(fab.content, reference)
        if problems:
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            _site_log(site_log, f"--- {stamp} run {run.run_id}: refused: {BUNDLE_REFUSED} "
                                f"(bundle sha256 {fab.hash_str}, {run.fab_id} {run.fab_version})\n"
                      + "\n".join(f"    {line}" for line in problems))
            site = context.node_config.get("site")  # the hospital's own setting, as in client.app's errors
            reason = site_error(site, BUNDLE_REFUSED) if site else BUNDLE_REFUSED
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)
            state.details = BUNDLE_REFUSED  # the task FAILED; the process did what it must (exit code 0)
        else:
            if isinstance(loaded, Exception):
                raise loaded
            reply = loaded(message=message, context=context)
            state.sub_status, state.details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001  (as Flower: the server gets the exception type, text stays here)
        _site_log(site_log, f"--- pinned ClientApp task failed: {type(ex).__name__}: {ex}")
        reason = f"{type(ex)}"
        state.details = reason
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and state.context is not None:
            try:
                push_message(client, reply, state.context)
            except Exception as ex:  # noqa: BLE001
                _site_log(site_log, f"--- failed to push the reply: {type(ex).__name__}: {ex}")
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, emit_telemetry=False)


# --- the task loop (the role of flower-superexec) -----------------------------------------
def launcher(app_dir: Path = APP_DIR) -> list[str]:
    """This module's command line, importing equifed from `app_dir` only: -I keeps the working
    directory, PYTHONPATH and the user's site-packages off sys.path, and `app_dir` goes first
    (ahead of the editable-install finder). The task processes inherit the runner's APP_DIR,
    so they run exactly the code the bundle was compared with."""
    code = f"import sys; sys.path.insert(0, {str(Path(app_dir).resolve())!r}); " \
           "from client.pinned_runner import main; main()"
    return [sys.executable, "-I", "-c", code]


def task_command(runtime_api_address: str, site_log: Path | None, parent_pid: int) -> list[str]:
    cmd = launcher(APP_DIR) + [TASK_COMMAND, "--runtime-api-address", runtime_api_address,
                               "--parent-pid", str(parent_pid)]
    if site_log is not None:
        cmd += ["--site-log", str(site_log)]
    return cmd


def start_task_process(runtime_api_address: str, site_log: Path | None) -> subprocess.Popen:
    """The next task's process, started now so that it is ready when the task comes."""
    return subprocess.Popen(task_command(runtime_api_address, site_log, os.getpid()), stdin=subprocess.PIPE,
                            text=True)


def hand_over(process: subprocess.Popen, token: str) -> None:
    """Give a waiting task process its task (a process that died meanwhile gets none: the
    SuperNode fails the task when its token is never used)."""
    try:
        process.stdin.write(token + "\n")
        process.stdin.close()
    except (BrokenPipeError, OSError):
        pass


def serve(runtime_api_address: str, secret_file: Path | None, site_log: Path | None, parent_pid: int | None) -> None:
    """Acquire ClientApp tasks from the SuperNode and answer each in its own process."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret_file is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=load_superexec_auth_secret(str(secret_file)),
            protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None, interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )
    print(f"pinned ClientApp runner: equifed from {APP_DIR}, tasks from {runtime_api_address}", flush=True)
    children: list[subprocess.Popen] = []
    ready: subprocess.Popen | None = None  # from the first task on, the next task's process, waiting
    try:
        while True:
            children = [c for c in children if c.poll() is None]
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                if ready is None or ready.poll() is not None:  # the first task, or it died while waiting
                    ready = start_task_process(runtime_api_address, site_log)
                hand_over(ready, res.token)
                children.append(ready)
                ready = start_task_process(runtime_api_address, site_log)
            time.sleep(POLL_SECONDS)
    finally:
        if ready is not None:
            hand_over(ready, "")  # no task: it exits
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="equifed's pinned ClientApp runner (see the module docstring)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", TASK_COMMAND):
        p = sub.add_parser(name)
        p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
        p.add_argument("--site-log", type=Path, default=None, help="where refusals and failures are written")
        p.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
        if name == "serve":
            p.add_argument("--superexec-auth-secret-file", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.runtime_api_address, args.superexec_auth_secret_file, args.site_log, args.parent_pid)
    else:  # the task's token comes on stdin
        wait_for_task(args.runtime_api_address, args.site_log, args.parent_pid)


if __name__ == "__main__":
    main()
