"""Background services on this machine: the process bookkeeping `make up` / `make down` use.

A service is a process started in its own session with its output in `var/log/<name>.log`
and its pid in `var/run/<name>.pid`, so it never holds the caller's terminal and a later
`down` finds it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"
LOG_DIR = VAR / "log"
RUN_DIR = VAR / "run"


class ServiceError(RuntimeError):
    """A service could not be fetched, started or reached."""


def log_path(name: str) -> Path:
    return LOG_DIR / f"{name}.log"


def pid_path(name: str) -> Path:
    return RUN_DIR / f"{name}.pid"


def running_pid(name: str) -> int | None:
    """The pid of our running `name` service (its pid file names the pid and a marker that
    must appear in the process's command line, so a reused pid is never mistaken for it)."""
    try:
        pid_text, _, marker = pid_path(name).read_text().partition("\n")
        pid = int(pid_text)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if marker.strip() in cmdline else None


def running_services() -> list[str]:
    """Names of the services with a pid file (running or stale)."""
    return sorted(p.stem for p in RUN_DIR.glob("*.pid"))


def start(
    name: str,
    argv: list[str],
    marker: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> int:
    """Start `argv` detached, output appended to its log file; returns the pid. `marker`,
    a part of its command line, identifies the process later."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(log_path(name), "ab") as log:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pid_path(name).write_text(f"{process.pid}\n{marker}")
    return process.pid


def stop(name: str, timeout_s: float = 30.0) -> bool:
    """SIGTERM the service's process group, SIGKILL after `timeout_s`. True if it was running."""
    pid = running_pid(name)
    pid_path(name).unlink(missing_ok=True)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    if not wait_for(lambda: not alive(pid), timeout_s):
        _signal_group(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 10)
    return True


def stop_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM a child started in its own process group, SIGKILL the group after `timeout_s`."""
    if process.poll() is not None:
        return
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(10)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll `condition` until true or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(name: str, lines: int = 20) -> str:
    try:
        return "\n".join(log_path(name).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the stream workers (`python -m stream_workers all`) ---------------------------------------

WORKERS = "stream-workers"
WORKERS_MARKER = "stream_workers all"
WORKERS_STATUS_DIR = VAR / "stream-status"
# Longer than the supervisor's own wait for its children (--stop-timeout, 30 s): it exits
# once they have all committed and stopped.
WORKERS_STOP_TIMEOUT_S = 60.0


def start_workers(
    args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None, name: str = WORKERS
) -> int:
    """Start `python -m stream_workers all <args>` as the service `name` (its status files in
    STREAM_STATUS_DIR, else `var/stream-status`); returns its pid. Raises ServiceError when it
    exits at once (bad settings or options: its log says why)."""
    status_dir = os.environ.get("STREAM_STATUS_DIR") or str(WORKERS_STATUS_DIR)
    pid = start(
        name,
        [sys.executable, "-m", "stream_workers", "all", *args],
        WORKERS_MARKER,
        env={"STREAM_STATUS_DIR": status_dir, **(env or {})},
    )
    # Options and ports are checked before any child starts: bad ones end it within seconds.
    if wait_for(lambda: not alive(pid), 3.0, 0.1):
        pid_path(name).unlink(missing_ok=True)
        raise ServiceError(
            f"{name} exited at once; last lines of {log_path(name)}:\n{log_tail(name)}"
        )
    return pid


def stop_workers(name: str = WORKERS, timeout_s: float = WORKERS_STOP_TIMEOUT_S) -> bool:
    """SIGTERM the supervisor and wait until it (and so every child, each after committing)
    has exited. True if it was running."""
    return stop(name, timeout_s)
