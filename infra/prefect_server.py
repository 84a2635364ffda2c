"""A Prefect server (API + UI) on 127.0.0.1:4200, its SQLite database under `var/prefect`."""

from __future__ import annotations

import os
import sys

import httpx

from infra import services

NAME = "prefect-server"
MARKER = "prefect server start"
HOST = "127.0.0.1"
PORT = 4200
API_URL = f"http://{HOST}:{PORT}/api"
PREFECT_HOME = services.VAR / "prefect"


def healthy(api_url: str = API_URL) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def client_env() -> dict[str, str]:
    """Environment for processes that talk to this server."""
    return {"PREFECT_API_URL": API_URL}


def ensure_running(timeout_s: float = 120.0) -> bool:
    """Start the server unless one already answers; returns True if this call started it."""
    external = os.environ.get("PREFECT_API_URL")
    if external and external.rstrip("/") != API_URL:
        if healthy(external.rstrip("/")):
            return False
        raise services.ServiceError(f"PREFECT_API_URL={external} does not answer; nothing started.")
    if healthy():
        return False
    pid = services.running_pid(NAME)
    if pid is None:
        PREFECT_HOME.mkdir(parents=True, exist_ok=True)
        pid = services.start(
            NAME,
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                HOST,
                "--port",
                str(PORT),
            ],
            MARKER,
            env={
                "PREFECT_HOME": str(PREFECT_HOME),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_API_URL": API_URL,
                "PREFECT_API_URL": API_URL,
            },
        )
    ok = services.wait_for(lambda: healthy() or not services.alive(pid), timeout_s, 0.5)
    if not ok or not healthy():
        raise services.ServiceError(
            f"Prefect server did not answer at {API_URL} within {timeout_s:g}s; last lines of "
            f"{services.log_path(NAME)}:\n{services.log_tail(NAME)}"
        )
    return True


def stop() -> bool:
    return services.stop(NAME, timeout_s=20)
