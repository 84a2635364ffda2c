"""Broker-free stand-ins for kafka-python's KafkaProducer and KafkaConsumer.

Both record every call and can be told to raise a given error at a given call, so a test
can drive the stream runtime's commit and abort paths one branch at a time. They keep just
enough of the real clients' state to be coherent with each other:

- the producer enforces the transaction protocol (init, begin, send, commit or abort): a
  runtime that forgets to abort, or reuses a closed producer, fails the way a real one would;
- a send returns a future that completes when the producer flushes (or commits, or closes)
  and can be told to fail then, as kafka-python's does when the broker refuses a batch;
- offsets sent to a transaction reach the consumer's committed offsets when it commits;
- the consumer fetches from a per-partition log at its positions, so `seek` makes records
  come again exactly as with a broker, and `poll` can be scripted (fixed results, or a
  callable standing for what kafka-python does inside poll, e.g. running the rebalance
  listener).
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import IllegalStateError
from kafka.structs import OffsetAndMetadata

Records = dict[TopicPartition, list[ConsumerRecord]]


def record(
    topic: str,
    partition: int,
    offset: int,
    value: bytes | None = b"v",
    key: bytes | None = None,
    timestamp: int = 0,
) -> ConsumerRecord:
    """A consumed record as kafka-python builds it."""
    return ConsumerRecord(
        topic=topic, partition=partition, leader_epoch=0, offset=offset, timestamp=timestamp,
        timestamp_type=0, key=key, value=value, headers=[], checksum=None,
        serialized_key_size=len(key) if key is not None else -1,
        serialized_value_size=len(value) if value is not None else -1,
        serialized_header_size=-1,
    )  # fmt: skip


class _Recorder:
    """Records calls; raises a planned error at a planned call of a method."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self._counts: Counter[str] = Counter()
        self._planned: dict[str, dict[int, BaseException]] = defaultdict(dict)

    def fail(self, method: str, error: BaseException, *, at: int | None = None):
        """Raise `error` at call number `at` (1-based) of `method`; default: its next call."""
        n = self._counts[method] + 1 if at is None else at
        self._planned[method][n] = error
        return self

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, args, kwargs))
        self._counts[method] += 1
        error = self._planned[method].pop(self._counts[method], None)
        if error is not None:
            raise error

    def names(self) -> list[str]:
        """The methods called, in order."""
        return [name for name, _, _ in self.calls]

    def count(self, method: str) -> int:
        return self._counts[method]


# --- the producer -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    topic: str
    key: Any
    value: Any
    partition: int | None


class FakeFuture:
    """What `send` returns (kafka-python's FutureRecordMetadata): done once its producer
    flushes, commits or closes; `failed()` then says whether the broker refused it."""

    def __init__(self, sent: Sent, error: BaseException | None = None) -> None:
        self.sent = sent
        self._error = error
        self.is_done = False
        self.value: Sent | None = None
        self.exception: BaseException | None = None

    def _complete(self) -> None:
        if not self.is_done:
            self.is_done = True
            if self._error is None:
                self.value = self.sent
            else:
                self.exception = self._error

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def failed(self) -> bool:
        return self.is_done and self.exception is not None

    def get(self, timeout: float | None = None) -> Sent:
        self._complete()  # as if it waited for the broker
        if self.exception is not None:
            raise self.exception
        return self.sent

    def add_callback(self, fn, *args, **kwargs):
        return self

    def add_errback(self, fn, *args, **kwargs):
        return self


class FakeProducer(_Recorder):
    """A KafkaProducer; transactional ones follow the transaction protocol.

    `sent` is every send; `visible` what a read_committed reader would see (sends of
    committed transactions, or every delivered send of a non-transactional producer);
    `aborted` the sends of aborted transactions. `fail_delivery` makes a send's future fail
    (the send is then never visible; a transaction with such a send cannot commit).
    """

    def __init__(self, *, transactional: bool | None = None, partitions: int = 3) -> None:
        super().__init__()
        self.transactional = transactional
        self.partitions = partitions
        self.config: dict[str, Any] = {}
        self.sent: list[Sent] = []
        self.visible: list[Sent] = []
        self.aborted: list[Sent] = []
        self.committed_offsets: list[dict[TopicPartition, OffsetAndMetadata]] = []
        self.initialised = False
        self.closed = False
        self.close_timeouts: list[float | None] = []
        self._open: list[Sent] | None = None
        self._offsets: tuple[dict, Any] | None = None
        self._undelivered: dict[int, BaseException] = {}  # send number -> its future's error
        self._pending: list[FakeFuture] = []
        self._transaction_error: BaseException | None = None
        self._refused_offsets: dict[TopicPartition, OffsetAndMetadata] = {}

    def fail_delivery(self, error: BaseException, *, at: int | None = None) -> FakeProducer:
        """The future of send number `at` (1-based; default: the next send) fails with
        `error` when it completes, as when the broker refuses the record's batch."""
        n = self.count("send") + 1 if at is None else at
        self._undelivered[n] = error
        return self

    def _complete_sends(self) -> None:
        for future in self._pending:
            future._complete()
        self._pending = []

    @property
    def in_transaction(self) -> bool:
        return self._open is not None

    def _usable(self) -> None:
        if self.closed:
            raise IllegalStateError("the producer is closed")

    def init_transactions(self) -> None:
        self._call("init_transactions")
        self._usable()
        if not self.transactional:
            raise IllegalStateError("not a transactional producer")
        self.initialised = True

    def begin_transaction(self) -> None:
        self._call("begin_transaction")
        self._usable()
        if not self.initialised:
            raise IllegalStateError("init_transactions first")
        if self._open is not None:
            raise IllegalStateError("a transaction is already in progress")
        self._open = []

    def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
        self._call("send", topic, value=value, key=key, partition=partition)
        self._usable()
        error = self._undelivered.pop(self.count("send"), None)
        sent = Sent(topic, key, value, partition)
        if self.transactional:
            if self._open is None:
                raise IllegalStateError("send outside a transaction")
            if error is None:
                self._open.append(sent)
            else:
                self._transaction_error = error
        elif error is None:
            self.visible.append(sent)
        self.sent.append(sent)
        future = FakeFuture(sent, error)
        self._pending.append(future)
        return future

    def send_offsets_to_transaction(self, offsets, group_metadata) -> None:
        """As kafka-python 3.0: offsets the group refused (a failed call) stay pending in
        the producer, across the abort, and commit with its next transaction's offsets."""
        try:
            self._call("send_offsets_to_transaction", offsets, group_metadata)
        except Exception:
            self._refused_offsets.update(offsets)
            raise
        self._usable()
        if self._open is None:
            raise IllegalStateError("no transaction in progress")
        self._offsets = ({**self._refused_offsets, **offsets}, group_metadata)
        self._refused_offsets = {}

    def commit_transaction(self) -> None:
        self._call("commit_transaction")
        self._usable()
        if self._open is None:
            raise IllegalStateError("no transaction in progress")
        self._complete_sends()  # commit_transaction flushes
        if self._transaction_error is not None:  # left open: it must be aborted
            raise self._transaction_error
        self.visible.extend(self._open)
        if self._offsets is not None:
            offsets, metadata = self._offsets
            self.committed_offsets.append(offsets)
            consumer = getattr(metadata, "consumer", None)
            if consumer is not None:
                consumer.committed_offsets.update({tp: om.offset for tp, om in offsets.items()})
        self._open, self._offsets = None, None

    def abort_transaction(self) -> None:
        self._call("abort_transaction")
        self._usable()
        if self._open is not None:
            self.aborted.extend(self._open)
        self._open, self._offsets, self._transaction_error = None, None, None

    def flush(self, timeout=None) -> None:
        self._call("flush", timeout=timeout)
        self._usable()
        self._complete_sends()

    def partitions_for(self, topic: str) -> set[int]:
        self._call("partitions_for", topic)
        return set(range(self.partitions))

    def close(self, timeout=None, null_logger=False) -> None:
        self._call("close", timeout=timeout)
        self.close_timeouts.append(timeout)
        self._complete_sends()
        self.closed = True


class ProducerFactory:
    """Builds producers: the planned ones first, then plain ones; `made` lists them all.

    Usable as a Transactor's `make_producer` and, through `monkeypatch`, as
    `tasks.kafka.make_producer` (then a producer is transactional when it is given a
    `transactional_id`, unless the factory says otherwise).
    """

    def __init__(self, *planned: FakeProducer, transactional: bool | None = None) -> None:
        self.planned = deque(planned)
        self.transactional = transactional
        self.made: list[FakeProducer] = []

    def __call__(self, *args: Any, **kwargs: Any) -> FakeProducer:
        producer = self.planned.popleft() if self.planned else FakeProducer()
        if producer.transactional is None:
            producer.transactional = (
                self.transactional
                if self.transactional is not None
                else "transactional_id" in kwargs
            )
        producer.config.update(kwargs)
        self.made.append(producer)
        return producer

    def transactional_producers(self) -> list[FakeProducer]:
        return [p for p in self.made if p.transactional]


# --- the consumer -------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeGroupMetadata:
    """What `group_metadata()` returns: which consumer (and generation) offsets bind to."""

    consumer: FakeConsumer
    generation: int


Step = Records | Callable[["FakeConsumer"], Records | None] | BaseException


class FakeConsumer(_Recorder):
    """A KafkaConsumer over in-memory partition logs.

    `poll` runs the next scripted step when there is one: a dict is returned as is (the
    positions move past it, as kafka-python's do), an exception is raised, a callable is
    called with the consumer (what happens inside poll: e.g. `rebalance`) and its result
    returned, or, if it returns None, a fetch from the logs. Without a script, poll fetches
    from the logs at the positions of the assigned, unpaused partitions.

    `positions_unknown[tp] = n`: the next n `position(tp)` calls answer None, as
    kafka-python's does while the partition's offset is still being looked up.
    """

    def __init__(
        self,
        records: Iterable[ConsumerRecord] = (),
        *,
        assignment: Iterable[TopicPartition] = (),
        topics: dict[str, int] | None = None,
        end_offsets: dict[TopicPartition, int] | None = None,
    ) -> None:
        super().__init__()
        self.log: dict[TopicPartition, list[ConsumerRecord]] = defaultdict(list)
        self.append(*records)
        self.partition_counts = dict(topics or {})
        self.end_override = dict(end_offsets or {})
        self._assigned: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.positions_unknown: Counter[TopicPartition] = Counter()
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.paused_partitions: set[TopicPartition] = set()
        self.highwaters: dict[TopicPartition, int] = {}
        self.listener = None
        self.subscribed: list[str] = []
        self.script: deque[Step] = deque()
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, OffsetAndMetadata]] = []
        self.generation = 1
        self.config: dict[str, Any] = {"group_id": "test-group"}
        self.closed = False
        self._fetcher = None  # kafka-python's Fetcher lives here; tests may set a real one
        if assignment:
            self._add(set(assignment))

    # --- the logs and the script ----------------------------------------------------------

    def append(self, *records: ConsumerRecord) -> None:
        """Records produced to the logs (a later fetch returns them)."""
        for r in records:
            self.log[TopicPartition(r.topic, r.partition)].append(r)

    def then(self, *steps: Step) -> FakeConsumer:
        self.script.extend(steps)
        return self

    def _beginning(self, tp: TopicPartition) -> int:
        return self.log[tp][0].offset if self.log.get(tp) else 0

    def _end(self, tp: TopicPartition) -> int:
        return self.log[tp][-1].offset + 1 if self.log.get(tp) else 0

    def fetch(self, max_records: int | None = None) -> Records:
        """Records at the positions of the fetchable partitions; the positions move on."""
        remaining = max_records if max_records is not None else 1 << 30
        fetched: Records = {}
        for tp in sorted(self._assigned - self.paused_partitions):
            if remaining <= 0:
                break
            position = self.positions.get(tp)
            if position is None:
                continue
            batch = [r for r in self.log.get(tp, ()) if r.offset >= position][:remaining]
            if batch:
                fetched[tp] = batch
                remaining -= len(batch)
                self.positions[tp] = batch[-1].offset + 1
        return fetched

    def poll(self, timeout_ms=0, max_records=None, update_offsets=True) -> Records:
        self._call("poll", timeout_ms=timeout_ms, max_records=max_records)
        if not self.script:
            return self.fetch(max_records)
        step = self.script.popleft()
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            result = step(self)
            return self.fetch(max_records) if result is None else result
        for tp, rs in step.items():
            if rs and tp in self._assigned:
                self.positions[tp] = rs[-1].offset + 1
        return step

    # --- the group ----------------------------------------------------------------------

    def topics(self) -> set[str]:
        self._call("topics")
        return set(self.partition_counts)

    def subscribe(self, topics=(), pattern=None, listener=None) -> None:
        self._call("subscribe", topics, listener=listener)
        self.subscribed = list(topics)
        self.listener = listener

    def rebalance(self, *, revoked=(), assigned=(), lost=()) -> None:
        """What kafka-python's coordinator does in a rebalance: run the listener (on its
        thread, inside poll) and change the assignment."""
        revoked, assigned, lost = set(revoked), set(assigned), set(lost)
        self.generation += 1
        if lost:
            if self.listener is not None:
                self.listener.on_partitions_lost(lost)
            self._remove(lost)
        if revoked:
            if self.listener is not None:
                self.listener.on_partitions_revoked(revoked)
            self._remove(revoked)
        if assigned:
            self._add(assigned)
            if self.listener is not None:
                self.listener.on_partitions_assigned(assigned)

    def _add(self, tps: set[TopicPartition]) -> None:
        for tp in tps - self._assigned:
            self.positions[tp] = self.committed_offsets.get(tp, self._beginning(tp))
        self._assigned |= tps

    def _remove(self, tps: set[TopicPartition]) -> None:
        self._assigned -= tps
        self.paused_partitions -= tps
        for tp in tps:
            self.positions.pop(tp, None)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def assign(self, partitions) -> None:
        self._call("assign", list(partitions))
        wanted = set(partitions)
        self._remove(self._assigned - wanted)
        self._add(wanted)

    def group_metadata(self) -> FakeGroupMetadata:
        self._call("group_metadata")
        return FakeGroupMetadata(self, self.generation)

    def committed(self, partition, metadata=False, timeout_ms=None):
        self._call("committed", partition)
        return self.committed_offsets.get(partition)

    def commit(self, offsets=None, timeout_ms=None) -> None:
        self._call("commit", offsets)
        self.commits.append(dict(offsets or {}))
        self.committed_offsets.update({tp: om.offset for tp, om in (offsets or {}).items()})

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        self._call("partitions_for_topic", topic)
        n = self.partition_counts.get(topic)
        return set(range(n)) if n else None

    # --- positions ----------------------------------------------------------------------

    def seek(self, partition, offset) -> None:
        self._call("seek", partition, offset)
        if partition not in self._assigned:  # as kafka-python
            raise ValueError("Unassigned partition")
        self.seeks.append((partition, offset))
        self.positions[partition] = offset

    def seek_to_beginning(self, *partitions) -> None:
        self._call("seek_to_beginning", *partitions)
        for tp in partitions or tuple(self._assigned):
            self.positions[tp] = self._beginning(tp)

    def seek_to_end(self, *partitions) -> None:
        self._call("seek_to_end", *partitions)
        for tp in partitions or tuple(self._assigned):
            self.positions[tp] = self.end_override.get(tp, self._end(tp))

    def position(self, partition, timeout_ms=None) -> int | None:
        self._call("position", partition)
        if self.positions_unknown[partition] > 0:
            self.positions_unknown[partition] -= 1
            return None
        return self.positions[partition]

    def end_offsets(self, partitions, timeout_ms=None) -> dict[TopicPartition, int]:
        self._call("end_offsets", list(partitions))
        return {tp: self.end_override.get(tp, self._end(tp)) for tp in partitions}

    def beginning_offsets(self, partitions, timeout_ms=None) -> dict[TopicPartition, int]:
        self._call("beginning_offsets", list(partitions))
        return {tp: self._beginning(tp) for tp in partitions}

    def highwater(self, partition) -> int | None:
        return self.highwaters.get(partition)

    # --- flow control and lifecycle -----------------------------------------------------

    def pause(self, *partitions) -> None:
        self._call("pause", *partitions)
        self.paused_partitions |= set(partitions)

    def resume(self, *partitions) -> None:
        self._call("resume", *partitions)
        self.paused_partitions -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_partitions)

    def close(self, autocommit=True, timeout_ms=None) -> None:
        self._call("close", autocommit=autocommit)
        self.closed = True


class ConsumerFactory:
    """Hands out the given consumers in order (as `monkeypatch`ed `make_consumer`),
    recording the arguments of each call."""

    def __init__(self, *consumers: FakeConsumer) -> None:
        self.consumers = deque(consumers)
        self.requests: list[tuple[tuple, dict]] = []

    def __call__(self, *topics: str, **kwargs: Any) -> FakeConsumer:
        self.requests.append((topics, kwargs))
        if not self.consumers:
            raise AssertionError(f"no fake consumer left for make_consumer{topics, kwargs}")
        return self.consumers.popleft()
