"""Helpers of the tests that run Prefect's own processes (`prefect deploy`, a worker,
`python -m flows`) against the session's harness server, and clean up after them."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from infra.services import stop_group
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def prefect_env(**extra: str) -> dict[str, str]:
    """The test's environment (its settings) for a child process that talks to the harness
    server: the harness sets PREFECT_API_URL in this process's Prefect settings only."""
    return subprocess_env() | {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PWD": str(ROOT),
                               **extra}  # fmt: skip


def run_logged(argv: list[str], env: dict[str, str], log: Path, timeout_s: float = 300):
    """Run a command from the repository root, its output appended to `log`."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        return subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s, check=False)  # fmt: skip


@contextlib.contextmanager
def background(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A process (in its own process group, with the flow runs it starts) logging to `log`;
    SIGTERM to the group at the end, SIGKILL if it is still there after 30 s."""
    with log.open("a") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        yield process
    finally:
        stop_group(process)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def tail(log: Path, chars: int = 6000) -> str:
    text = log.read_text() if log.exists() else "(no log)"
    return f"--- {log.name} (last {chars} chars)\n{text[-chars:]}"


def remove_deployments(full_names: Iterable[str]) -> None:
    """Delete deployments (`flow/deployment`) and the automations they own, if they exist."""
    with get_client(sync_client=True) as client:
        for name in full_names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
            client.delete_deployment(deployment.id)


def remove_automations(names: Iterable[str]) -> None:
    with get_client(sync_client=True) as client:
        for name in names:
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)


def flow_run(flow_run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def run_report(flow_run_id: UUID) -> str:
    run = flow_run(flow_run_id)
    state = run.state
    return (f"flow run {run.name} ({run.id}): {state.type.value if state else None} "
            f"{state.name if state else ''}: {state.message if state else ''}")  # fmt: skip
