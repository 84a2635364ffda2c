"""The one Kafka client factory: producers, consumers and the admin client from settings.

Also: JSON (de)serialisation, the project's declared topics with idempotent creation, the
dead-letter helper, and a clear error when the broker is not reachable.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)
from kafka.net.compat import KafkaNetClient
from kafka.net.manager import KafkaConnectionManager
from kafka.net.selector import NetworkSelector
from kafka.serializer import Serializer

from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)


class BrokerUnavailableError(RuntimeError):
    """The Kafka cluster did not answer at the configured address in time."""


class KafkaConfigError(BrokerUnavailableError):
    """The cluster cannot be used with these settings: credentials refused, a mechanism it
    does not enable, an unreadable CA file, a failed TLS handshake. Retrying cannot help;
    the message names the setting to fix (never a secret's value)."""


# --- JSON ---------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    # Decimals travel as strings so no binary float ever touches a price or an amount.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_json(value: Any) -> bytes | None:
    """UTF-8 JSON bytes; None stays None (a tombstone)."""
    if value is None:
        return None
    return json.dumps(value, default=_json_default, separators=(",", ":")).encode()


def decode_json(raw: bytes | str | None) -> Any:
    """Parse UTF-8 JSON; None (a tombstone) stays None. Errors are ValueErrors.

    orjson: several times faster than `json` on the per-message hot path, and strict
    (no NaN/Infinity, invalid UTF-8 and nesting deeper than 1024 are errors).
    """
    if raw is None:
        return None
    return orjson.loads(raw)


def encode_key(key: str | bytes | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return str(key).encode()


class JsonSerializer(Serializer):
    def serialize(self, topic: str, headers: Any, data: Any) -> bytes | None:
        return encode_json(data)


class KeySerializer(Serializer):
    def serialize(self, topic: str, headers: Any, data: str | bytes | None) -> bytes | None:
        return encode_key(data)


# --- clients ------------------------------------------------------------------------------


def client_config(settings: Settings | None = None) -> dict[str, Any]:
    """Connection and security options shared by every client."""
    s = settings or get_settings()
    config: dict[str, Any] = {
        "bootstrap_servers": s.kafka_bootstrap_servers.split(","),
        "client_id": s.kafka_client_id,
        "security_protocol": s.kafka_security_protocol,
        "bootstrap_timeout_ms": int(s.kafka_timeout_s * 1000),
    }
    if s.kafka_security_protocol != "PLAINTEXT":
        # Only a login or a certificate check can be refused; plaintext keeps the stock client.
        config["kafka_client"] = _fail_fast_client
    if s.kafka_sasl_mechanism:
        config["sasl_mechanism"] = s.kafka_sasl_mechanism
        config["sasl_plain_username"] = s.kafka_sasl_username
        if s.kafka_sasl_password is not None:
            config["sasl_plain_password"] = s.kafka_sasl_password.get_secret_value()
    if s.kafka_ssl_cafile:
        config["ssl_cafile"] = str(s.kafka_ssl_cafile)
    return config


# --- refused settings: fail at the first refusal, say which setting -----------------------


def _refused(error: BaseException) -> bool:
    """The broker refused these settings: no retry can help. (A failed TLS certificate
    check counts: kafka-python reports it as a connection error.)"""
    if isinstance(error, SaslAuthenticationFailedError | UnsupportedSaslMechanismError):
        return True
    text = str(error)
    return (
        isinstance(error, KafkaConnectionError)
        and "Handshake failed" in text
        and "CERTIFICATE_VERIFY_FAILED" in text
    )


class _LoginClosedError(SaslAuthenticationFailedError):
    """The broker closed the connection during the SASL login, twice in a row."""


class _FailFastConnections(KafkaConnectionManager):
    """kafka-python's connection manager, stopping at the broker's first refusal of the
    settings while it has never connected.

    kafka-python (3.0) counts a connection whose login failed as made (its `_connect`
    only sees the failure later), so a refused SASL login or a failed certificate check
    is retried until `bootstrap_timeout_ms`, each attempt logged; the Java client stops at
    once. Here a failed connection is not counted as made, and, until one connection
    succeeded, a refusal becomes the node's authentication failure, which kafka-python's
    `get_connection` then raises instead of reconnecting. (Once connected, a refusal is
    retried as before: a cluster that accepted these settings may be restarting.)

    The broker answers a refused login and closes the connection at once; kafka-python
    drops a response that arrives together with the close, so a refusal often shows only
    as "socket disconnected" after the broker's version was read (that is, during the
    login). Twice in a row counts as a refusal too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connected_once = False
        self._login_hangups: dict[Any, int] = {}

    async def _connect(self, node, conn, *args: Any, **kwargs: Any) -> None:
        known_version = self.broker_version_data
        await super()._connect(node, conn, *args, **kwargs)
        if not conn.init_future.is_done:  # closed while connecting: nothing learnt
            return
        failure = conn.init_future.exception
        if failure is None:
            self._connected_once = True
            self._login_hangups.clear()
            return
        self.broker_version_data = known_version  # a failed connection taught us nothing
        if self._connected_once:
            return
        hangup = (
            conn.sasl_enabled
            and known_version is None  # so the connection asked for the version itself
            and conn.broker_version_data is not None  # ApiVersions answered: in the login
            and isinstance(failure, KafkaConnectionError)
            and "socket disconnected" in str(failure)
        )
        hangups = self._login_hangups[node.node_id] = (
            self._login_hangups.get(node.node_id, 0) + 1 if hangup else 0
        )
        if _refused(failure):
            self._auth_failures[node.node_id] = failure
        elif hangups >= 2:
            self._auth_failures[node.node_id] = _LoginClosedError(
                "the broker closed the connection during the login, twice"
            )


def _fail_fast_client(**configs: Any) -> KafkaNetClient:
    """The `kafka_client` factory of every client (kafka-python's, with the manager above)."""
    net = NetworkSelector(**configs)
    return KafkaNetClient(net=net, manager=_FailFastConnections(net, **configs), **configs)


def _redact(text: str, settings: Settings) -> str:
    secret = settings.kafka_sasl_password
    if secret is not None and secret.get_secret_value():
        text = text.replace(secret.get_secret_value(), "***")
    return text


def _broker_says(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else ""
    return text.removeprefix(f"{type(error).__name__}: ") or type(error).__name__


def _config_error(settings: Settings, error: BaseException) -> KafkaConfigError:
    s = settings
    at = f"Kafka at {s.kafka_bootstrap_servers}"
    if isinstance(error, _LoginClosedError):
        message = (
            f"{at} closed the connection during the SASL {s.kafka_sasl_mechanism} login of "
            f"user {s.kafka_sasl_username!r}, twice: it refuses these credentials or this "
            "mechanism; check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM"
        )
    elif isinstance(error, SaslAuthenticationFailedError):
        message = (
            f"{at} refused the SASL {s.kafka_sasl_mechanism} login of user "
            f"{s.kafka_sasl_username!r} ({_broker_says(error)}); check KAFKA_SASL_USERNAME "
            "and KAFKA_SASL_PASSWORD"
        )
    elif isinstance(error, UnsupportedSaslMechanismError):
        message = (
            f"{at} does not enable the SASL mechanism {s.kafka_sasl_mechanism} "
            f"(KAFKA_SASL_MECHANISM, user {s.kafka_sasl_username!r}): {_broker_says(error)}"
        )
    else:
        message = (
            f"the TLS handshake with {at} failed ({_broker_says(error)}); KAFKA_SSL_CAFILE="
            f"{s.kafka_ssl_cafile or '(unset: the system CAs)'} must hold the CA that "
            "signed the broker's certificate, whose names must include the host you connect to"
        )
    return KafkaConfigError(_redact(message, s))


def _unavailable(settings: Settings, error: Exception) -> BrokerUnavailableError:
    """The error for a client that could not be created: KafkaConfigError, naming the
    setting, when the broker refused the settings; else BrokerUnavailableError."""
    if _refused(error):
        return _config_error(settings, error)
    return BrokerUnavailableError(
        f"Kafka broker not reachable at {settings.kafka_bootstrap_servers} within "
        f"{settings.kafka_timeout_s:g}s ({type(error).__name__}). Start one with `make up`, "
        "or point KAFKA_BOOTSTRAP_SERVERS at a running cluster."
    )


def make_producer(settings: Settings | None = None, **overrides: Any) -> KafkaProducer:
    """A JSON producer (keys: str, values: JSON-able or None for a tombstone).

    Pass `transactional_id=...` for an exactly-once producer.
    """
    s = settings or get_settings()
    config = client_config(s) | {
        "key_serializer": KeySerializer(),
        "value_serializer": JsonSerializer(),
        "acks": "all",
        "linger_ms": 5,
    }
    try:
        return KafkaProducer(**(config | overrides))
    except KafkaError as error:
        raise _unavailable(s, error) from error


def make_consumer(
    *topics: str, settings: Settings | None = None, group_id: str | None = None, **overrides: Any
) -> KafkaConsumer:
    """A consumer of raw bytes (callers parse, so a bad message can go to the DLQ).

    Auto-commit is off: every caller commits (or binds offsets to a transaction) itself.
    """
    s = settings or get_settings()
    config = client_config(s) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }
    try:
        return KafkaConsumer(*topics, **(config | overrides))
    except KafkaError as error:
        raise _unavailable(s, error) from error


def make_admin(settings: Settings | None = None, **overrides: Any) -> KafkaAdminClient:
    s = settings or get_settings()
    try:
        return KafkaAdminClient(**(client_config(s) | overrides))
    except KafkaError as error:
        raise _unavailable(s, error) from error


def wait_for_broker(settings: Settings | None = None) -> None:
    """Return once the cluster answers a metadata request, else raise BrokerUnavailableError."""
    admin = make_admin(settings)
    admin.close()


def wait_for_group_coordinator(settings: Settings | None = None) -> None:
    """Return once consumer groups work (a fresh broker creates their topic on first use)."""
    s = settings or get_settings()
    admin = make_admin(s)
    try:
        list_group_offsets(admin, {f"{s.kafka_client_id}-warm-up": None}, s.kafka_timeout_s * 4)
    finally:
        admin.close()


# --- topics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    config: dict[str, str] = field(default_factory=dict)

    def new_topic(self, replication_factor: int) -> NewTopic:
        config = dict(self.config)
        if self.compacted:
            config["cleanup.policy"] = "compact"
        return NewTopic(self.name, self.partitions, replication_factor, topic_configs=config)


def project_topics(settings: Settings | None = None) -> list[TopicSpec]:
    """Every fixed topic of the project (job topics are per processor: see `job_topics`)."""
    s = settings or get_settings()
    n = s.kafka_default_partitions
    topics = [
        TopicSpec(s.trades_topic, n),
        TopicSpec(s.price_alerts_topic, n, compacted=True),
        TopicSpec(s.notifications_topic, n),
        TopicSpec(s.transactions_topic, n),
        TopicSpec(s.transaction_alerts_topic, n),
        TopicSpec(s.transaction_totals_changelog_topic, n, compacted=True),
    ]
    dlqs = [TopicSpec(s.dlq_topic(t.name), 1) for t in topics if not t.compacted]
    dlqs.append(TopicSpec(s.dlq_topic(s.price_alerts_topic), 1))
    dlqs.append(TopicSpec(s.dlq_topic(s.transaction_totals_changelog_topic), 1))
    return topics + dlqs


def job_topics(processor: str, settings: Settings | None = None) -> list[TopicSpec]:
    """The per-priority job topics, their DLQs and the results topic of one processor."""
    s = settings or get_settings()
    n = s.kafka_default_partitions
    jobs = [TopicSpec(s.jobs_topic(processor, p), n) for p in ("realtime", "normal", "slow")]
    results = TopicSpec(s.job_results_topic(processor), n)
    return [*jobs, results, *(TopicSpec(s.dlq_topic(t.name), 1) for t in jobs)]


def ensure_topics(specs: Iterable[TopicSpec], settings: Settings | None = None) -> list[str]:
    """Create the missing topics; existing ones are left alone. Returns the names created."""
    s = settings or get_settings()
    wanted = {spec.name: spec for spec in specs}
    admin = make_admin(s)
    try:
        existing = set(admin.list_topics())
        missing = [spec for name, spec in wanted.items() if name not in existing]
        created = []
        for spec in missing:
            try:
                admin.create_topics([spec.new_topic(s.kafka_replication_factor)])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and create: fine
        return created
    finally:
        admin.close()


# --- consumer-group lag -------------------------------------------------------------------


def partitions_of(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, sorted (empty if the topic does not exist)."""
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


def list_group_offsets(
    admin: KafkaAdminClient, groups: dict[str, list[TopicPartition] | None], timeout_s: float = 30
) -> dict[str, dict[TopicPartition, Any]]:
    """The groups' committed offsets, retrying retriable errors: on a fresh broker the group
    coordinator (the `__consumer_offsets` topic) is created on first use and briefly answers
    COORDINATOR_NOT_AVAILABLE."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin.list_group_offsets(groups)
        except KafkaError as error:
            if not error.retriable or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def committed_lag(
    admin: KafkaAdminClient, consumer: KafkaConsumer, groups: dict[str, list[TopicPartition]]
) -> dict[TopicPartition, int]:
    """Per partition: records not yet committed by the group that reads it (end offset minus
    committed offset; from the beginning where the group never committed there)."""
    tps = [tp for group_tps in groups.values() for tp in group_tps]
    if not tps:
        return {}
    end = consumer.end_offsets(tps)
    start = consumer.beginning_offsets(tps)
    committed: dict[TopicPartition, Any] = {}
    for offsets in list_group_offsets(admin, groups).values():
        committed.update(offsets or {})
    lag = {}
    for tp in tps:
        done = committed.get(tp)
        position = done.offset if done is not None and done.offset >= 0 else start[tp]
        lag[tp] = max(0, end[tp] - position)
    return lag


def group_lag(group: str, topics: list[str], settings: Settings | None = None) -> int | None:
    """Records of `topics` not yet committed by `group` (None: the group never committed)."""
    s = settings or get_settings()
    admin = make_admin(s)
    consumer = make_consumer(settings=s, group_id=None)
    try:
        if not list_group_offsets(admin, {group: None}).get(group):
            return None
        tps = [tp for topic in topics for tp in partitions_of(consumer, topic)]
        return sum(committed_lag(admin, consumer, {group: tps}).values())
    finally:
        admin.close()
        consumer.close()


# --- dead letters -------------------------------------------------------------------------


def dead_letter(record: ConsumerRecord, reason: str) -> dict[str, Any]:
    """The DLQ message for a record that could not be parsed or validated."""
    value = record.value
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    key = record.key.decode("utf-8", errors="replace") if isinstance(record.key, bytes) else None
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": key,
        "value": value,
        "reason": reason,
        "failed_at": datetime.now(UTC).isoformat(),
    }


def send_to_dlq(
    producer: KafkaProducer, record: ConsumerRecord, reason: str, settings: Settings | None = None
):
    """Send `record` with `reason` to `<topic>.dlq`; returns the send future."""
    s = settings or get_settings()
    return producer.send(
        s.dlq_topic(record.topic), key=record.key, value=dead_letter(record, reason)
    )


# --- reading a topic to its end -----------------------------------------------------------


class ReadTimeoutError(KafkaTimeoutError):
    """Reading partitions to their end made no progress for too long (a KafkaError, so
    whatever retries Kafka errors retries this too)."""


def read_to_end(
    consumer: KafkaConsumer,
    partitions: Iterable[TopicPartition],
    timeout_s: float,
    *,
    start: dict[TopicPartition, int] | None = None,
    end: dict[TopicPartition, int] | None = None,
    batch_records: int = 10_000,
) -> Iterator[list[ConsumerRecord]]:
    """Read `partitions` from `start` (default: their beginning) up to `end` (default: the
    end offsets taken now; read_committed: the last stable offset), in batches of records.

    The consumer is assigned exactly these partitions; afterwards each sits at its end.
    Raises ReadTimeoutError, naming the partitions and how far each got, when no partition
    advances for `timeout_s` (a stall, not a long read, is the error).
    """
    tps = sorted(set(partitions))
    if not tps:
        return
    consumer.assign(tps)
    if start is None:
        consumer.seek_to_beginning(*tps)
    else:
        for tp in tps:
            consumer.seek(tp, start[tp])
    ends = dict(end) if end is not None else consumer.end_offsets(tps)

    def position(tp: TopicPartition) -> int:
        at = consumer.position(tp)
        return -1 if at is None else at  # None: still being looked up

    positions = {tp: position(tp) for tp in tps}
    progressed = time.monotonic()
    batch: list[ConsumerRecord] = []
    while any(positions[tp] < ends[tp] for tp in tps):
        polled = consumer.poll(timeout_ms=200, max_records=max(1, batch_records - len(batch)))
        for tp, records in polled.items():
            limit = ends[tp]
            batch.extend(records if records[-1].offset < limit else
                         [r for r in records if r.offset < limit])  # fmt: skip
        now_at = {tp: position(tp) for tp in tps}
        for tp, offset in now_at.items():
            if offset > ends[tp]:  # fetched past the end: leave it at the end
                consumer.seek(tp, ends[tp])
                now_at[tp] = ends[tp]
        if now_at != positions:
            positions, progressed = now_at, time.monotonic()
        elif time.monotonic() - progressed > timeout_s:
            behind = {f"{tp.topic}[{tp.partition}]": f"{positions[tp]}/{ends[tp]}"
                      for tp in tps if positions[tp] < ends[tp]}  # fmt: skip
            raise ReadTimeoutError(
                f"reading {', '.join(sorted({tp.topic for tp in tps}))} partitions "
                f"{[tp.partition for tp in tps]} to their end made no progress for "
                f"{timeout_s:g}s; position/end of those behind: {behind}"
            )
        if len(batch) >= batch_records:
            yield batch
            batch = []
    if batch:
        yield batch


def read_records(
    consumer: KafkaConsumer, partitions: Iterable[TopicPartition], timeout_s: float, **options: Any
) -> list[ConsumerRecord]:
    """Every record `read_to_end` yields, as one list."""
    return [r for batch in read_to_end(consumer, partitions, timeout_s, **options) for r in batch]


# --- daemons ------------------------------------------------------------------------------


class StopSignal:
    """Set by SIGTERM / SIGINT: daemons finish the current batch, commit, and exit 0.

    A second signal exits at once (exit status 128 + the signal number).
    """

    def __init__(self, *conditions: Callable[[], bool]) -> None:
        self._event = threading.Event()
        self._conditions = conditions

    def also(self, *conditions: Callable[[], bool]) -> StopSignal:
        """This signal, also set once any of `conditions` holds (checked when asked)."""
        combined = StopSignal(*self._conditions, *conditions)
        combined._event = self._event
        return combined

    def install(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._event.is_set():
            os._exit(128 + signum)
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`, waking early when signalled; True if stopped."""
        self._event.wait(timeout_s)
        return bool(self)

    def __bool__(self) -> bool:
        return self._event.is_set() or any(condition() for condition in self._conditions)
