"""Prefect events of a stream worker: started, rebalanced, heartbeat, stopped, and one
`price_alert.fired` per fired alert.

A worker's own thread only builds the event (Prefect's `Event` model: id and `occurred`) and
puts it into a bounded buffer; a background thread sends it through Prefect's own events
client (`get_events_client()`: a websocket to `<PREFECT_API_URL>/events/in`). Whatever the
API does, the worker never waits for it:

- the buffer holds at most `STREAM_EVENTS_BUFFER` events; when it is full the oldest is
  dropped (the newest say what the worker is doing now) and counted (`dropped`, and the
  `events_dropped` field of every later event);
- the sender reconnects with exponential backoff (0.5 s doubling to 30 s); an event whose
  send fails 3 times on working connections is dropped, so a bad one cannot stall the rest,
  and so is one the API would refuse (not JSON, or larger than Prefect's maximum event size);
- each kind of failure is logged once, then at most once a minute, with the counts (the
  Prefect client's own warning per failed connection is filtered out on the sender thread);
- `close(timeout_s)` sends what it can within `timeout_s` and returns then at the latest.

Why not `prefect.events.emit_event`: its `EventsWorker` queue is unbounded by default
(PREFECT_EVENTS_WORKER_MAX_QUEUE_SIZE=0) and logs a warning per dropped event when bounded;
each event then waits for the client's own reconnect loop (11 attempts, ~8 s) while the API
is down, and a failed client logs an error per event; with no PREFECT_API_URL it starts an
ephemeral server. Here the client is created with `reconnection_attempts=0` (one attempt,
the backoff is ours), only when PREFECT_API_URL is set (Cloud URLs get Prefect's Cloud
client from the same function), and a fresh one per connection.

Delivery is at most once: events written to a connection that breaks before the server
read them are lost (Prefect's client resends those only on reconnects of the same client).

Dead letters are not one event per message: each heartbeat carries `new_dead_letters`
(since the previous heartbeat), and its resource the label
`stream-worker.new-dead-letters` = "true" / "false", since automation triggers match
resource labels, not payloads.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from tasks.settings import Settings

if TYPE_CHECKING:
    from prefect.events import Event
    from prefect.events.clients import EventsClient

log = logging.getLogger("stream_workers.events")

STARTED = "stream_worker.started"
STOPPED = "stream_worker.stopped"
REBALANCED = "stream_worker.rebalanced"
HEARTBEAT = "stream_worker.heartbeat"
ALERT_FIRED = "price_alert.fired"
NEW_DEAD_LETTERS_LABEL = "stream-worker.new-dead-letters"

# The fields of Runtime.status() every lifecycle event carries.
_STATUS_FIELDS = ("state", "pid", "assigned", "records", "outputs", "dead_letters", "commits",
                  "aborts", "rebalances", "counts", "lag")  # fmt: skip

_BACKOFF_INITIAL_S = 0.5
_BACKOFF_MAX_S = 30.0
_WARN_EVERY_S = 60.0
_SEND_ATTEMPTS = 3  # per event, on connections that were up
# Bounds on one connect (version check + websocket open + auth), one send and one
# disconnect (close handshake): an API that accepts connections but never answers
# cannot hold the sender longer.
_CONNECT_TIMEOUT_S = 30.0
_SEND_TIMEOUT_S = 30.0
_DISCONNECT_TIMEOUT_S = 5.0
_THREAD_PREFIX = "stream-worker-events:"


def _make_client() -> EventsClient:
    """Prefect's events client for the configured PREFECT_API_URL (never an ephemeral
    server: only called when that URL is set). One connection attempt; the sender retries."""
    from prefect.events.clients import get_events_client

    return get_events_client(reconnection_attempts=0)


def _configured_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return url if isinstance(url, str) and url else None


def _maximum_event_bytes() -> int:
    """The largest event (as JSON) the API accepts."""
    from prefect.settings import get_current_settings

    return get_current_settings().server.events.maximum_size_bytes


def _unsendable(event: Event, max_bytes: int) -> str | None:
    """Why the API would refuse `event` (or the client fail on it), if it would."""
    try:
        size = event.size_bytes
    except Exception as error:  # a payload value JSON cannot hold
        return f"not JSON-serialisable ({type(error).__name__}: {error})"
    return f"{size} bytes, more than the {max_bytes} allowed" if size > max_bytes else None


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class _SenderConnectionWarnings(logging.Filter):
    """Drops the Prefect client's warning on each failed connection attempt when it comes
    from a sender thread here, which reports failures itself, rate-limited."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            (record.threadName or "").startswith(_THREAD_PREFIX)
            and str(record.msg).startswith("Unable to connect")
        )


_filter_installed = False
_filter_lock = threading.Lock()


def _install_log_filter() -> None:
    global _filter_installed
    with _filter_lock:
        if not _filter_installed:
            logging.getLogger("prefect.events.clients").addFilter(_SenderConnectionWarnings())
            _filter_installed = True


class _RateLimited:
    """Says whether to log now: the first time, then at most once per `every_s`."""

    def __init__(self, every_s: float = _WARN_EVERY_S) -> None:
        self.every_s = every_s
        self.last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every_s:
            self.last = now
            return True
        return False

    def reset(self) -> None:
        self.last = None


class WorkerEvents:
    """The Prefect events of one stream worker process (`stream-worker.<worker>.<instance>`).

    Every method returns at once and never raises; disabled (STREAM_EVENTS_ENABLED=false, or
    no PREFECT_API_URL) every method is a no-op.
    """

    def __init__(
        self, worker: str, instance: str, *, group: str | None, settings: Settings
    ) -> None:
        self.worker = worker
        self.instance = instance
        self.group = group
        self.resource_id = f"stream-worker.{worker}.{instance}"
        self.enabled = False
        self._dropped = 0
        self._sent = 0
        self._dead_letters_seen = 0
        self._lock = threading.Lock()
        self._buffer: deque[Event] = deque()
        self._capacity = settings.stream_events_buffer
        self._in_hand: Event | None = None  # taken from the buffer, being sent
        self._closing = False
        self._abandoned = False  # close() gave up waiting: the sender sends nothing more
        self._waiting = False  # the sender waits for events: wake it on the next one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._drop_warnings = _RateLimited()
        self._failure_warnings = _RateLimited()
        self._refusal_warnings = _RateLimited()
        self._build_warnings = _RateLimited()
        self._failures = 0  # in a row
        self._thread: threading.Thread | None = None

        if not settings.stream_events_enabled:
            log.info("%s: Prefect events off (STREAM_EVENTS_ENABLED=false)", worker)
            return
        try:
            url = _configured_api_url()
            from prefect.events import Event

            self._event_model = Event
        except Exception as error:  # a broken Prefect profile must not stop the worker
            log.warning("%s: Prefect events off: cannot read the Prefect settings (%s: %s)",
                        worker, type(error).__name__, error)  # fmt: skip
            return
        if url is None:
            log.info("%s: Prefect events off (no PREFECT_API_URL)", worker)
            return
        self._url = _without_credentials(url)
        host = socket.gethostname()
        labels = {"prefect.resource.id": self.resource_id,
                  "prefect.resource.name": f"{worker}.{instance}",
                  "worker": worker, "instance": instance, "host": host}  # fmt: skip
        if group is not None:
            labels["group"] = group
        self._labels = labels
        _install_log_filter()
        # The thread sees the Prefect settings of this context (temporary_settings too).
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"{_THREAD_PREFIX}{worker}.{instance}",
            daemon=True,  # a sender stuck on the network must not keep the process alive
        )  # fmt: skip
        self._thread, self.enabled = thread, True  # before start: a failing sender turns it off
        try:
            thread.start()
        except RuntimeError as error:  # no thread to be had: no events, but the worker runs
            self._thread, self.enabled = None, False
            log.warning("%s: Prefect events off: cannot start the sender (%s)", worker, error)
            return
        log.info("%s: Prefect events to %s as %s (buffer %d)", worker, self._url,
                 self.resource_id, self._capacity)  # fmt: skip

    # --- the events ---------------------------------------------------------------------

    def started(self, status: dict) -> None:
        if self.enabled:
            self._emit(STARTED, self._lifecycle, status)

    def rebalanced(self, status: dict) -> None:
        if self.enabled:
            self._emit(REBALANCED, self._lifecycle, status)

    def heartbeat(self, status: dict) -> None:
        """Counts, lag and assignment now; `new_dead_letters` since the previous heartbeat,
        also as the resource label `stream-worker.new-dead-letters`."""
        if self.enabled:
            self._emit(HEARTBEAT, self._heartbeat, status)

    def stopped(self, status: dict) -> None:
        if self.enabled:
            self._emit(STOPPED, self._lifecycle, status)

    def alert_fired(self, alert: dict) -> None:
        """One fired alert (its notification message) as `price_alert.fired` of resource
        `price-alert.<alert id>`, related to this worker."""
        if self.enabled:
            self._emit(ALERT_FIRED, self._alert_fired, alert)

    @property
    def dropped(self) -> int:
        """Events dropped so far (buffer full, not sent by close(), refused 3 times)."""
        return self._dropped

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is buffered within `timeout_s`, then stop; never waits longer."""
        thread = self._thread
        if thread is None or self._closing:
            return
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._lock:
            self._closing = True
        self._wake_sender()
        thread.join(max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            log.info("%s: Prefect events closed (%d sent, %d dropped)", self.worker,
                     self._sent, self._dropped)  # fmt: skip
            return
        with self._lock:
            self._abandoned = True
            unsent = len(self._buffer) + (self._in_hand is not None)
            self._buffer.clear()
            self._in_hand = None
            self._dropped += unsent
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop ended meanwhile
                pass
        log.warning("%s: Prefect events: %d not sent within %.1fs of closing, dropped "
                    "(%d sent, %d dropped in all)", self.worker, unsent, timeout_s,
                    self._sent, self._dropped)  # fmt: skip

    # --- building and buffering (the worker's thread) -----------------------------------

    def _lifecycle(
        self, name: str, status: dict, labels: dict[str, str] | None = None, **extra: int
    ) -> Event:
        payload = {field: status[field] for field in _STATUS_FIELDS if field in status}
        payload["events_dropped"] = self._dropped
        payload.update(extra)
        return self._event_model(event=name, resource=labels or self._labels, payload=payload)

    def _heartbeat(self, name: str, status: dict) -> Event:
        total = int(status.get("dead_letters") or 0)
        # A total below the last one means the counters started over: all of it is new.
        new = total - self._dead_letters_seen if total >= self._dead_letters_seen else total
        labels = self._labels | {NEW_DEAD_LETTERS_LABEL: "true" if new else "false"}
        event = self._lifecycle(name, status, labels, new_dead_letters=new)
        self._dead_letters_seen = total
        return event

    def _alert_fired(self, name: str, alert: dict) -> Event:
        alert_id = str(alert.get("alert_id") or "unknown")
        resource = {"prefect.resource.id": f"price-alert.{alert_id}",
                    "prefect.resource.name": alert_id}  # fmt: skip
        if alert.get("product_id"):
            resource["product"] = str(alert["product_id"])
        related = [self._labels | {"prefect.resource.role": "stream-worker"}]
        return self._event_model(event=name, resource=resource, related=related,
                                 payload=dict(alert))  # fmt: skip

    def _emit(self, name: str, build: Callable[[str, dict], Event], data: dict) -> None:
        try:
            event = build(name, data)
        except Exception as error:  # a malformed status must not stop the worker
            with self._lock:
                self._dropped += 1
            if self._build_warnings.due():
                log.warning("%s: Prefect event %s not built (%s: %s); dropped", self.worker,
                            name, type(error).__name__, error)  # fmt: skip
            return
        self._put(event)

    def _put(self, event: Event) -> None:
        with self._lock:
            if self._closing:
                self._dropped += 1  # after close(): nothing sends it any more
                return
            full = len(self._buffer) >= self._capacity
            if full:
                self._buffer.popleft()
                self._dropped += 1
            self._buffer.append(event)
            wake, self._waiting = self._waiting, False
        if wake:
            self._wake_sender()
        if full and self._drop_warnings.due():
            log.warning("%s: Prefect events buffer full (%d): dropping the oldest (%d dropped "
                        "so far; the API at %s is unreachable or slow)", self.worker,
                        self._capacity, self._dropped, self._url)  # fmt: skip

    def _wake_sender(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not started yet: it looks at the buffer before it waits
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop has ended
            pass

    # --- sending (the sender thread) ----------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._send_all())
        except asyncio.CancelledError:  # close() gave up on it
            pass
        except Exception:  # a bug here must not reach the worker; say it once
            log.exception("%s: Prefect events sender failed; events off", self.worker)
            with self._lock:
                self._abandoned = True
                self._dropped += len(self._buffer)
                self._buffer.clear()
                self.enabled = False

    async def _send_all(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        backoff = _BACKOFF_INITIAL_S
        client: EventsClient | None = None
        attempts = 0  # sends of the event in hand that failed on a working connection
        max_bytes = _maximum_event_bytes()
        try:
            while True:
                event = await self._next()
                if event is None:
                    return
                refusal = _unsendable(event, max_bytes)
                if refusal is not None:  # the API would refuse it, or the client fail on it
                    self._give_up(event, refusal)
                    continue
                connected = False
                try:
                    if client is None:
                        client = _make_client()
                        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                            await client.__aenter__()
                    connected = True
                    async with asyncio.timeout(_SEND_TIMEOUT_S):
                        await client.emit(event)
                except Exception as error:
                    if client is not None:
                        await self._disconnect(client)
                        client = None
                    attempts = attempts + 1 if connected else attempts
                    if attempts >= _SEND_ATTEMPTS:
                        reason = f"{attempts} failed sends ({type(error).__name__}: {error})"
                        self._give_up(event, reason)
                        attempts = 0
                    self._failed(error, backoff)
                    if self._closing:  # no retries once closing: drop what is left
                        self._drop_rest()
                        return
                    await self._pause(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    continue
                backoff, attempts = _BACKOFF_INITIAL_S, 0
                with self._lock:
                    self._in_hand = None
                    self._sent += 1
                if self._failures:
                    self._recovered()
        finally:
            if client is not None:
                await self._disconnect(client)

    async def _next(self) -> Event | None:
        """The event to send (the one in hand first); None once closing and none is left."""
        assert self._wake is not None
        while True:
            with self._lock:
                if self._abandoned:
                    return None
                if self._in_hand is None and self._buffer:
                    self._in_hand = self._buffer.popleft()
                if self._in_hand is not None:
                    return self._in_hand
                if self._closing:
                    return None
                self._wake.clear()
                self._waiting = True
            await self._wake.wait()

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or until closing."""
        assert self._wake is not None
        deadline = time.monotonic() + seconds
        while not self._closing and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            try:
                async with asyncio.timeout(left):
                    await self._wake.wait()
            except TimeoutError:
                return

    async def _disconnect(self, client: EventsClient) -> None:
        try:
            async with asyncio.timeout(_DISCONNECT_TIMEOUT_S):
                await client.__aexit__(None, None, None)
        except Exception as error:  # the connection is gone either way
            log.debug("%s: closing the events connection: %r", self.worker, error)

    def _recovered(self) -> None:
        """An event went out after failures: say so, and warn afresh on the next ones."""
        log.info("%s: Prefect events: sending to %s again after %d failed attempt(s) "
                 "(%d dropped so far)", self.worker, self._url, self._failures,
                 self._dropped)  # fmt: skip
        self._failures = 0
        self._failure_warnings.reset()

    def _failed(self, error: Exception, backoff: float) -> None:
        self._failures += 1
        if self._failure_warnings.due():
            log.warning("%s: Prefect events: cannot send to %s (%s: %s); %d failed attempt(s) "
                        "in a row, retrying in %.1fs; %d buffered, %d dropped so far",
                        self.worker, self._url, type(error).__name__, error, self._failures,
                        backoff, len(self._buffer), self._dropped)  # fmt: skip

    def _give_up(self, event: Event, reason: str) -> None:
        with self._lock:
            if self._in_hand is event:
                self._in_hand = None
                self._dropped += 1
        if self._refusal_warnings.due():
            log.warning("%s: Prefect event %s %s dropped: %s (%d dropped so far)", self.worker,
                        event.event, event.id, reason, self._dropped)  # fmt: skip

    def _drop_rest(self) -> None:
        with self._lock:
            unsent = len(self._buffer) + (self._in_hand is not None)
            self._buffer.clear()
            self._in_hand = None
            self._dropped += unsent
        if unsent:
            log.warning("%s: Prefect events: %d not sent (the API at %s is unreachable), "
                        "dropped on closing", self.worker, unsent, self._url)  # fmt: skip
