"""Session fixtures shared by the suite.

Integration tests get one real Kafka broker per session (started through the same code as
`make up`, or reused when one already answers) and one Prefect test harness per session.
Each test isolates itself with its own topic names and its own DuckDB file.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.settings import Settings, get_settings

# No telemetry calls from the test harness (the network here is closed anyway).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """A real broker's bootstrap address; stopped at the end only if this session started it."""
    from infra import kafka_broker as broker

    settings = get_settings()
    started = broker.ensure_running(settings)
    yield settings.kafka_bootstrap_servers
    if started:
        broker.stop()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One Prefect test harness (a real API server on a temporary SQLite DB) per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def seed() -> int:
    """The seed of this test's random data: printed (pytest shows it when the test fails);
    `SEED=<n>` replays a failed run with the same data."""
    value = int(os.environ.get("SEED") or random.randrange(1_000_000))
    print(f"random data from seed {value} (replay: SEED={value})")
    return value


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and table names of one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(kafka_broker: str, tmp_path: Path, unique: str, monkeypatch) -> Iterator[Settings]:
    """Settings with this test's own topics and warehouse file, also exported to the env
    (so `get_settings()` in flows and subprocess workers sees the same)."""
    overrides = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_broker,
        "WAREHOUSE_PATH": str(tmp_path / "warehouse.duckdb"),
        "WAREHOUSE_CONCURRENCY_LIMIT": f"warehouse-writer-{unique}",
        "TRADES_TOPIC": f"trades-{unique}",
        "PRICE_ALERTS_TOPIC": f"price-alerts-{unique}",
        "NOTIFICATIONS_TOPIC": f"notifications-{unique}",
        "TRANSACTIONS_TOPIC": f"transactions-{unique}",
        "TRANSACTION_ALERTS_TOPIC": f"transaction-alerts-{unique}",
        "TRANSACTION_TOTALS_CHANGELOG_TOPIC": f"transaction-totals-changelog-{unique}",
        "TRANSACTION_ALERTS_GROUP": f"transaction-alerts-{unique}",
        "JOBS_TOPIC_PREFIX": f"jobs-{unique}",
        "JOB_RESULTS_TOPIC_PREFIX": f"job-results-{unique}",
    }
    for key, value in overrides.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def subprocess_env() -> dict[str, str]:
    """The current environment (with the test's settings) for a child process."""
    return dict(os.environ)
