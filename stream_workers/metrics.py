"""What a stream worker daemon tells about itself: Prometheus metrics and Prefect events,
fed by the runtime's observer hooks (`stream_workers.runtime.Observer`).

One endpoint per daemon (`--metrics-port`, default `STREAM_METRICS_PORT`; unset: none),
served by prometheus-client's HTTP server from the daemon's own registry on 127.0.0.1
(`--metrics-host` to change). Every series has the labels `worker` and `instance` (the
`--instance` value, or the pid when none):

- `stream_worker_records_total`, `stream_worker_outputs_total`,
  `stream_worker_dead_letters_total`: of committed transactions;
- `stream_worker_transactions_total{outcome="committed|aborted"}`;
- `stream_worker_batch_seconds`: histogram, processing plus commit of committed batches;
- `stream_worker_lag_records{topic, partition}`: records behind the partition's high
  watermark, per assigned partition, refreshed on the runtime's tick (every 10 s, or every
  STREAM_HEARTBEAT_INTERVAL_S when shorter);
- `stream_worker_counts_total{count}`: the worker's own counts (e.g. `fired`, `rebuilds`);
- `stream_worker_events_dropped_total`: Prefect events dropped (the API down or slow).

No `_created` series beside the counters (prometheus-client's switch for the whole process,
turned off once a daemon serves).

The jobs daemon runs its REALTIME lane in a child process: the child's observer puts the
same messages the parent's observer applies (`("batch", lane, report)` and
`("progress", lane, lag, counts, events dropped)`) on a bounded multiprocessing queue
(never waiting: a full queue drops the message), a thread of the parent applies them, and
every series of that daemon carries a third label, `lane` (`realtime`, `normal`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from stream_workers.runtime import BatchReport, Observer, Runtime
from tasks.commands import UsageError, log_context
from tasks.settings import Settings

log = logging.getLogger("stream_workers.metrics")

DEFAULT_HOST = "127.0.0.1"
# Batches take from about a millisecond (one REALTIME job) to seconds (20 000 transactions).
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# What an observer hands to `WorkerMetrics.apply` (directly, or through a queue).
Message = tuple[Any, ...]
Lag = list[tuple[str, int, int]]  # (topic, partition, records behind)


class MetricsPortError(UsageError):
    """The metrics endpoint cannot listen where asked (a port in use, or not a port)."""


class LifecycleEvents(Protocol):
    """What the runtime hooks call on a worker's events (`stream_workers.events`)."""

    def started(self, status: dict) -> None: ...
    def rebalanced(self, status: dict) -> None: ...
    def heartbeat(self, status: dict) -> None: ...
    def stopped(self, status: dict) -> None: ...
    def alert_fired(self, alert: dict) -> None: ...
    @property
    def dropped(self) -> int: ...
    def close(self, timeout_s: float = 2.0) -> None: ...


# --- the metrics --------------------------------------------------------------------------


class WorkerMetrics:
    """The metrics of one daemon, in a registry of their own; `apply` takes the messages
    observers send (from any thread)."""

    def __init__(self, worker: str, instance: str, *, lanes: Sequence[str] = ()) -> None:
        self.worker, self.instance = worker, instance
        self.lanes = tuple(lanes)
        self.registry = CollectorRegistry()
        labels = ("worker", "instance", "lane") if lanes else ("worker", "instance")
        r = self.registry
        self.records = Counter("stream_worker_records", "Records consumed by committed "
                               "transactions", labels, registry=r)  # fmt: skip
        self.outputs = Counter("stream_worker_outputs", "Records produced by committed "
                               "transactions (dead letters not counted)", labels, registry=r)  # fmt: skip
        self.dead_letters = Counter("stream_worker_dead_letters", "Records sent to a "
                                    "dead-letter topic by committed transactions", labels,
                                    registry=r)  # fmt: skip
        self.transactions = Counter("stream_worker_transactions", "Transactions by outcome",
                                    (*labels, "outcome"), registry=r)  # fmt: skip
        self.batch_seconds = Histogram("stream_worker_batch_seconds", "Processing and commit "
                                       "of a committed batch", labels, buckets=BATCH_BUCKETS,
                                       registry=r)  # fmt: skip
        self.lag = Gauge("stream_worker_lag_records", "Records behind the high watermark of an "
                         "assigned partition (at the last refresh)",
                         (*labels, "topic", "partition"), registry=r)  # fmt: skip
        self.counts = Counter("stream_worker_counts", "The worker's own counts (e.g. fired)",
                              (*labels, "count"), registry=r)  # fmt: skip
        self.events_dropped = Counter("stream_worker_events_dropped", "Prefect events dropped "
                                      "(the API unreachable or slow)", labels, registry=r)  # fmt: skip
        self._lock = threading.Lock()  # the last values seen, shared by the lanes' threads
        self._lag_series: dict[str | None, set[tuple[str, str]]] = {}
        self._seen: dict[tuple[str | None, str], int] = {}  # (lane, count) -> last total
        for lane in self.lanes or (None,):  # every series from the start, at 0
            values = self._labels(lane)
            for metric in (self.records, self.outputs, self.dead_letters, self.batch_seconds,
                           self.events_dropped):  # fmt: skip
                metric.labels(*values)
            for outcome in ("committed", "aborted"):
                self.transactions.labels(*values, outcome)

    def _labels(self, lane: str | None) -> tuple[str, ...]:
        base = (self.worker, self.instance)
        return (*base, lane or "") if self.lanes else base

    def apply(self, message: Message) -> None:
        """Apply one observer message: ("batch", lane, report) or ("progress", lane, lag,
        counts, events dropped)."""
        kind, lane, *rest = message
        if kind == "batch":
            self._batch(lane, *rest)
        elif kind == "progress":
            self._progress(lane, *rest)
        else:
            raise ValueError(f"unknown metrics message {kind!r}")

    def _batch(self, lane: str | None, report: BatchReport) -> None:
        values = self._labels(lane)
        self.transactions.labels(*values, report.outcome).inc()
        if report.outcome != "committed":
            return
        self.records.labels(*values).inc(report.records)
        self.outputs.labels(*values).inc(report.outputs)
        self.dead_letters.labels(*values).inc(report.dead_letters)
        self.batch_seconds.labels(*values).observe(report.seconds)

    def _progress(
        self, lane: str | None, lag: Lag, counts: Mapping[str, int], dropped: int | None
    ) -> None:
        values = self._labels(lane)
        with self._lock:
            series = {(topic, str(partition)) for topic, partition, _ in lag}
            for topic, partition in self._lag_series.get(lane, set()) - series:
                self.lag.remove(*values, topic, partition)  # revoked: no stale value
            self._lag_series[lane] = series
            for topic, partition, behind in lag:
                self.lag.labels(*values, topic, str(partition)).set(behind)
            # Totals kept by the worker: the counters move on by what is new.
            for name, total in counts.items():
                self._advance(self.counts.labels(*values, name), (lane, f"count:{name}"), total)
            if dropped is not None:
                self._advance(self.events_dropped.labels(*values), (lane, "dropped"), dropped)

    def _advance(self, counter: Any, key: tuple[str | None, str], total: int) -> None:
        new = total - self._seen.get(key, 0)
        if new > 0:
            counter.inc(new)
        self._seen[key] = max(total, self._seen.get(key, 0))

    def serve(self, port: int, host: str = DEFAULT_HOST) -> MetricsServer:
        """The HTTP endpoint (a daemon thread); raises MetricsPortError when it cannot
        listen there."""
        where = f"{host}:{port}"
        if not 1 <= port <= 65535:
            raise MetricsPortError(f"--metrics-port {port}: not a TCP port (1 to 65535)")
        # Only the series documented, not a `_created` timestamp beside each counter (a
        # switch of the whole process: a daemon serves these metrics only).
        disable_created_metrics()
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:  # in use, no permission, an unknown host
            reason = error.strerror or str(error)
            raise MetricsPortError(f"cannot serve metrics on {where} (--metrics-port "
                                   f"{port}): {reason}") from None  # fmt: skip
        log.info("metrics on http://%s/metrics", where)
        return MetricsServer(server, thread)


class MetricsServer:
    """A running endpoint; `close()` stops it and frees the port."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread
        self.port: int = server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- the observers ------------------------------------------------------------------------


def lag_of(runtime: Runtime) -> Lag:
    """The lag last refreshed, of partitions still assigned."""
    assigned = runtime.assigned
    return [(tp.topic, tp.partition, n) for tp, n in sorted(runtime.stats.lag.items())
            if tp in assigned]  # fmt: skip


class MetricsObserver(Observer):
    """Hands a runtime's batch reports and progress to `send` (WorkerMetrics.apply, or a
    queue's put towards the process that serves the metrics)."""

    def __init__(
        self,
        send: Callable[[Message], None],
        lane: str | None = None,
        dropped: Callable[[], int] | None = None,
    ) -> None:
        self.send, self.lane, self.dropped = send, lane, dropped

    def batch(self, runtime: Runtime, report: BatchReport) -> None:
        self.send(("batch", self.lane, report))

    def _progress(self, runtime: Runtime) -> None:
        dropped = self.dropped() if self.dropped is not None else None
        self.send(("progress", self.lane, lag_of(runtime), dict(runtime.stats.counts), dropped))

    started = rebalanced = tick = stopped = _progress  # type: ignore[assignment]


class EventsObserver(Observer):
    """The runtime's lifecycle as Prefect events: started, rebalanced, a heartbeat every
    `heartbeat_interval_s` (on the tick nearest to it), stopped."""

    def __init__(
        self,
        events: LifecycleEvents,
        heartbeat_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events, self.interval_s, self.clock = events, heartbeat_interval_s, clock
        self.last_heartbeat = clock()

    def started(self, runtime: Runtime) -> None:
        self.last_heartbeat = self.clock()
        self.events.started(runtime.status())

    def rebalanced(self, runtime: Runtime) -> None:
        self.events.rebalanced(runtime.status())

    def tick(self, runtime: Runtime) -> None:
        now = self.clock()
        # Half a tick early rather than a whole tick late: ticks do not divide the interval.
        if now - self.last_heartbeat >= self.interval_s - runtime.progress_interval_s / 2:
            self.last_heartbeat = now
            self.events.heartbeat(runtime.status())

    def stopped(self, runtime: Runtime) -> None:
        self.events.stopped(runtime.status())


def worker_events(
    worker: str, instance: str, *, group: str | None, settings: Settings
) -> LifecycleEvents:
    from stream_workers.events import WorkerEvents

    return WorkerEvents(worker, instance, group=group, settings=settings)


class _Forward:
    """Puts messages on a bounded queue without waiting; a full queue drops them."""

    def __init__(self, to: Any) -> None:
        self.to = to
        self.lost = 0

    def __call__(self, message: Message) -> None:
        try:
            self.to.put_nowait(message)
        except queue.Full:
            self.lost += 1
            if self.lost == 1 or self.lost % 1000 == 0:
                log.warning("metrics queue to the daemon full: %d message(s) dropped", self.lost)


# --- a daemon's telemetry -----------------------------------------------------------------


class Telemetry:
    """A daemon's metrics endpoint and Prefect events, and its runtimes' observers.

    `Telemetry(worker, instance, settings, port=...)` serves the metrics (raises
    MetricsPortError at once when it cannot); with `forward=queue` (a child process of a
    daemon) it serves nothing and sends its metrics to the daemon's `receive(queue)`.
    A context manager: `close()` closes the events and the endpoint.
    """

    def __init__(
        self,
        worker: str,
        instance: str | None,
        settings: Settings,
        *,
        port: int | None = None,
        host: str = DEFAULT_HOST,
        lanes: Sequence[str] = (),
        forward: Any = None,
        events: Callable[..., LifecycleEvents] = worker_events,
    ) -> None:
        self.worker, self.settings = worker, settings
        self.instance = instance or str(os.getpid())
        log_context(worker=worker, instance=self.instance)
        self._make_events = events
        self.events: dict[str | None, LifecycleEvents] = {}  # per lane
        self._receivers: list[tuple[threading.Thread, threading.Event]] = []
        self.server: MetricsServer | None = None
        if forward is not None:
            self.metrics = None
            self._send: Callable[[Message], None] = _Forward(forward)
        else:
            self.metrics = WorkerMetrics(worker, self.instance, lanes=lanes)
            self._send = self.metrics.apply
            if port is not None:
                self.server = self.metrics.serve(port, host)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def observers(self, group: str | None, lane: str | None = None) -> list[Observer]:
        """A runtime's observers: its metrics, and its events (as `<worker>-<lane>` for a
        lane: each lane is a runtime of its own)."""
        name = self.worker if lane is None else f"{self.worker}-{lane}"
        events = self._make_events(name, self.instance, group=group, settings=self.settings)
        self.events[lane] = events
        return [
            MetricsObserver(self._send, lane, lambda: events.dropped),
            EventsObserver(events, self.settings.stream_heartbeat_interval_s),
        ]

    def events_of(self, lane: str | None = None) -> LifecycleEvents:
        """The events of the runtime `observers(..., lane)` was called for."""
        return self.events[lane]

    def receive(self, messages: Any) -> None:
        """Apply what a child process forwards (`forward=`) until `close()`."""
        assert self.metrics is not None, "only the process serving the metrics receives"
        done = threading.Event()
        apply = self.metrics.apply

        def drain() -> None:
            while not done.is_set():
                try:
                    message = messages.get(timeout=0.2)
                except queue.Empty:
                    continue
                except (EOFError, OSError):  # the queue was closed under us
                    return
                try:
                    apply(message)
                except Exception:  # one bad message must not blind the daemon's metrics
                    log.exception("applying a forwarded metrics message %r", message[:2])

        thread = threading.Thread(target=drain, name="metrics-receiver", daemon=True)
        thread.start()
        self._receivers.append((thread, done))

    def close(self) -> None:
        for events in self.events.values():
            events.close()
        for thread, done in self._receivers:
            done.set()
            thread.join(5)
        if self.server is not None:
            self.server.close()
            self.server = None
