"""Small helpers the tests share (polling with a deadline, reading Prefect artifacts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def eventually(probe: Callable[[], T], timeout_s: float = 60, interval_s: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s}s; last value: {value!r}")
        time.sleep(interval_s)


def artifacts(key: str) -> list[dict[str, Any]]:
    """Every artifact stored under `key` in the current Prefect API, newest first (as JSON)."""
    from prefect.client.orchestration import get_client

    query = {
        "artifacts": {"key": {"any_": [key]}},
        "sort": "CREATED_DESC",
        "limit": 200,
        "offset": 0,
    }
    with get_client(sync_client=True) as client:
        return client.request("POST", "/artifacts/filter", json=query).json()
