"""`make demo`: the whole system on one machine, a printed summary, then a clean stop.

Starts Kafka and the Prefect server (unless running), serves every deployment
(`python -m flows`), then runs each domain step in `infra/demo_steps/` through four phases:
`prepare` (start stream workers), `produce` (sample traffic), `batch` (trigger deployments
through the Prefect API and wait) and `summarize` (rows for the summary table). Whatever
the demo started, it stops, also on failure; with `--keep` a successful demo leaves it all
running for the UI (`make down` stops it).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra import demo_steps, kafka_broker, prefect_server, services
from tasks.kafka import ensure_topics, project_topics
from tasks.settings import Settings, get_settings

console = Console()
PHASES = ("prepare", "produce", "batch", "summarize")


@dataclass
class DemoContext:
    settings: Settings
    started: list[str] = field(default_factory=list)  # service names
    summary: list[tuple[str, str, str]] = field(default_factory=list)

    def start_process(
        self, name: str, argv: list[str], marker: str, env: dict[str, str] | None = None
    ):
        """Start a background process (logs in var/log/<name>.log), stopped when the demo ends."""
        services.start(name, argv, marker, env={**prefect_server.client_env(), **(env or {})})
        self.started.append(name)
        console.print(f"  started {name} (log: {services.log_path(name)})")

    def start_worker(self, worker: str, *args: str) -> None:
        name = f"worker-{worker}{'-' + '-'.join(args[1::2]) if args else ''}"
        self.start_process(
            name,
            [sys.executable, "-m", "stream_workers", worker, *args],
            f"stream_workers {worker}",
        )

    def run_deployment(
        self, name: str, parameters: dict[str, Any] | None = None, timeout_s: float = 300
    ):
        """Trigger a served deployment through the Prefect API and wait for its final state."""
        from prefect.deployments import run_deployment

        started = time.monotonic()
        if not services.wait_for(lambda: _deployment_exists(name), 90, 0.5):
            raise RuntimeError(
                f"deployment {name} was not served; see {services.log_path('flows-serve')}"
            )
        run = run_deployment(name, parameters=parameters or {}, timeout=timeout_s, poll_interval=1)
        state = run.state.name if run.state else "unknown"
        console.print(f"  {name}: {state} in {time.monotonic() - started:.1f}s")
        if not (run.state and run.state.is_completed()):
            raise RuntimeError(f"deployment {name} ended {state}; see the Prefect UI")
        return run

    def add(self, domain: str, what: str, value: Any) -> None:
        self.summary.append((domain, what, str(value)))


def _deployment_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


def _steps():
    found = [
        importlib.import_module(f"{demo_steps.__name__}.{m.name}")
        for m in pkgutil.iter_modules(demo_steps.__path__)
    ]
    return sorted(found, key=lambda module: getattr(module, "ORDER", 100))


def run_demo(keep: bool = False) -> int:
    # Before anything imports Prefect: every client here talks to the demo's server.
    for key, value in prefect_server.client_env().items():
        os.environ.setdefault(key, value)
    settings = get_settings()
    ctx = DemoContext(settings)
    stack: list[tuple[str, Any]] = []
    try:
        console.rule("starting the stack")
        if kafka_broker.ensure_running(settings):
            stack.append(("kafka", kafka_broker.stop))
        ensure_topics(project_topics(settings), settings)
        if prefect_server.ensure_running():
            stack.append(("prefect", prefect_server.stop))
        console.print(f"  kafka at {settings.kafka_bootstrap_servers}; Prefect UI at "
                      f"http://{prefect_server.HOST}:{prefect_server.PORT}")  # fmt: skip
        ctx.start_process(
            "flows-serve",
            [sys.executable, "-m", "flows"],
            "-m flows",
            env={"PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        )
        steps = _steps()
        for phase in PHASES:
            console.rule(phase)
            for step in steps:
                if hasattr(step, phase):
                    getattr(step, phase)(ctx)
        _print_summary(ctx)
        if keep:
            console.print(
                f"left running: {', '.join(ctx.started + [n for n, _ in stack])}. Prefect UI at "
                f"http://{prefect_server.HOST}:{prefect_server.PORT}; `make down` stops everything."
            )
            ctx.started.clear()
            stack.clear()
        return 0
    finally:
        if ctx.started or stack:
            console.rule("stopping what the demo started")
        for name in reversed(ctx.started):
            services.stop(name, timeout_s=20)
        for name, stop in reversed(stack):
            stop()
            console.print(f"  stopped {name}")


def _print_summary(ctx: DemoContext) -> None:
    table = Table(title="demo summary")
    for column in ("domain", "what", "value"):
        table.add_column(column)
    for row in ctx.summary:
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
