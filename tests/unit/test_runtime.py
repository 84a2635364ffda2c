"""The stream runtime's commit path, abort policy and loop, without a broker.

Every branch of `Transactor.commit` / `Runtime._commit` is driven with the fakes of
`tests/unit/fakes.py`: a producer that follows the transaction protocol and fails on demand,
and a consumer whose `seek` makes records come again as a broker's would. The last tests
run each worker's own hooks on the same fakes.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import CompletedFetch, Fetcher
from kafka.consumer.subscription_state import SubscriptionState
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    UnknownMemberIdError,
)
from kafka.producer.transaction_manager import (
    ProducerIdAndEpoch,
    TransactionManager,
    TransactionState,
)
from kafka.record.memory_records import MemoryRecordsBuilder
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from stream_workers.runtime import (
    Batch,
    BatchReport,
    Observer,
    Runtime,
    Transactor,
    _restore_parked_records,
)
from tasks.kafka import ReadTimeoutError, StopSignal, decode_json, read_records, read_to_end
from tasks.settings import Settings
from tests.unit.fakes import FakeConsumer, FakeProducer, ProducerFactory, record

SETTINGS = Settings(_env_file=None)
TOPIC = "t"


def tp(partition: int, topic: str = TOPIC) -> TopicPartition:
    return TopicPartition(topic, partition)


def log_of(partition: int, first: int, *values: bytes, topic: str = TOPIC):
    """Records of one partition with consecutive offsets from `first`."""
    return [
        record(topic, partition, first + i, value=v, key=b"k%d" % (first + i))
        for i, v in enumerate(values)
    ]


def offsets_of(records) -> dict[TopicPartition, list[int]]:
    return {p: [r.offset for r in rs] for p, rs in records.items()}


class Processor:
    """A worker with trivial rules: a record becomes one output (its value upper-cased),
    b"bad" is dead-lettered, b"boom" makes `process` raise (a bug, not bad input).

    With a dict of transactors, one transaction per partition (as price-alerts);
    otherwise one per poll (as transaction-alerts)."""

    name = "test-worker"

    def __init__(self, transactors: Transactor | dict[int, Transactor]) -> None:
        self.transactors = transactors
        self.processed: list[dict[TopicPartition, list[int]]] = []
        self.committed: list[Batch] = []
        self.aborted: list[dict[TopicPartition, list[int]]] = []
        self.assigned: list[set[TopicPartition]] = []
        self.revoked: list[set[TopicPartition]] = []
        self.during_process = None  # called with the records, e.g. to signal a stop

    def scopes(self, polled):
        if isinstance(self.transactors, dict):
            return [(self.transactors[p.partition], {p: polled[p]}) for p in sorted(polled)]
        return [(self.transactors, polled)]

    def process(self, records) -> Batch:
        self.processed.append(offsets_of(records))
        if self.during_process is not None:
            self.during_process(records)
        batch = Batch(records, state=offsets_of(records))
        for r in (r for rs in records.values() for r in rs):
            if r.value == b"boom":
                raise ValueError(f"cannot handle {r.value!r}")
            if r.value == b"bad":
                batch.dead_letter(r, "not a number")
                continue
            batch.emit("out", r.key, r.value.upper())
        return batch

    def on_committed(self, batch: Batch) -> None:
        self.committed.append(batch)

    def on_aborted(self, records) -> None:
        self.aborted.append(offsets_of(records))

    def on_assigned(self, partitions) -> None:
        self.assigned.append(set(partitions))

    def on_revoked(self, partitions) -> None:
        self.revoked.append(set(partitions))


def runtime_for(processor, consumer, **options) -> Runtime:
    options = {"max_records": 100, "abort_backoff_s": 0, "poll_timeout_ms": 0} | options
    return Runtime(processor, consumer, [TOPIC], **options)


def subscribed_runtime() -> tuple[FakeConsumer, Processor, Runtime]:
    """A subscribed runtime over an empty consumer, for rebalance tests."""
    consumer = FakeConsumer()
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    runtime = runtime_for(processor, consumer)
    runtime.subscribe()
    return consumer, processor, runtime


def outputs(producer: FakeProducer, topic: str = "out") -> list:
    return [s.value for s in producer.visible if s.topic == topic]


class Recording(Observer):
    """Records every hook call with what the runtime says at that moment."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []
        self.reports: list[BatchReport] = []

    def started(self, runtime):
        self.seen.append(("started", runtime.state, sorted(runtime.assigned)))

    def rebalanced(self, runtime):
        # How many assignments the worker had applied (restored) by then.
        self.seen.append(("rebalanced", runtime.state, sorted(runtime.assigned),
                          len(runtime.processor.assigned)))  # fmt: skip

    def batch(self, runtime, report):
        self.reports.append(report)
        self.seen.append(("batch", report.outcome, report.records, report.outputs,
                          report.dead_letters))  # fmt: skip

    def tick(self, runtime):
        self.seen.append(("tick", dict(runtime.stats.lag)))

    def stopped(self, runtime):
        self.seen.append(("stopped", runtime.state))


class FakeClock:
    """A `time.monotonic` for a module under test; `InstantStop.wait` moves it on."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now


class InstantStop(StopSignal):
    """A StopSignal whose `wait` returns at once, recording the timeout (and moving a
    FakeClock on by it): waits and retries without real sleeping."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout_s: float) -> bool:
        self.waits.append(timeout_s)
        if self.clock is not None:
            self.clock.now += timeout_s
        return bool(self)


# --- the commit -------------------------------------------------------------------------


def test_a_batch_commits_outputs_dead_letters_and_offsets_in_one_transaction():
    records = log_of(0, 10, b"a", b"bad", b"c") + log_of(1, 5, b"d", b"e")
    consumer = FakeConsumer(records, assignment={tp(0), tp(1)})
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    observer = Recording()
    runtime = runtime_for(processor, consumer, observers=[observer])

    assert runtime.step() == 5

    [producer] = factory.made
    assert producer.names() == [
        "init_transactions", "begin_transaction", "send", "send", "send", "send", "send",
        "send_offsets_to_transaction", "commit_transaction",
    ]  # fmt: skip
    assert outputs(producer) == [b"A", b"C", b"D", b"E"]
    [letter] = [s for s in producer.visible if s.topic == "t.dlq"]
    assert letter.key == b"k11"
    assert (letter.value["offset"], letter.value["reason"]) == (11, "not a number")
    # The next offset to read is the last one + 1, per partition, bound to the group.
    [(_, (offsets, metadata), _)] = [c for c in producer.calls if c[0].startswith("send_off")]
    assert offsets == {tp(0): OffsetAndMetadata(13, "", -1), tp(1): OffsetAndMetadata(7, "", -1)}
    assert metadata.consumer is consumer
    stats = runtime.stats
    assert (stats.records, stats.outputs, stats.dead_letters, stats.commits, stats.aborts) == (
        5, 4, 1, 1, 0,
    )  # fmt: skip
    [report] = observer.reports
    assert (report.worker, report.outcome, report.records, report.outputs, report.dead_letters) == (
        "test-worker", "committed", 5, 4, 1,
    )  # fmt: skip
    assert report.seconds == processor.committed[0].seconds >= 0
    assert [b.state for b in processor.committed] == [{tp(0): [10, 11, 12], tp(1): [5, 6]}]
    assert processor.aborted == []
    assert consumer.seeks == []


@pytest.mark.parametrize("exactly_once", [True, False])
def test_a_batch_that_consumes_nothing_commits_its_outputs_and_no_offsets(exactly_once):
    consumer = FakeConsumer(assignment={tp(0)})
    factory = ProducerFactory(transactional=exactly_once)
    transactor = Transactor(factory, SETTINGS, exactly_once=exactly_once)
    batch = Batch({}, dead_letters=[(log_of(0, 3, b"x")[0], "bad changelog record: x")])
    batch.emit("changelog", b"k", b"repaired", 0)

    transactor.commit(consumer, batch)

    [producer] = factory.made
    assert "send_offsets_to_transaction" not in producer.names()
    assert next((s.topic, s.value) for s in producer.visible) == ("changelog", b"repaired")
    assert [s.value["reason"] for s in producer.visible if s.topic == "t.dlq"] == [
        "bad changelog record: x"
    ]
    assert consumer.commits == []


@pytest.mark.parametrize(
    "error", [CommitFailedError("rebalanced"), IllegalGenerationError("stale generation")]
)
def test_a_stale_generation_aborts_the_batch_and_rewinds_only_partitions_still_assigned(error):
    consumer = FakeConsumer(log_of(0, 3, b"a", b"b") + log_of(1, 8, b"c"))
    factory = ProducerFactory(FakeProducer().fail("send_offsets_to_transaction", error),
                              transactional=True)  # fmt: skip
    transactor = Transactor(factory, SETTINGS)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)
    runtime.subscribe()
    consumer.then(lambda c: c.rebalance(assigned={tp(0), tp(1)}) or {})
    assert runtime.step() == 0  # the assignment
    # Partition 1 is taken away between poll and commit: the commit is refused.
    transactor.before_commit = lambda batch: consumer.rebalance(revoked={tp(1)})
    observer = Recording()
    runtime.observers.append(observer)

    runtime.step()

    [producer] = factory.made
    assert producer.count("abort_transaction") == 1
    assert producer.count("commit_transaction") == 0
    # Replaced (not fenced): the group refused its offsets, which it keeps pending.
    assert transactor.producer is None and producer.closed
    assert producer.visible == []
    assert [s.value for s in producer.aborted] == [b"A", b"B", b"C"]
    assert consumer.seeks == [(tp(0), 3)]  # not partition 1: no longer ours
    assert processor.aborted == [{tp(0): [3, 4], tp(1): [8]}]
    assert processor.committed == []
    assert (runtime.stats.aborts, runtime.stats.commits, runtime.stats.records) == (1, 0, 0)
    assert [r.outcome for r in observer.reports] == ["aborted"]

    # Read again on the replacement, the records of partition 0 commit.
    runtime.step()  # applies the queued revoke: that poll is read again
    runtime.step()
    [_, replacement] = factory.made
    assert outputs(replacement) == [b"A", b"B"]
    assert replacement.committed_offsets == [{tp(0): OffsetAndMetadata(5, "", -1)}]
    assert processor.revoked == [{tp(1)}]


def test_offsets_the_group_refused_never_commit_with_a_later_batch():
    # A zombie's batch of partition 0 is refused (its member left the group); another member
    # processes partition 0 on and commits; the zombie rejoins with partition 1 only. The
    # producer keeps refused offsets pending across the abort (kafka-python 3.0 does): the
    # next transaction must not carry them, or partition 0's committed offset goes back
    # behind its state (the changelog), and its next owner counts those records twice.
    consumer = FakeConsumer(log_of(0, 3, b"a", b"b") + log_of(1, 8, b"c"),
                            assignment={tp(0), tp(1)})  # fmt: skip
    refusing = FakeProducer().fail("send_offsets_to_transaction", CommitFailedError("left"))
    factory = ProducerFactory(refusing, transactional=True)
    transactor = Transactor(factory, SETTINGS)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)
    runtime.subscribe()
    runtime.assigned = {tp(0), tp(1)}

    runtime.step()  # refused
    assert runtime.stats.aborts == 1 and consumer.committed_offsets == {}

    consumer.committed_offsets[tp(0)] = 20  # the other member's commits
    consumer.then(lambda c: c.rebalance(lost={tp(0), tp(1)}, assigned={tp(1)}) or {})
    runtime.step()  # the rebalance
    runtime.step()  # partition 1 read again, committed

    assert runtime.stats.commits == 1
    assert consumer.committed_offsets == {tp(0): 20, tp(1): 9}
    assert [list(c) for p in factory.made for c in p.committed_offsets] == [[tp(1)]]


def test_kafka_python_still_keeps_refused_offsets_pending_across_an_abort():
    """Why a producer whose offset commit failed is replaced: its transaction manager keeps
    the offsets and sends them with the next transaction's. When this fails, kafka-python
    changed: the replacement may no longer be needed (the test above still guards it)."""
    manager = TransactionManager(transactional_id="t", api_version=(2, 5))
    manager._transition_to(TransactionState.INITIALIZING)
    manager.set_producer_id_and_epoch(ProducerIdAndEpoch(1, 0))
    manager._transition_to(TransactionState.READY)
    manager.begin_transaction()

    def answer(response) -> None:  # the next request the sender would send, answered
        handler = heapq.heappop(manager._pending_requests)[2]
        handler.handle_response(response)

    refused = manager.send_offsets_to_transaction(
        {tp(0): OffsetAndMetadata(5, "", -1)}, ConsumerGroupMetadata("g", 3, "left-member")
    )
    answer(SimpleNamespace(error_code=0))  # AddOffsetsToTxn
    answer(SimpleNamespace(topics=[(TOPIC, [(0, UnknownMemberIdError.errno)])]))
    assert isinstance(refused._error, CommitFailedError)
    manager.begin_abort()
    answer(SimpleNamespace(error_code=0))  # EndTxn (abort)

    assert manager._test_is_ready()
    assert manager._pending_txn_offset_commits == {tp(0): OffsetAndMetadata(5, "", -1)}


def test_a_fenced_producer_is_not_aborted_but_replaced_before_the_next_batch():
    consumer = FakeConsumer(log_of(0, 0, b"a", b"b"), assignment={tp(0)})
    fenced = FakeProducer().fail("commit_transaction", ProducerFencedError("a newer instance"))
    factory = ProducerFactory(fenced, transactional=True)
    transactor = Transactor(factory, SETTINGS)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)

    runtime.step()

    assert fenced.count("abort_transaction") == 0  # a fenced producer cannot abort
    assert fenced.closed and fenced.close_timeouts == [0]
    assert transactor.producer is None and len(factory.made) == 1
    assert consumer.seeks == [(tp(0), 0)]
    assert processor.aborted == [{tp(0): [0, 1]}] and processor.committed == []

    runtime.step()

    [_, replacement] = factory.made
    assert replacement.names()[:2] == ["init_transactions", "begin_transaction"]
    assert outputs(replacement) == [b"A", b"B"]
    assert fenced.visible == []
    assert (runtime.stats.aborts, runtime.stats.commits) == (1, 1)


def test_a_failing_abort_replaces_the_producer_and_the_worker_goes_on():
    consumer = FakeConsumer(log_of(0, 0, b"a"), assignment={tp(0)})
    broken = FakeProducer().fail("send_offsets_to_transaction", CommitFailedError("rebalanced"))
    broken.fail("abort_transaction", KafkaTimeoutError("the coordinator is gone"))
    factory = ProducerFactory(broken, transactional=True)
    transactor = Transactor(factory, SETTINGS)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)

    runtime.step()  # no exception escapes

    assert broken.count("abort_transaction") == 1 and broken.closed
    assert transactor.producer is None
    assert processor.aborted == [{tp(0): [0]}] and runtime.stats.aborts == 1

    runtime.step()
    assert outputs(factory.made[1]) == [b"A"] and runtime.stats.commits == 1


def test_a_replacement_producer_that_cannot_initialise_aborts_the_batch_not_the_worker():
    consumer = FakeConsumer(log_of(0, 0, b"a"), assignment={tp(0)})
    fenced = FakeProducer().fail("commit_transaction", ProducerFencedError("fenced"))
    unready = FakeProducer().fail("init_transactions", KafkaTimeoutError("no coordinator"))
    factory = ProducerFactory(fenced, unready, transactional=True)
    transactor = Transactor(factory, SETTINGS)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)

    runtime.step()  # fenced: replaced lazily
    runtime.step()  # the replacement's init_transactions fails: this batch aborts

    assert unready.closed and unready.count("begin_transaction") == 0
    assert transactor.producer is None and runtime.stats.aborts == 2
    assert consumer.seeks == [(tp(0), 0), (tp(0), 0)]

    runtime.step()
    assert outputs(factory.made[2]) == [b"A"] and runtime.stats.commits == 1


def test_after_an_aborted_scope_the_later_scopes_of_the_poll_are_read_again():
    factories = {
        0: ProducerFactory(transactional=True),
        1: ProducerFactory(
            FakeProducer().fail("send_offsets_to_transaction", IllegalGenerationError("stale")),
            transactional=True,
        ),
        2: ProducerFactory(transactional=True),
    }
    transactors = {p: Transactor(f, SETTINGS) for p, f in factories.items()}
    records = log_of(0, 3, b"a", b"b") + log_of(1, 3, b"c", b"d") + log_of(2, 3, b"e", b"f")
    consumer = FakeConsumer(records, assignment={tp(0), tp(1), tp(2)})
    processor = Processor(transactors)
    runtime = runtime_for(processor, consumer)

    runtime.step()

    p0, p1, p2 = (factories[p].made[0] for p in range(3))
    assert outputs(p0) == [b"A", b"B"]
    assert p1.count("abort_transaction") == 1 and outputs(p1) == []
    assert p2.names() == ["init_transactions"]  # scope 3 was not processed
    assert processor.processed == [{tp(0): [3, 4]}, {tp(1): [3, 4]}]
    assert consumer.seeks == [(tp(1), 3), (tp(2), 3)]  # scope 1 committed: not rewound
    assert processor.aborted == [{tp(1): [3, 4]}]

    runtime.step()

    assert processor.processed[2:] == [{tp(1): [3, 4]}, {tp(2): [3, 4]}]
    p1_again = factories[1].made[1]  # p1 was replaced: its offsets were refused
    assert (outputs(p0), outputs(p1_again), outputs(p2)) == ([b"A", b"B"], [b"C", b"D"],
                                                             [b"E", b"F"])  # fmt: skip


def test_a_rebalance_is_applied_as_one_net_change_and_the_poll_is_read_again():
    records = log_of(0, 5, b"a", b"b") + log_of(1, 5, b"c", b"d")
    consumer = FakeConsumer(records)
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    runtime = runtime_for(processor, consumer)
    runtime.subscribe()

    def rebalance_while_polling(c: FakeConsumer):
        # kafka-python runs the listener inside poll; the fetched records still come back.
        fetched = c.fetch()
        c.rebalance(revoked={tp(0), tp(1)}, assigned={tp(1), tp(2)})
        return fetched

    consumer.then(
        lambda c: c.rebalance(assigned={tp(0), tp(1)}) or {},
        rebalance_while_polling,
        # Removed from the group, then given partition 1 back: others may have had it.
        lambda c: c.rebalance(lost={tp(1), tp(2)}, assigned={tp(1)}) or {},
        # Incremental (cooperative) assignment: only partition 3 is new to the processor.
        lambda c: c.rebalance(assigned={tp(3)}) or {},
        # Lost with no assignment in the same poll: revoked only.
        lambda c: c.rebalance(lost={tp(3)}) or {},
    )

    assert runtime.step() == 0
    assert processor.assigned == [{tp(0), tp(1)}] and processor.revoked == []
    assert runtime.stats.rebalances == 1

    assert runtime.step() == 0  # records of partitions 0 and 1 came, none processed
    # Partition 1, revoked and assigned again, was kept: no hook, its state stays.
    assert processor.revoked == [{tp(0)}]
    assert processor.assigned == [{tp(0), tp(1)}, {tp(2)}]
    assert processor.processed == []
    assert consumer.seeks == [(tp(1), 5)]  # partition 0 is gone: not seeked
    assert runtime.assigned == {tp(1), tp(2)} and runtime.stats.rebalances == 2

    assert runtime.step() == 0  # a lost partition given back is revoked and assigned anew
    assert processor.revoked[-1] == {tp(1), tp(2)} and processor.assigned[-1] == {tp(1)}
    assert runtime.assigned == {tp(1)} and runtime.stats.rebalances == 3

    assert runtime.step() == 0
    assert processor.assigned[-1] == {tp(3)} and len(processor.revoked) == 2
    assert runtime.assigned == {tp(1), tp(3)} and runtime.stats.rebalances == 4

    assert runtime.step() == 0
    assert processor.revoked[-1] == {tp(3)} and len(processor.assigned) == 4
    assert runtime.assigned == {tp(1)}
    assert runtime.stats.rebalances == 4  # counted per poll with an assignment

    assert runtime.step() == 2  # the records of partition 1, read again
    assert outputs(factory.made[0]) == [b"C", b"D"]


def test_a_partition_assigned_and_taken_back_within_one_poll_gets_no_hooks():
    consumer, processor, runtime = subscribed_runtime()

    def two_rebalances(c: FakeConsumer):
        c.rebalance(revoked={tp(0), tp(1)}, assigned={tp(0), tp(1), tp(2)})
        c.rebalance(revoked={tp(0), tp(1), tp(2)}, assigned={tp(0), tp(1)})
        return {}

    consumer.then(lambda c: c.rebalance(assigned={tp(0), tp(1)}) or {}, two_rebalances)
    runtime.step()
    runtime.step()

    # Against the assignment the hooks knew, nothing changed: partition 2 was never applied.
    assert processor.assigned == [{tp(0), tp(1)}] and processor.revoked == []
    assert runtime.assigned == {tp(0), tp(1)}
    assert runtime.stats.rebalances == 2  # once per poll that brought an assignment


# --- a processing bug ---------------------------------------------------------------------


def _boom_runtime():
    consumer = FakeConsumer(log_of(0, 0, b"a", b"boom", b"c") + log_of(1, 0, b"d"),
                            assignment={tp(0), tp(1)})  # fmt: skip
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    return consumer, factory, processor, runtime_for(processor, consumer, max_attempts=3)


def test_a_batch_whose_processing_raises_is_retried_then_isolated_record_by_record():
    consumer, factory, processor, runtime = _boom_runtime()
    [producer] = factory.made
    everything = {tp(0): [0, 1, 2], tp(1): [0]}

    for attempt in (1, 2):
        runtime.step()
        assert producer.names() == ["init_transactions"]  # nothing sent
        assert processor.aborted == [everything] * attempt
        assert consumer.seeks[-2:] == [(tp(0), 0), (tp(1), 0)]
        assert runtime.stats.aborts == attempt

    runtime.step()  # the third attempt fails too: one record at a time

    assert processor.processed[3:] == [{tp(0): [0]}, {tp(0): [1]}, {tp(0): [2]}, {tp(1): [0]}]
    assert outputs(producer) == [b"A", b"C", b"D"]
    [letter] = [s for s in producer.visible if s.topic == "t.dlq"]
    assert letter.value["offset"] == 1
    assert letter.value["reason"].startswith("processing failed: ValueError: cannot handle")
    assert letter.value["reason"] == "processing failed: ValueError: cannot handle b'boom'"
    assert producer.count("commit_transaction") == 4  # each record alone
    assert processor.aborted[-1] == {tp(0): [1]}
    assert runtime.stats.dead_letters == 1 and runtime.stats.records == 4


def test_records_committed_one_by_one_are_not_read_again():
    consumer, factory, _, runtime = _boom_runtime()
    for _ in range(3):
        runtime.step()
    [producer] = factory.made
    assert outputs(producer) == [b"A", b"C", b"D"]

    # Committed (offsets in their transactions): the consumer must be past them, else the
    # next poll processes them again, retries, and commits their outputs a second time.
    assert consumer.position(tp(0)) == 3, "the consumer was left at the failed batch's start"
    assert runtime.step() == 0
    # The loop goes on with what comes next, and only that.
    consumer.append(*log_of(0, 3, b"e"))
    assert runtime.step() == 1
    assert outputs(producer) == [b"A", b"C", b"D", b"E"]


def test_a_record_whose_lone_commit_aborts_is_read_again():
    consumer, factory, processor, runtime = _boom_runtime()
    [producer] = factory.made
    # The first lone commit (record 0 of partition 0) is refused.
    producer.fail("send_offsets_to_transaction", CommitFailedError("rebalanced"), at=1)
    for _ in range(3):
        runtime.step()
    assert processor.aborted[-1] == {tp(0): [0]} and outputs(producer) == []

    # Record 0 was not committed: the consumer must read it again, not skip it.
    assert consumer.position(tp(0)) == 0, "the record whose commit aborted is skipped"


def test_failures_are_counted_per_partition_and_first_offset_whatever_else_the_poll_holds():
    p0, p1 = log_of(0, 0, b"boom", b"a"), log_of(1, 0, b"b")
    consumer = FakeConsumer(p0 + p1, assignment={tp(0), tp(1)})
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    runtime = runtime_for(processor, consumer, max_attempts=3)
    # The partitions a poll brings vary: the batch starting at partition 0's offset 0 fails
    # each time, in company or alone.
    consumer.then({tp(0): p0, tp(1): p1}, {tp(0): p0}, {tp(0): p0, tp(1): p1})

    runtime.step()
    runtime.step()
    [producer] = factory.made
    assert producer.names() == ["init_transactions"] and runtime.stats.aborts == 2

    runtime.step()  # partition 0's third failure at offset 0: one record at a time

    assert processor.processed[3:] == [{tp(0): [0]}, {tp(0): [1]}, {tp(1): [0]}]
    assert outputs(producer) == [b"A", b"B"]
    [letter] = [s for s in producer.visible if s.topic == "t.dlq"]
    assert (letter.value["partition"], letter.value["offset"]) == (0, 0)
    assert runtime.step() == 0  # nothing is read again


def test_a_revoked_partition_counts_its_failures_afresh():
    consumer = FakeConsumer(log_of(0, 0, b"boom"))
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    runtime = runtime_for(processor, consumer, max_attempts=3)
    runtime.subscribe()
    consumer.then(lambda c: c.rebalance(assigned={tp(0)}) or {})
    runtime.step()
    [producer] = factory.made

    runtime.step()
    runtime.step()  # two failures
    consumer.then(lambda c: c.rebalance(lost={tp(0)}, assigned={tp(0)}) or {})
    runtime.step()  # lost and given back: whatever was counted is gone
    runtime.step()
    runtime.step()
    assert producer.names() == ["init_transactions"], "isolated before max_attempts"
    assert runtime.stats.aborts == 4

    runtime.step()  # the third failure since the partition came back
    [letter] = [s for s in producer.visible if s.topic == "t.dlq"]
    assert letter.value["offset"] == 0


class SeekingBack(Processor):
    """Like price-alerts, whose rebuild (its `on_aborted`) seeks the consumer back to the
    committed offsets: dropping a batch's state moves the positions to its first offsets."""

    def __init__(self, transactors, consumer: FakeConsumer) -> None:
        super().__init__(transactors)
        self.consumer = consumer

    def on_aborted(self, records) -> None:
        super().on_aborted(records)
        for partition, rs in records.items():
            self.consumer.seek(partition, rs[0].offset)


def test_after_isolating_a_failure_the_positions_are_past_the_batch_whatever_on_aborted_did():
    consumer = FakeConsumer(log_of(0, 0, b"a", b"boom", b"c") + log_of(1, 0, b"d"),
                            assignment={tp(0), tp(1)})  # fmt: skip
    factory = ProducerFactory(transactional=True)
    processor = SeekingBack(Transactor(factory, SETTINGS), consumer)
    runtime = runtime_for(processor, consumer, max_attempts=3)

    for _ in range(3):
        runtime.step()

    [producer] = factory.made
    assert outputs(producer) == [b"A", b"C", b"D"]
    assert processor.aborted[-1] == {tp(0): [1]}  # it seeked partition 0 back to 1
    assert (consumer.position(tp(0)), consumer.position(tp(1))) == (3, 1)
    assert runtime.step() == 0  # nothing committed is processed (and emitted) again
    assert outputs(producer) == [b"A", b"C", b"D"]


def test_a_stop_while_isolating_leaves_the_records_not_yet_committed_to_be_read_again():
    consumer, factory, processor, runtime = _boom_runtime()
    for _ in range(2):
        runtime.step()
    # Stopped while the first record runs alone: it commits, the rest is read again.
    processor.during_process = lambda records: len(processor.processed) == 4 and runtime.stop.set()

    runtime.step()

    [producer] = factory.made
    assert processor.processed[3:] == [{tp(0): [0]}]
    assert outputs(producer) == [b"A"]
    assert consumer.seeks[-2:] == [(tp(0), 1), (tp(1), 0)]
    assert (consumer.position(tp(0)), consumer.position(tp(1))) == (1, 0)


# --- after the commit ---------------------------------------------------------------------


def test_a_failure_after_the_commit_stops_the_worker_and_the_batch_is_not_processed_again():
    consumer = FakeConsumer(log_of(0, 0, b"a", b"b"), assignment={tp(0)})
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    runtime = runtime_for(processor, consumer)

    def broken(*_):
        raise RuntimeError("a bug after the commit")

    processor.on_committed = broken

    with pytest.raises(RuntimeError, match="a bug after the commit"):
        runtime.step()

    [producer] = factory.made
    assert producer.count("commit_transaction") == 1 and outputs(producer) == [b"A", b"B"]
    assert processor.processed == [{tp(0): [0, 1]}] and processor.aborted == []
    assert consumer.seeks == [] and consumer.position(tp(0)) == 2
    assert runtime.stats.aborts == 0
    # Were the worker to go on, it would not emit the batch's outputs a second time.
    assert runtime.step() == 0
    assert producer.count("commit_transaction") == 1


def test_a_failure_after_a_lone_commit_while_isolating_stops_the_worker_too():
    _, factory, processor, runtime = _boom_runtime()
    for _ in range(2):
        runtime.step()

    def broken(batch):
        raise RuntimeError("a bug after the commit")

    processor.on_committed = broken
    with pytest.raises(RuntimeError, match="a bug after the commit"):
        runtime.step()  # the first record alone commits, then on_committed raises

    [producer] = factory.made
    assert producer.count("commit_transaction") == 1 and outputs(producer) == [b"A"]
    assert processor.processed[3:] == [{tp(0): [0]}]


# --- observers ----------------------------------------------------------------------------


def test_observers_see_the_start_each_rebalance_each_batch_each_tick_and_the_stop(monkeypatch):
    import stream_workers.runtime as module

    consumer = FakeConsumer(log_of(0, 0, b"a", b"bad"), topics={TOPIC: 1})
    consumer.highwaters = {tp(0): 2}
    consumer.then(lambda c: c.rebalance(assigned={tp(0)}) or {})  # poll 1: the assignment
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    # The first commit (poll 2) aborts: the batch is read again and commits (poll 3).
    factory.made[0].fail("commit_transaction", CommitFailedError("rebalanced"), at=1)
    clock = FakeClock()
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=clock.monotonic))
    observer = Recording()
    runtime = runtime_for(processor, consumer, progress_interval_s=10, observers=[observer])

    def five_seconds_per_poll():
        clock.now += 5

    runtime.run(StopSignal().also(lambda: consumer.count("poll") >= 4),
                before_poll=five_seconds_per_poll)  # fmt: skip

    assert observer.seen == [
        ("started", "joining", []),
        # After the worker applied the assignment (its restore done).
        ("rebalanced", "running", [tp(0)], 1),
        ("batch", "aborted", 2, 1, 1),
        ("tick", {tp(0): 2}),  # every 10 s (2 polls), the lag just refreshed: rewound
        ("batch", "committed", 2, 1, 1),
        ("tick", {tp(0): 0}),
        ("stopped", "stopped"),
    ]


def test_a_run_that_raises_tells_the_observers_it_stopped_failed(tmp_path):
    consumer = FakeConsumer(log_of(0, 0, b"a"), assignment={tp(0)})
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    processor.on_committed = lambda batch: int("a bug")
    observer = Recording()
    runtime = runtime_for(processor, consumer, observers=[observer], instance="1",
                          status_dir=tmp_path)  # fmt: skip

    with pytest.raises(ValueError):
        runtime.run(StopSignal())

    assert observer.seen[-1] == ("stopped", "failed")
    assert json.loads((tmp_path / "test-worker.1.json").read_text())["state"] == "failed"


class Broken(Observer):
    def _raise(self, *args):
        raise RuntimeError("observer bug")

    started = rebalanced = batch = tick = stopped = _raise


def test_a_failing_observer_is_logged_and_neither_stops_the_worker_nor_the_others(caplog):
    consumer = FakeConsumer(log_of(0, 0, b"a", b"b"), topics={TOPIC: 1})
    consumer.then(lambda c: c.rebalance(assigned={tp(0)}) or {})
    factory = ProducerFactory(transactional=True)
    processor = Processor(Transactor(factory, SETTINGS))
    observer = Recording()
    runtime = runtime_for(processor, consumer, progress_interval_s=0,
                          observers=[Broken(), observer])  # fmt: skip
    consumer.append(*log_of(0, 2, b"c"))

    runtime.run(StopSignal().also(lambda: consumer.count("poll") >= 3))

    # Every batch committed once, none read again; the other observer saw everything.
    assert factory.made[0].count("commit_transaction") == 1
    assert outputs(factory.made[0]) == [b"A", b"B", b"C"] and consumer.seeks == []
    assert [s[0] for s in observer.seen] == ["started", "rebalanced", "tick", "batch", "tick",
                                             "tick", "stopped"]  # fmt: skip
    failed = [(m.group(1), r.exc_info is not None) for r in caplog.records
              if (m := re.match(r"test-worker: observer Broken\.(\w+) failed: RuntimeError: "
                                r"observer bug$", r.getMessage()))]  # fmt: skip
    # A traceback with the first failure of each hook only: a broken observer cannot
    # flood the log with tracebacks at every tick.
    assert failed == [("started", True), ("rebalanced", True), ("tick", True),
                      ("batch", True), ("tick", False), ("tick", False),
                      ("stopped", True)]  # fmt: skip


# --- at least once ------------------------------------------------------------------------


def test_at_least_once_sends_flushes_and_commits_offsets_without_transactions():
    consumer = FakeConsumer(log_of(0, 4, b"a", b"bad"), assignment={tp(0)})
    factory = ProducerFactory(transactional=False)
    transactor = Transactor(factory, SETTINGS, exactly_once=False)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)

    runtime.step()

    [producer] = factory.made
    assert producer.names() == ["send", "send", "flush"]
    assert consumer.commits == [{tp(0): OffsetAndMetadata(6, "", -1)}]
    assert outputs(producer) == [b"A"]


def test_at_least_once_a_refused_offset_commit_aborts_the_batch_and_reads_it_again():
    consumer = FakeConsumer(log_of(0, 6, b"c"), assignment={tp(0)})
    factory = ProducerFactory(transactional=False)
    transactor = Transactor(factory, SETTINGS, exactly_once=False)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)
    consumer.fail("commit", CommitFailedError("rebalanced"))

    runtime.step()  # not swallowed: aborted, the producer replaced, the batch read again

    [producer] = factory.made
    assert outputs(producer) == [b"C"]  # sent already: at least once
    assert producer.closed and transactor.producer is None
    assert consumer.commits == [] and consumer.seeks == [(tp(0), 6)]
    assert processor.aborted == [{tp(0): [6]}] and processor.committed == []
    assert (runtime.stats.commits, runtime.stats.aborts) == (0, 1)

    runtime.step()
    assert outputs(factory.made[1]) == [b"C"]  # the output twice, as at least once allows
    assert consumer.commits == [{tp(0): OffsetAndMetadata(7, "", -1)}]
    assert (runtime.stats.commits, runtime.stats.aborts) == (1, 1)


@pytest.mark.parametrize("where", ["future", "send"])
def test_at_least_once_a_failed_send_commits_no_offsets_and_reads_the_batch_again(where):
    consumer = FakeConsumer(log_of(0, 0, b"a", b"b"), assignment={tp(0)})
    flaky = FakeProducer()
    if where == "future":  # what kafka-python does: the send's future fails, flush does not
        flaky.fail_delivery(KafkaTimeoutError("batch expired"), at=2)
    else:
        flaky.fail("send", KafkaTimeoutError("buffer full"), at=2)
    factory = ProducerFactory(flaky, transactional=False)
    transactor = Transactor(factory, SETTINGS, exactly_once=False)
    processor = Processor(transactor)
    runtime = runtime_for(processor, consumer)

    runtime.step()

    assert consumer.count("commit") == 0, "offsets committed past an output never written"
    assert outputs(flaky) == [b"A"]
    assert flaky.closed and transactor.producer is None
    assert consumer.seeks == [(tp(0), 0)] and processor.aborted == [{tp(0): [0, 1]}]
    assert runtime.stats.aborts == 1

    runtime.step()
    assert outputs(factory.made[1]) == [b"A", b"B"]
    assert consumer.commits == [{tp(0): OffsetAndMetadata(2, "", -1)}]


def test_at_least_once_a_failed_flush_closes_the_producer_and_reads_the_batch_again():
    consumer = FakeConsumer(log_of(0, 0, b"a"), assignment={tp(0)})
    flaky = FakeProducer().fail("flush", KafkaTimeoutError("no acks"))
    factory = ProducerFactory(flaky, transactional=False)
    transactor = Transactor(factory, SETTINGS, exactly_once=False)
    runtime = runtime_for(Processor(transactor), consumer)

    runtime.step()

    assert flaky.closed and flaky.count("abort_transaction") == 0
    assert consumer.commits == [] and consumer.seeks == [(tp(0), 0)]
    runtime.step()
    assert outputs(factory.made[1]) == [b"A"] and consumer.commits


# --- stopping -----------------------------------------------------------------------------


def test_stop_signal_also_adds_conditions_and_shares_the_signal():
    flag = {"on": False}
    stop = StopSignal()
    combined = stop.also(lambda: flag["on"])
    assert not stop and not combined
    flag["on"] = True
    assert combined and not stop  # the condition is the combined signal's only
    flag["on"] = False
    stop.set()
    assert combined  # a signal to the original stops the combined one


def test_stop_signal_wait_returns_whether_stopped():
    stop = StopSignal()
    assert stop.wait(0) is False
    assert StopSignal().also(lambda: True).wait(0) is True
    stop.set()
    waited: list[bool] = []
    # Set: no waiting (an hour-long wait that returns before the deadline did not wait).
    waiter = threading.Thread(target=lambda: waited.append(stop.wait(3600)), daemon=True)
    waiter.start()
    waiter.join(60)
    assert waited == [True]


def test_run_finishes_the_batch_in_hand_once_stopped():
    records = log_of(0, 0, b"a") + log_of(1, 0, b"b") + log_of(2, 0, b"c")
    consumer = FakeConsumer(records, assignment={tp(0), tp(1), tp(2)}, topics={TOPIC: 3})
    factories = {p: ProducerFactory(transactional=True) for p in range(3)}
    processor = Processor({p: Transactor(f, SETTINGS) for p, f in factories.items()})
    stop = StopSignal()
    processor.during_process = lambda records: stop.set()  # SIGTERM while processing
    runtime = runtime_for(processor, consumer)

    runtime.run(stop)

    assert consumer.count("poll") == 1  # stop is checked between polls
    assert consumer.listener is not None and consumer.subscribed == [TOPIC]
    # Every scope of the poll in hand is processed and committed.
    assert [outputs(factories[p].made[0]) for p in range(3)] == [[b"A"], [b"B"], [b"C"]]
    assert processor.processed == [{tp(0): [0]}, {tp(1): [0]}, {tp(2): [0]}]
    assert consumer.seeks == [] and runtime.stats.commits == 3


def test_run_reports_lag_per_assigned_partition():
    consumer = FakeConsumer(log_of(0, 0, b"a", b"b"), assignment={tp(0), tp(1)})
    consumer.highwaters = {tp(0): 10}  # partition 1: highwater unknown yet
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    runtime = runtime_for(processor, consumer, progress_interval_s=0)

    runtime.run(StopSignal().also(lambda: consumer.count("poll") >= 1))

    assert runtime.stats.lag == {tp(0): 8}


def test_the_status_file_says_running_only_once_an_assignment_is_applied(tmp_path):
    consumer = FakeConsumer(log_of(0, 0, b"a", b"b", b"bad"), topics={TOPIC: 3})
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    runtime = runtime_for(processor, consumer, instance="7", status_dir=tmp_path / "status")
    path = tmp_path / "status" / "test-worker.7.json"
    seen_while_assigning = []
    processor.on_assigned = lambda tps: seen_while_assigning.append(json.loads(path.read_text()))
    consumer.then(lambda c: c.rebalance(assigned={tp(0), tp(1)}) or {})
    seen_after_poll = []

    runtime.run(
        StopSignal().also(lambda: consumer.count("poll") >= 2),
        after_poll=lambda: seen_after_poll.append(json.loads(path.read_text())),
    )

    # While the worker restores its partitions it is not running yet.
    assert [(s["state"], s["assigned"]) for s in seen_while_assigning] == [("joining", [])]
    first = seen_after_poll[0]
    assert (first["state"], first["assigned"]) == ("running", [f"{TOPIC}[0]", f"{TOPIC}[1]"])
    assert (first["worker"], first["instance"], first["group"]) == (
        "test-worker",
        "7",
        "test-group",
    )
    final = json.loads(path.read_text())
    assert final["state"] == "stopped" and final["pid"] == os.getpid()
    assert (final["records"], final["outputs"], final["dead_letters"]) == (3, 2, 1)
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind


def test_a_status_file_that_cannot_be_written_does_not_stop_the_worker(tmp_path):
    (tmp_path / "file").write_text("")
    consumer = FakeConsumer(log_of(0, 0, b"a"), assignment={tp(0)})
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    runtime = runtime_for(processor, consumer, status_dir=tmp_path / "file" / "status")

    runtime.run(StopSignal().also(lambda: consumer.count("poll") >= 1))

    assert runtime.stats.commits == 1


def test_close_runs_every_closer_even_when_one_fails_then_closes_the_consumer():
    closed = []

    def failing():
        closed.append("failing")
        raise RuntimeError("already closed")

    consumer = FakeConsumer()
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    runtime = Runtime(processor, consumer, [TOPIC], max_records=1,
                      closers=[failing, lambda: closed.append("second")])  # fmt: skip
    with runtime:
        pass
    assert closed == ["failing", "second"]
    assert consumer.closed and consumer.calls[-1] == ("close", (), {"autocommit": False})


def test_hold_pauses_the_assignment_and_release_resumes_it():
    consumer = FakeConsumer(log_of(0, 0, b"a") + log_of(2, 0, b"b"), assignment={tp(0), tp(1)})
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    runtime = runtime_for(processor, consumer)
    runtime.hold()
    runtime.hold()  # nothing new to pause
    assert consumer.paused() == {tp(0), tp(1)} and consumer.count("pause") == 1
    assert runtime.step() == 0
    consumer.rebalance(assigned={tp(2)})  # while held: the next hold pauses it too
    runtime.hold()
    assert consumer.calls[-1] == ("pause", (tp(2),), {})
    assert consumer.paused() == {tp(0), tp(1), tp(2)}
    runtime.release()
    assert consumer.paused() == set() and consumer.count("resume") == 1
    runtime.release()  # nothing paused: nothing to resume
    assert consumer.count("resume") == 1
    assert runtime.step() == 2


def test_retry_runs_an_action_until_it_stops_raising_kafka_errors_waiting_between_tries():
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    runtime = runtime_for(processor, FakeConsumer())
    runtime.stop = stop = InstantStop()
    tries = []

    def flaky():
        tries.append(len(tries))
        if len(tries) < 3:
            raise (KafkaTimeoutError if len(tries) == 1 else ReadTimeoutError)("slow broker")

    runtime.retry(flaky, "testing")
    assert len(tries) == 3 and stop.waits == [1.0, 1.0]

    def failing():
        tries.append(len(tries))
        raise KafkaTimeoutError("down")

    stop.set()
    runtime.retry(failing, "testing")  # stopping: gives up after the try
    assert len(tries) == 4 and stop.waits == [1.0, 1.0, 1.0]

    with pytest.raises(ValueError):  # not a Kafka error: a bug, not retried
        runtime.retry(lambda: int("x"), "testing")


# --- reading to the end -------------------------------------------------------------------


def test_read_to_end_stops_at_the_end_taken_at_the_start_and_leaves_the_partition_there():
    consumer = FakeConsumer(log_of(0, 0, b"0", b"1", b"2", b"3", b"4") + log_of(1, 0, b"x"))

    def produced_meanwhile(c: FakeConsumer):
        c.append(*log_of(0, 5, b"5", b"6"))  # after the end offsets were taken

    consumer.then(produced_meanwhile)
    batches = list(read_to_end(consumer, [tp(1), tp(0)], timeout_s=5))

    assert sorted((r.partition, r.offset) for b in batches for r in b) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0),
    ]  # fmt: skip
    assert consumer.seeks == [(tp(0), 5)]  # fetched up to 7: back to its end
    assert (consumer.position(tp(0)), consumer.position(tp(1))) == (5, 1)


def test_read_records_from_given_offsets_to_a_given_end():
    consumer = FakeConsumer(log_of(0, 0, b"0", b"1", b"2", b"3", b"4", b"5"))
    got = read_records(consumer, [tp(0)], 5, start={tp(0): 2}, end={tp(0): 4})
    assert [r.offset for r in got] == [2, 3]
    assert read_records(consumer, [], 5) == [] and consumer.count("assign") == 1


def test_read_to_end_waits_for_a_position_still_being_looked_up():
    consumer = FakeConsumer(log_of(0, 0, b"0", b"1") + log_of(1, 0, b"x"))
    consumer.positions_unknown[tp(0)] = 2  # None until the reset to the beginning is done
    got = read_records(consumer, [tp(0), tp(1)], 5)
    assert sorted((r.partition, r.offset) for r in got) == [(0, 0), (0, 1), (1, 0)]
    assert consumer.positions_unknown[tp(0)] == 0


def test_read_to_end_raises_naming_what_made_no_progress():
    # Partition 1's end is 5 but nothing past offset 2 ever comes (say, a stuck fetch).
    consumer = FakeConsumer(
        log_of(0, 0, b"a") + log_of(1, 0, b"b", b"c", b"d"), end_offsets={tp(1): 5}
    )
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError) as raised:
        list(read_to_end(consumer, [tp(0), tp(1)], timeout_s=0.3))
    assert time.monotonic() - started >= 0.3  # not before the timeout
    assert isinstance(raised.value, KafkaError)  # what retries Kafka errors retries this
    message = str(raised.value)
    assert "reading t partitions [0, 1]" in message
    assert "no progress for 0.3s" in message
    assert "{'t[1]': '3/5'}" in message  # only the one behind, position/end


# --- the kafka-python fetcher workaround ---------------------------------------------------

A, B = TopicPartition("trades", 0), TopicPartition("trades", 1)


def _completed_fetch(partition: TopicPartition, offset: int, count: int) -> CompletedFetch:
    """A fetch response for `partition` as the network layer queues it."""
    builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20,
                                   offset=offset)  # fmt: skip
    for i in range(count):
        builder.append(timestamp=1_000 + i, key=b"k", value=b"%d" % (offset + i))
    builder.close()
    data = SimpleNamespace(error_code=0, high_watermark=offset + count, diverging_epoch=None,
                           records=bytes(builder._buffer), aborted_transactions=None,
                           preferred_read_replica=-1)  # fmt: skip
    return CompletedFetch(partition, offset, 11, data, None)


def _fetcher_with_parked_records():
    """A real Fetcher after: A partly consumed, A paused (its parsed records parked), B
    fetched and drained (the in-line slot keeps B's empty PartitionRecords), A resumed."""
    subscriptions = SubscriptionState()
    subscriptions.assign_from_user([A, B])
    subscriptions.seek(A, 0)
    subscriptions.seek(B, 0)
    client = SimpleNamespace(_manager=SimpleNamespace(_net=None))
    fetcher = Fetcher(client, subscriptions)
    fetcher._completed_fetches.append(_completed_fetch(A, 0, 5))
    assert offsets_of(fetcher.fetched_records(max_records=2)[0]) == {A: [0, 1]}
    subscriptions.pause(A)
    fetcher._completed_fetches.append(_completed_fetch(B, 0, 3))
    assert offsets_of(fetcher.fetched_records()[0]) == {B: [0, 1, 2]}
    subscriptions.resume(A)
    return fetcher, subscriptions


def test_kafka_python_still_strands_parked_records_of_a_resumed_partition():
    """Canary: when this fails, kafka-python changed (or fixed) its fetcher, and
    `_restore_parked_records` must be re-checked (and likely removed)."""
    fetcher, subscriptions = _fetcher_with_parked_records()
    slot = fetcher._next_partition_records
    assert slot is not None and not slot  # drained, yet not None: the restore is skipped
    assert A in fetcher._paused_partition_records
    for _ in range(3):
        records, _ = fetcher.fetched_records()
        assert records == {}  # A's records 2..4 never come
        assert A not in fetcher._fetchable_partitions()  # nor is A fetched again
    # Not even once A is revoked and assigned again.
    subscriptions.assign_from_user([B])
    subscriptions.assign_from_user([A, B])
    subscriptions.seek(A, 2)
    assert fetcher.fetched_records()[0] == {}
    assert A not in fetcher._fetchable_partitions()


def test_restore_parked_records_brings_a_resumed_partition_back():
    fetcher, _ = _fetcher_with_parked_records()
    _restore_parked_records(SimpleNamespace(_fetcher=fetcher))
    records, _ = fetcher.fetched_records()
    assert offsets_of(records) == {A: [2, 3, 4]}
    assert A in fetcher._fetchable_partitions()


def test_restore_parked_records_leaves_records_in_line_alone():
    fetcher, subscriptions = _fetcher_with_parked_records()
    subscriptions.seek(B, 3)
    fetcher._next_partition_records = None  # only for the set-up: B's next fetch in line
    subscriptions.pause(A)
    fetcher._completed_fetches.append(_completed_fetch(B, 3, 4))
    assert offsets_of(fetcher.fetched_records(max_records=1)[0]) == {B: [3]}
    subscriptions.resume(A)
    in_line = fetcher._next_partition_records
    assert in_line  # B's records 4..6 are not consumed yet

    _restore_parked_records(SimpleNamespace(_fetcher=fetcher))
    assert fetcher._next_partition_records is in_line  # not dropped
    assert offsets_of(fetcher.fetched_records()[0]) == {B: [4, 5, 6]}
    _restore_parked_records(SimpleNamespace(_fetcher=fetcher))  # as before every poll
    assert offsets_of(fetcher.fetched_records()[0]) == {A: [2, 3, 4]}


def test_the_runtime_restores_parked_records_before_polling_and_on_release():
    processor = Processor(Transactor(ProducerFactory(transactional=True), SETTINGS))
    for release in (False, True):
        fetcher, _ = _fetcher_with_parked_records()
        consumer = FakeConsumer(assignment={tp(0)})
        consumer._fetcher = fetcher
        runtime = runtime_for(processor, consumer)
        if release:
            consumer.pause(tp(0))
            runtime.release()
        else:
            runtime.step()
        assert offsets_of(fetcher.fetched_records()[0]) == {A: [2, 3, 4]}


# --- the workers' hooks -------------------------------------------------------------------


AT = "2024-05-01T12:00:00+00:00"


def _transaction(user: str, offset: int, amount: str, partitions: int = 2):
    """A `transactions` record on its user's home partition."""
    from tasks.transactions import key_partition

    value = json.dumps({"user": user, "amount": amount, "time": AT}).encode()
    home = key_partition(user.encode(), partitions)
    return record(SETTINGS.transactions_topic, home, offset, value=value, key=user.encode())


def _transaction_worker(monkeypatch, records, changelog=(), *, assign=True):
    """A TransactionAlertsWorker on fakes, its partitions assigned and restored from
    `changelog` (the records the restore reads); with `assign=False`, not assigned yet
    (`_assign_both` does it)."""
    from stream_workers import transaction_alerts as module

    from .fakes import ConsumerFactory

    s = SETTINGS
    source = s.transactions_topic
    counts = {source: 2, s.transaction_totals_changelog_topic: 2, s.transaction_alerts_topic: 2}
    read: list[list[TopicPartition]] = []
    ends: list[dict[TopicPartition, int] | None] = []
    read_errors: list[BaseException] = []

    def read_records(consumer, partitions, timeout_s, **options):
        assert consumer is restorer
        if read_errors:
            raise read_errors.pop(0)
        read.append(sorted(partitions))
        ends.append(options.get("end"))
        return [r for r in changelog if TopicPartition(r.topic, r.partition) in partitions]

    restorer = FakeConsumer(topics=counts)
    watermarks = FakeConsumer(topics=counts)
    group = FakeConsumer(records, topics=counts)
    consumers = ConsumerFactory(restorer, watermarks, group)
    producers = ProducerFactory()
    monkeypatch.setattr(module, "ensure_topics", lambda *a, **k: [])
    monkeypatch.setattr(module, "make_consumer", consumers)
    monkeypatch.setattr(module, "make_producer", producers)
    monkeypatch.setattr(module, "read_records", read_records)

    worker = module.TransactionAlertsWorker(s, instance="0", batch_size=100)
    worker.runtime.abort_backoff_s = 0
    worker.runtime.subscribe()
    [producer] = producers.made
    w = SimpleNamespace(worker=worker, runtime=worker.runtime, group=group, restorer=restorer,
                        watermarks=watermarks, producer=producer, read=read, ends=ends,
                        read_errors=read_errors, requests=consumers.requests,
                        module=module)  # fmt: skip
    if assign:
        _assign_both(w)
    return w


def _assign_both(w) -> None:
    source = SETTINGS.transactions_topic
    w.group.then(lambda c: c.rebalance(assigned={TopicPartition(source, 0),
                                                  TopicPartition(source, 1)}) or {})  # fmt: skip
    assert w.runtime.step() == 0  # the assignment: restored before any record


def test_transaction_alerts_applies_totals_only_once_committed(monkeypatch):
    from tasks.transactions import UserTotal, changelog_value, key_partition

    s = SETTINGS
    source, changelog = s.transactions_topic, s.transaction_totals_changelog_topic
    home = {u: key_partition(u.encode(), 2) for u in ("alice", "bob")}
    assert home["alice"] != home["bob"]
    restored = record(changelog, home["bob"], 0, key=b"bob",
                      value=json.dumps(changelog_value("bob", UserTotal(150000, 3, 9, AT), 2)
                                       ).encode())  # fmt: skip
    bad = record(source, 0, 50, value=b"{not json", key=b"alice")
    records = [_transaction("alice", 0, "2500.00"), _transaction("bob", 0, "600.00"), bad]
    w = _transaction_worker(monkeypatch, records, changelog=[restored])
    worker, runtime, producer, group = w.worker, w.runtime, w.producer, w.group
    assert w.read == [[TopicPartition(changelog, 0), TopicPartition(changelog, 1)]]
    assert worker.totals["bob"].minor == 150000 and worker.owned == {0, 1}
    assert w.restorer.assignment() == set()  # holds nothing between restores

    seen_at_commit = []
    worker.transactor.before_commit = lambda batch: seen_at_commit.append(dict(worker.totals))
    runtime.step()

    assert "alice" not in seen_at_commit[0]  # not applied before the commit
    assert worker.totals["alice"].minor == 250000
    assert worker.totals["bob"].minor == 210000  # on top of the restored total
    alerts = {decode_json(v.value)["user"]: v for v in producer.visible
              if v.topic == s.transaction_alerts_topic}  # fmt: skip
    assert decode_json(alerts["bob"].value)["total"] == "2100.00"
    assert alerts["alice"].partition == home["alice"]
    saved = {v.key: v for v in producer.visible if v.topic == changelog}
    assert set(saved) == {b"alice", b"bob"} and saved[b"bob"].partition == home["bob"]
    [letter] = [v for v in producer.visible if v.topic == s.dlq_topic(source)]
    assert letter.value["offset"] == 50 and "not valid JSON" in letter.value["reason"]
    assert worker.stats.counts["alerts"] == 2 and worker.stats.dead_letters == 1

    group.append(_transaction("alice", 1, "-100.00"))
    producer.fail("send_offsets_to_transaction", CommitFailedError("rebalanced"))
    runtime.step()
    assert worker.totals["alice"].minor == 250000  # the aborted batch left no trace
    assert worker.stats.counts["alerts"] == 2

    runtime.step()  # read again, applied once
    assert worker.totals["alice"].minor == 240000
    assert worker.totals["alice"].transactions == 2

    # A revoked partition's totals go: the next owner restores them from the changelog.
    group.then(lambda c: c.rebalance(revoked={TopicPartition(source, home["bob"])}) or {})
    runtime.step()
    assert "bob" not in worker.totals and "alice" in worker.totals
    assert worker.owned == {home["alice"]}


def test_transaction_alerts_skips_a_poison_changelog_record_when_restoring(monkeypatch):
    from tasks.transactions import UserTotal, changelog_value, key_partition

    changelog = SETTINGS.transaction_totals_changelog_topic
    p = key_partition(b"bob", 2)
    good = json.dumps(changelog_value("bob", UserTotal(150000, 3, 9, AT), 2)).encode()
    poison = record(changelog, p, 1, key=b"bob", value=b'{"user": "bob", "total": "x"}')
    w = _transaction_worker(
        monkeypatch, [], changelog=[record(changelog, p, 0, key=b"bob", value=good), poison]
    )
    assert w.worker.totals["bob"].minor == 150000  # the last good value before it
    assert w.worker.bad_changelog_records == 1


def test_transaction_alerts_survives_a_record_its_rules_cannot_process(monkeypatch):
    from stream_workers import transaction_alerts as module

    real_apply_batch = module.apply_batch

    def apply_batch(totals, frame, rules):
        if "mallory" in frame["user"].to_list():  # stands for a bug in the rules
            raise RuntimeError("rule bug")
        return real_apply_batch(totals, frame, rules)

    monkeypatch.setattr(module, "apply_batch", apply_batch)
    records = [_transaction("alice", 0, "10.00"), _transaction("mallory", 0, "5.00")]
    w = _transaction_worker(monkeypatch, records)

    for _ in range(3):  # max_attempts, then one record at a time
        w.runtime.step()  # must not raise: the worker goes on

    [letter] = [v for v in w.producer.visible if v.topic == "transactions.dlq"]
    assert letter.key == b"mallory"
    assert letter.value["reason"] == "processing failed: RuntimeError: rule bug"
    assert w.worker.totals["alice"].minor == 1000


def test_transaction_alerts_makes_a_restorer_a_watermarks_consumer_then_the_group(monkeypatch):
    w = _transaction_worker(monkeypatch, [])
    [(_, restorer), (_, watermarks), (_, group)] = w.requests
    assert (restorer["group_id"], restorer["max_poll_records"]) == (None, 10_000)
    assert (watermarks["group_id"], watermarks["isolation_level"]) == (None, "read_uncommitted")
    assert group["group_id"] == SETTINGS.transaction_alerts_group
    w.worker.close()
    assert w.restorer.closed and w.watermarks.closed and w.group.closed


def _changelog_tps() -> list[TopicPartition]:
    changelog = SETTINGS.transaction_totals_changelog_topic
    return [TopicPartition(changelog, 0), TopicPartition(changelog, 1)]


def _stable_ends(monkeypatch, w, stable: list[dict], high: dict) -> list[int]:
    """The restorer's (read_committed) end offsets answer `stable` in turn (the last one
    from then on), the watermarks consumer's `high`; returns, per restorer call, how many
    committed() calls the group consumer had had by then."""
    committed_before: list[int] = []

    def restorer_ends(partitions, timeout_ms=None):
        assert sorted(partitions) == _changelog_tps()
        committed_before.append(w.group.count("committed"))
        return dict(stable.pop(0) if len(stable) > 1 else stable[0])

    monkeypatch.setattr(w.restorer, "end_offsets", restorer_ends)
    w.watermarks.end_override = dict(high)
    return committed_before


def test_transaction_alerts_restores_to_the_stable_end_once_it_reaches_the_watermarks(
    monkeypatch,
):
    w = _transaction_worker(monkeypatch, [], assign=False)
    clock = FakeClock()
    monkeypatch.setattr(w.module, "time", SimpleNamespace(monotonic=clock.monotonic))
    w.runtime.stop = stop = InstantStop(clock)
    c0, c1 = _changelog_tps()
    # A committed transaction on partition 0 is still writing its markers.
    committed_before = _stable_ends(
        monkeypatch, w, [{c0: 5, c1: 4}, {c0: 6, c1: 4}, {c0: 7, c1: 4}], high={c0: 7, c1: 4}
    )

    _assign_both(w)

    assert w.ends == [{c0: 7, c1: 4}]  # read to the stable end = the high watermarks
    assert stop.waits == [0.02, 0.02] and len(committed_before) == 3
    # The group's committed offsets are asked first, for each assigned partition.
    source = SETTINGS.transactions_topic
    asked = [args[0] for name, args, _ in w.group.calls if name == "committed"]
    assert sorted(asked) == [TopicPartition(source, 0), TopicPartition(source, 1)]
    assert committed_before[0] == 2
    assert w.watermarks.count("end_offsets") == 3
    assert w.worker.owned == {0, 1}


def test_transaction_alerts_restores_to_the_stable_end_after_two_seconds_at_most(monkeypatch):
    w = _transaction_worker(monkeypatch, [], assign=False)
    clock = FakeClock()
    monkeypatch.setattr(w.module, "time", SimpleNamespace(monotonic=clock.monotonic))
    w.runtime.stop = stop = InstantStop(clock)
    c0, c1 = _changelog_tps()
    # A dead owner's transaction stays open (until its timeout): the stable end stays back.
    _stable_ends(monkeypatch, w, [{c0: 5, c1: 4}], high={c0: 7, c1: 4})
    started = clock.now

    _assign_both(w)

    assert w.ends == [{c0: 5, c1: 4}]  # its updates do not count: up to the stable end
    assert 2.0 <= clock.now - started < 2.1
    assert set(stop.waits) == {0.02}
    assert w.worker.owned == {0, 1}


def test_transaction_alerts_retries_a_restore_that_fails(monkeypatch):
    from tasks.transactions import UserTotal, changelog_value, key_partition

    changelog = SETTINGS.transaction_totals_changelog_topic
    home = key_partition(b"bob", 2)
    value = json.dumps(changelog_value("bob", UserTotal(150000, 3, 9, AT), 2)).encode()
    w = _transaction_worker(monkeypatch, [], [record(changelog, home, 0, key=b"bob", value=value)],
                            assign=False)  # fmt: skip
    w.runtime.stop = stop = InstantStop()
    w.read_errors.extend([ReadTimeoutError("no progress"), KafkaTimeoutError("no leader")])

    _assign_both(w)

    assert stop.waits.count(1.0) == 2  # retried, a second apart
    assert w.read == [_changelog_tps()]
    assert w.worker.totals["bob"].minor == 150000 and w.worker.owned == {0, 1}
    assert w.worker.restored_users == 1  # restored once, not once per try


def test_transaction_alerts_keeps_the_totals_of_a_partition_kept_across_a_rebalance(
    monkeypatch,
):
    from tasks.transactions import UserTotal, changelog_value, key_partition

    s = SETTINGS
    source, changelog = s.transactions_topic, s.transaction_totals_changelog_topic
    home = {u: key_partition(u.encode(), 2) for u in ("alice", "bob")}
    saved = [
        record(changelog, home[u], 0, key=u.encode(),
               value=json.dumps(changelog_value(u, UserTotal(100, 1, 9, AT), 2)).encode())
        for u in ("alice", "bob")
    ]  # fmt: skip
    w = _transaction_worker(monkeypatch, [_transaction("alice", 0, "25.00")], saved)
    worker, runtime = w.worker, w.runtime
    runtime.step()
    assert worker.totals["alice"].minor == 2600  # in memory, past the saved value (100)
    kept, gone = TopicPartition(source, home["alice"]), TopicPartition(source, home["bob"])

    # Eager: everything revoked, then alice's partition assigned to us again.
    w.group.then(lambda c: c.rebalance(revoked={kept, gone}, assigned={kept}) or {})
    runtime.step()
    assert len(w.read) == 1, "a kept partition was restored again"
    assert worker.totals["alice"].minor == 2600 and "bob" not in worker.totals
    assert worker.owned == {home["alice"]}

    # Lost (others may have processed it), then given back: restored from the changelog.
    w.group.then(lambda c: c.rebalance(lost={kept}, assigned={kept}) or {})
    runtime.step()
    assert w.read[1:] == [[TopicPartition(changelog, home["alice"])]]
    assert worker.totals["alice"].minor == 100 and worker.owned == {home["alice"]}


def test_price_alerts_rebuilds_after_being_fenced_and_fires_once(monkeypatch):
    from stream_workers import price_alerts as module

    from .fakes import ConsumerFactory

    s = Settings(_env_file=None, price_fence_backoff_s=0)
    trades = lambda p: TopicPartition(s.trades_topic, p)  # noqa: E731
    alert = {"alert_id": "a1", "user_id": "u1", "product_id": "BTC-USD", "threshold": "100"}
    trade = {"trade_id": 1, "product_id": "BTC-USD", "price": "150", "size": "1",
             "side": "buy", "time": "2024-05-01T12:00:00+00:00"}  # fmt: skip
    alerts_consumer = FakeConsumer(
        [record(s.price_alerts_topic, 0, 0, key=b"a1", value=json.dumps(alert).encode())],
        topics={s.price_alerts_topic: 1},
    )
    group = FakeConsumer(
        [record(s.trades_topic, 0, 0, key=b"BTC-USD", value=json.dumps(trade).encode()),
         record(s.trades_topic, 0, 1, key=b"BTC-USD", value=b"{oops")],
        topics={s.trades_topic: 2},
    )  # fmt: skip
    producers = ProducerFactory()
    monkeypatch.setattr(module, "ensure_topics", lambda *a, **k: [])
    monkeypatch.setattr(module, "make_consumer", ConsumerFactory(group, alerts_consumer))
    monkeypatch.setattr(module, "make_producer", producers)

    fired: list[dict] = []
    worker = module.PriceAlertsWorker(s, batch_size=100, on_fired=fired.append)
    runtime = worker.runtime
    runtime.subscribe()
    group.then(lambda c: c.rebalance(assigned={trades(0), trades(1)}) or {})
    runtime.step()
    assert set(worker.transactors) == {0, 1} and "a1" in worker.state.alerts
    assert worker.counts["rebuilds"] == 1

    fenced, other = worker.transactors[0].producer, worker.transactors[1].producer
    assert fenced.config["transactional_id"].endswith(f"{s.trades_topic}-0")
    fenced.fail("commit_transaction", ProducerFencedError("the batch flow took the id"))
    runtime.step()

    assert fenced.count("abort_transaction") == 0 and fenced.closed
    assert worker.counts["rebuilds"] == 2
    replacement = worker.transactors[0].producer
    assert replacement is not fenced and replacement.initialised
    # Every partition's producer is new (init_transactions waits for each earlier
    # transaction under its id): the alerts read next show every committed tombstone.
    assert other.closed and worker.transactors[1].producer is not other
    assert worker.transactors[1].producer.initialised
    assert [p for p in producers.made if not p.closed] == [
        producers.made[0],  # the DLQ producer
        replacement,
        worker.transactors[1].producer,
    ]
    assert "a1" in worker.state.alerts  # its firing did not commit: live again
    assert fired == []  # nor is it told as fired

    runtime.step()  # the trades, read again, fire it once
    assert fenced.visible == []
    topics = [(v.topic, v.key, v.value is None) for v in replacement.visible]
    assert topics == [
        (s.notifications_topic, "u1", False),
        (s.price_alerts_topic, "a1", True),
        (s.dlq_topic(s.trades_topic), b"BTC-USD", False),
    ]
    assert replacement.visible[0].value["source"] == "stream"
    assert "a1" not in worker.state.alerts
    assert fired == [replacement.visible[0].value]  # told once, with its notification


def test_jobs_lane_skips_known_ids_and_forgets_those_of_an_aborted_slice(monkeypatch):
    from stream_workers import jobs as module
    from tasks.jobs import Priority, parse_result

    from .fakes import ConsumerFactory

    s = SETTINGS
    topic = s.jobs_topic("payments", "REALTIME")
    known, fresh, later = (str(uuid.uuid4()) for _ in range(3))
    handled: list[str] = []

    def handler(job):
        handled.append(str(job.id))
        return {"n": job.data["n"]}

    def job(offset: int, job_id: str, n: int):
        value = json.dumps({"id": job_id, "group": "echo", "data": {"n": n}}).encode()
        return record(topic, 0, offset, value=value, key=job_id.encode())

    consumer = FakeConsumer([job(0, known, 0), job(1, fresh, 1)], assignment={tp(0, topic)})
    producers = ProducerFactory()
    monkeypatch.setattr(module, "ensure_topics", lambda *a, **k: [], raising=False)
    monkeypatch.setattr(module, "make_consumer", ConsumerFactory(consumer))
    monkeypatch.setattr(module, "make_producer", producers)
    monkeypatch.setattr(module, "result_ids_since", lambda *a, **k: {known})
    monkeypatch.setattr(module, "processor_registry", lambda *a, **k: {"echo": handler})

    lane = module.Lane("payments", Priority.REALTIME, threading.Event(), s)
    lane.runtime.abort_backoff_s = 0
    [producer] = producers.made

    lane.runtime.step()
    assert handled == [fresh]  # the redelivered job is skipped
    assert lane.stats.counts["duplicate"] == 1
    [result] = producer.visible
    assert (result.topic, result.key, result.partition) == (s.job_results_topic("payments"),
                                                            fresh, 0)  # fmt: skip
    assert str(parse_result(result.value).job_id) == fresh
    assert fresh in lane.known

    consumer.append(job(2, later, 2))
    producer.fail("send_offsets_to_transaction", CommitFailedError("rebalanced"))
    lane.runtime.step()
    assert handled == [fresh, later]
    assert later not in lane.known  # no result is visible: forgotten

    lane.runtime.step()  # read again: processed, not skipped as a duplicate
    assert handled == [fresh, later, later]
    visible = [v for p in producers.made for v in p.visible]  # replaced: offsets refused
    assert [str(parse_result(v.value).job_id) for v in visible] == [fresh, later]
    assert later in lane.known and lane.stats.counts["duplicate"] == 1


class FakeEvent:
    """The lanes' shared `realtime_idle` event; records waits instead of sleeping."""

    def __init__(self, is_set: bool = False) -> None:
        self._set = is_set
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self._set


def _lane(monkeypatch, priority, consumer: FakeConsumer, realtime_idle):
    from stream_workers import jobs as module

    from .fakes import ConsumerFactory

    monkeypatch.setattr(module, "make_consumer", ConsumerFactory(consumer))
    monkeypatch.setattr(module, "make_producer", ProducerFactory())
    monkeypatch.setattr(module, "result_ids_since", lambda *a, **k: set())
    monkeypatch.setattr(module, "processor_registry", lambda *a, **k: {})
    return module.Lane("payments", priority, realtime_idle, SETTINGS)


def test_jobs_normal_lane_holds_while_realtime_is_pending_polling_as_usual(monkeypatch):
    from tasks.jobs import Priority

    topic = SETTINGS.jobs_topic("payments", "NORMAL")
    consumer = FakeConsumer(assignment={tp(0, topic), tp(1, topic)})
    idle = FakeEvent(is_set=False)
    lane = _lane(monkeypatch, Priority.NORMAL, consumer, idle)
    runtime = lane.runtime
    timeout = runtime.poll_timeout_ms

    lane._hold_while_realtime()
    lane._hold_while_realtime()
    assert consumer.paused() == {tp(0, topic), tp(1, topic)} and consumer.count("pause") == 1
    # The poll still waits (a rebalance completes only in a poll that waits), the lane
    # does not sleep on its own.
    assert runtime.poll_timeout_ms == timeout > 0 and idle.waits == []

    idle.set()
    lane._hold_while_realtime()
    assert consumer.paused() == set() and runtime.poll_timeout_ms == timeout
    assert 1 <= runtime.max_records <= SETTINGS.jobs_processor_max_batch


def test_jobs_realtime_lane_counts_an_unknown_position_as_pending(monkeypatch):
    from tasks.jobs import Priority

    topic = SETTINGS.jobs_topic("payments", "REALTIME")
    consumer = FakeConsumer(log_of(0, 0, b"j", topic=topic), assignment={tp(0, topic)})
    lane = _lane(monkeypatch, Priority.REALTIME, consumer, FakeEvent())
    consumer.positions[tp(0, topic)] = 1  # at the end: nothing pending
    assert lane._realtime_pending() is False
    consumer.positions_unknown[tp(0, topic)] = 1  # being reset (e.g. just assigned)
    assert lane._realtime_pending() is True


def test_a_partition_handed_away_and_back_within_one_poll_is_revoked_and_assigned_afresh():
    consumer, processor, runtime = subscribed_runtime()

    def two_rebalances(c: FakeConsumer):
        c.rebalance(revoked={tp(0), tp(1)}, assigned={tp(0)})  # partition 1 to another member
        c.rebalance(revoked={tp(0)}, assigned={tp(0), tp(1)})  # ... which processed it: back
        return {}

    consumer.then(lambda c: c.rebalance(assigned={tp(0), tp(1)}) or {}, two_rebalances)
    runtime.step()
    runtime.step()

    assert processor.revoked == [{tp(1)}]  # partition 0 stayed ours throughout: kept
    assert processor.assigned == [{tp(0), tp(1)}, {tp(1)}]
