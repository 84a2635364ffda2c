"""What the browser test needs around the browser: background processes with their own logs, a
Prefect server (API + UI) of its own, numbered screenshots, and what a failed wait prints (log
tails, a flow run's state and logs, the heartbeats the API holds)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

import httpx

from tests.helpers import eventually

if TYPE_CHECKING:
    from playwright.sync_api import Page
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.events import ReceivedEvent

REPO = Path(__file__).resolve().parent.parent
# Under the repository's git-ignored var/: kept after the run as the test's artifacts.
SCREENSHOTS = REPO / "var" / "ui-screenshots"


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Background:
    """A process this test started, in its own process group, its output in `log`."""

    name: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(
        cls, name: str, argv: Sequence[str], log: Path, env: dict[str, str], cwd: Path
    ) -> Background:
        with log.open("w") as out:
            process = subprocess.Popen(
                list(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        return cls(name, process, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = ["(no log yet)"]
        state = "running" if self.alive() else f"exited with {self.process.returncode}"
        return f"--- {self.name} (pid {self.process.pid}, {state}), {self.log}:\n" + "\n".join(text)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to the process group (a served flow run's own process goes too), SIGKILL
        to what is left after `timeout_s`."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # children that outlived their parent
        if self.alive():
            self.process.wait(timeout=timeout_s)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


def healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class PrefectServer:
    """`python -m prefect server start` on a free port, as `make up` starts it, with its
    database under `home`."""

    home: Path
    log: Path
    port: int = field(default_factory=free_port)
    process: Background | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def start(self, env: dict[str, str], timeout_s: float = 180) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "prefect", "server", "start",
                "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        env = env | {
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # A request the server refuses as retryable (503) shows its cause in the log.
            "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_API_URL": self.api_url,
        }
        server = self.process = Background.start("prefect server", argv, self.log, env, self.home)
        eventually(lambda: healthy(self.api_url) or not server.alive(), timeout_s, 0.5,
                   server.tail)  # fmt: skip
        assert server.alive(), f"the Prefect server exited\n{server.tail()}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Screenshots:
    """Numbered screenshots of the steps (`01-deployments.png`, ...) in one folder, which
    starts empty so it shows the last run only."""

    def __init__(self, folder: Path = SCREENSHOTS) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.png"), *folder.glob("*.zip")]:
            old.unlink()
        self.count = 0

    def take(self, page: Page, label: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{label}.png"
        page.screenshot(path=path)
        return path


@contextmanager
def prefect_client(api_url: str) -> Iterator[SyncPrefectClient]:
    """Prefect's own sync client for `api_url` (not the test process's own setting)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def deployment_names(api_url: str) -> set[str]:
    with prefect_client(api_url) as client:
        return {d.name for d in client.read_deployments()}


def read_flow_run(api_url: str, flow_run_id: str) -> FlowRun:
    with prefect_client(api_url) as client:
        return client.read_flow_run(UUID(flow_run_id))


def flow_run_report(api_url: str, flow_run_id: str, max_logs: int = 80) -> str:
    """A flow run's state, its message and its last logs, as the API has them."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    with prefect_client(api_url) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
            limit=max_logs, sort=LogSort.TIMESTAMP_DESC,
        )  # fmt: skip
    state = run.state
    lines = [
        f"flow run {run.name} ({run.id}) of deployment {run.deployment_id}: "
        f"{state.type.value if state else None} {state.name if state else ''}"
        f" - {state.message if state else ''}",
        f"parameters: {run.parameters}",
        f"last {len(logs)} logs:",
    ]
    lines += [f"  {log.timestamp:%H:%M:%S} {logging.getLevelName(log.level)} {log.name}: {log.message}"
              for log in reversed(logs)]  # fmt: skip
    return "\n".join(lines)


def heartbeats(
    api_url: str, resource_id: str, until: datetime | None = None
) -> list[ReceivedEvent]:
    """The `stream_worker.heartbeat` events of `resource_id` the API holds (up to `until`)."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    occurred = EventOccurredFilter(until=until) if until is not None else EventOccurredFilter()
    query = EventFilter(
        event=EventNameFilter(name=["stream_worker.heartbeat"]),
        resource=EventResourceFilter(id=[resource_id]),
        occurred=occurred,
    )
    with prefect_client(api_url) as client:
        return client.read_events(filter=query, limit=50).events
