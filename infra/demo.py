"""`make demo`: the whole system on one machine, a printed summary, then a clean stop.

Starts Kafka and the Prefect server (unless running), serves every deployment
(`python -m flows`), then runs each domain step in `infra/demo_steps/` through four phases:
`prepare` (topics, state, and the stream workers each step needs), `produce` (sample
traffic), `batch` (trigger deployments through the Prefect API and wait) and `summarize`
(rows for the summary table). The stream workers the steps ask for run under one supervisor,
`python -m stream_workers all`, started once every step has prepared; the summary adds each
worker's records and lag from its metrics endpoint. Whatever the demo started, it stops, also
on failure; with `--keep` a successful demo leaves it all running for the UI (`make down`
stops it).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra import demo_steps, kafka_broker, prefect_server, services
from infra.status import read_statuses, status_dir, supervised
from stream_workers.all import WORKERS, ChildSpec, plan
from tasks.kafka import ensure_topics, project_topics
from tasks.settings import Settings, get_settings

console = Console()
PHASES = ("prepare", "produce", "batch", "summarize")


@dataclass
class DemoContext:
    settings: Settings
    metrics_port: int | None = None  # the workers' metrics ports start here
    started: list[str] = field(default_factory=list)  # service names
    summary: list[tuple[str, str, str]] = field(default_factory=list)
    # The instances each worker should run with (by `--instance`, else one per request).
    workers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    children: list[ChildSpec] = field(default_factory=list)  # what the supervisor runs

    def start_process(
        self, name: str, argv: list[str], marker: str, env: dict[str, str] | None = None
    ):
        """Start a background process (logs in var/log/<name>.log), stopped when the demo ends."""
        services.start(name, argv, marker, env={**prefect_server.client_env(), **(env or {})})
        self.started.append(name)
        console.print(f"  started {name} (log: {services.log_path(name)})")

    def start_worker(self, worker: str, *args: str) -> None:
        """Ask for a stream worker instance (`--instance N`, else one more); all of them start
        under one supervisor once every step has prepared (`start_workers`). The jobs worker
        runs for every known processor."""
        instances = self.workers[worker]
        given = args[args.index("--instance") + 1] if "--instance" in args else None
        instances.add(given if given is not None else f"#{len(instances)}")

    def start_workers(self, timeout_s: float = 120) -> None:
        """`python -m stream_workers all` with the instances asked for; returns once every
        worker process says it is running (partitions assigned and state restored)."""
        if not self.workers:
            return
        pid = services.running_pid(services.WORKERS)
        if pid is not None:
            raise RuntimeError(
                f"stream workers already run (pid {pid}, `make up WORKERS=1` or a kept demo): "
                "the demo runs its own; stop them first (`make down`)"
            )
        counts = {worker: len(self.workers.get(worker, ())) for worker in WORKERS}
        self.children = plan(counts, metrics_port=self.metrics_port)
        args = ["--instances", ",".join(f"{w}={n}" for w, n in counts.items())]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        directory = status_dir(self.settings).absolute()
        env = {**prefect_server.client_env(), "STREAM_STATUS_DIR": str(directory)}
        self.started.append(services.WORKERS)
        pid = services.start_workers(args, env=env)
        console.print(f"  started the stream workers: python -m stream_workers all "
                      f"{' '.join(args)} (pid {pid}; log: {services.log_path(services.WORKERS)})")  # fmt: skip
        for child in self.children:
            console.print(f"    {child.name}" + (f": metrics {child.metrics_url}"
                                                 if child.metrics_url else ""))  # fmt: skip
        # One status file per worker process; the jobs daemon is two (its REALTIME lane).
        want = sum(2 if child.worker == "jobs" else 1 for child in self.children)

        def ready() -> bool:
            mine = supervised(read_statuses(directory), pid)
            return len(mine) == want and all(s["state"] == "running" for s in mine)

        # A supervisor that exits (a worker exiting 2) ends the wait at once.
        services.wait_for(lambda: ready() or not services.alive(pid), timeout_s, 0.5)
        if not ready():
            what = "exited" if not services.alive(pid) else f"not all running in {timeout_s:g}s"
            raise RuntimeError(
                f"the stream workers {what}; last lines of {services.log_path(services.WORKERS)}"
                f":\n{services.log_tail(services.WORKERS)}"
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


def run_demo(keep: bool = False, metrics_port: int | None = None) -> int:
    # Before anything imports Prefect: every client here talks to the demo's server.
    for key, value in prefect_server.client_env().items():
        os.environ.setdefault(key, value)
    settings = get_settings()
    ctx = DemoContext(settings, metrics_port)
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
            if phase == "prepare":
                ctx.start_workers()
        _add_worker_metrics(ctx)
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
            if name == services.WORKERS:
                services.stop_workers()  # it waits for every worker's last commit
            else:
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


def _add_worker_metrics(ctx: DemoContext) -> None:
    """Per worker process: records consumed (committed) and its lag now, from the worker's
    metrics endpoint. A worker whose endpoint does not answer gets a row saying so: the
    summary is not a check."""
    for child in ctx.children:
        if child.metrics_url is None:
            continue
        try:
            text = httpx.get(child.metrics_url, timeout=5).raise_for_status().text
        except httpx.HTTPError as error:
            ctx.add("workers", f"{child.name} (metrics)", f"unavailable: {error}")
            continue
        for (worker, instance, lane), (records, lag) in sorted(worker_metrics(text).items()):
            name = f"{worker}{'-' + lane if lane else ''}/{instance}"
            ctx.add("workers", f"{name} records, lag (:{child.metrics_port})",
                    f"{records:.0f}, lag {lag:.0f}")  # fmt: skip


def worker_metrics(text: str) -> dict[tuple[str, str, str], tuple[float, float]]:
    """From a worker's Prometheus text: per (worker, instance, lane), the records consumed
    (`stream_worker_records_total`) and the lag summed over its partitions
    (`stream_worker_lag_records`)."""
    records: dict[tuple[str, str, str], float] = defaultdict(float)
    lag: dict[tuple[str, str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sample.labels.get(k, "") for k in ("worker", "instance", "lane"))
            if sample.name == "stream_worker_records_total":
                records[key] += sample.value  # type: ignore[index]
            elif sample.name == "stream_worker_lag_records":
                lag[key] += sample.value  # type: ignore[index]
    return {key: (records[key], lag[key]) for key in records.keys() | lag.keys()}
