"""`python -m stream_workers all` against the real broker, with this test's own topics and
groups: a SIGKILLed worker is restarted and consumes again, SIGTERM stops every worker cleanly
with everything produced committed, a worker exiting 2 stops the supervisor with 2, and no
worker outlives a SIGKILLed supervisor."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra.status import format_group, group_lags, read_statuses, supervised, worker_groups
from tasks.kafka import ensure_topics, job_topics, make_producer, project_topics
from tasks.settings import get_settings
from tests.conftest import subprocess_env
from tests.helpers import eventually, read_topic, status_report

pytestmark = pytest.mark.integration

# The status files of the default children: the jobs daemon is two processes (its lanes).
ALL_PROCESSES = {"price-alerts.0", "transaction-alerts.0", "jobs-payments-normal.0",
                 "jobs-payments-realtime.0"}  # fmt: skip


class Supervisor:
    """A `python -m stream_workers all` subprocess, its output in a log file; `stop()` (also
    on failure) leaves nothing of it running."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str) -> None:
        self.status_dir = Path(env["STREAM_STATUS_DIR"])
        self.log_path = tmp_path / f"supervisor-{len(list(tmp_path.glob('supervisor-*')))}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stream_workers", "all", *args],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def statuses(self) -> dict[str, dict]:
        """The status files of its live workers, by `<worker>.<instance>`."""
        mine = supervised(read_statuses(self.status_dir), self.pid)
        return {f"{s['worker']}.{s['instance']}": s for s in mine}

    def running(self, names: set[str]) -> dict[str, dict] | None:
        statuses = self.statuses()
        if set(statuses) == names and all(s["state"] == "running" for s in statuses.values()):
            return statuses
        return None

    def started_pids(self, child: str) -> list[int]:
        """The pids it logged starting `child` (e.g. "price-alerts/0") with, in order."""
        return [
            int(p) for p in re.findall(rf"started {re.escape(child)} \(pid (\d+)\)", self.log())
        ]

    def diagnose(self) -> str:
        return (f"{status_report(self.status_dir)}\n--- supervisor log ({self.log_path}), "
                f"last 6000 characters:\n{self.log()[-6000:]}")  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Whatever a failed test left: the workers of this test's own status files.
        for status in read_statuses(self.status_dir):
            if _is_worker(status["pid"]):
                os.kill(status["pid"], signal.SIGKILL)


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"stream_workers" in cmdline or b"multiprocessing" in cmdline


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def env(settings, unique, tmp_path, monkeypatch) -> dict[str, str]:
    """The test's settings (its own topics and groups, here and in the supervisor and its
    children), as the children's environment."""
    extra = {
        "STREAM_STATUS_DIR": str(tmp_path / "status"),
        "PRICE_ALERTS_GROUP": f"price-alerts-{unique}",
        "PRICE_FIRE_TRANSACTIONAL_PREFIX": f"price-alerts-fire-{unique}",
        "STREAM_EVENTS_ENABLED": "false",  # no Prefect API in these tests
    }
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()  # the `settings` fixture clears it again at the end
    return subprocess_env()


def _produce(settings) -> None:
    """A record on every group's topic: a malformed trade and malformed jobs (each worker
    dead-letters them, committing their offsets) and a deposit alert's transaction."""
    producer = make_producer(settings, key_serializer=None, value_serializer=None)
    producer.send(settings.trades_topic, key=b"BTC-USD", value=b'{"trade_id": -1}')
    for priority in ("realtime", "normal"):
        producer.send(settings.jobs_topic("payments", priority), value=b"not a job")
    deposit = {"user": "zed", "amount": "5000.00", "time": datetime.now(UTC).isoformat()}
    producer.send(settings.transactions_topic, key=b"zed", value=json.dumps(deposit).encode())
    producer.flush()
    producer.close()


def _lag_report(settings) -> str:
    return "\n".join(format_group(g) for g in group_lags(settings, worker_groups(settings)))


def test_a_killed_worker_is_restarted_and_sigterm_stops_all_cleanly(env, tmp_path):
    settings = get_settings()
    assert settings.price_alerts_group == env["PRICE_ALERTS_GROUP"]
    ensure_topics(project_topics(settings) + job_topics("payments", settings), settings)
    supervisor = Supervisor(tmp_path, env)
    try:
        eventually(lambda: supervisor.running(ALL_PROCESSES), 120, 0.5, supervisor.diagnose)

        victim = supervisor.statuses()["transaction-alerts.0"]["pid"]
        os.kill(victim, signal.SIGKILL)
        crash = (f"crashed: transaction-alerts/0 (worker transaction-alerts, instance 0, pid "
                 f"{victim}) killed by SIGKILL")  # fmt: skip
        # Within 30 s: the crash logged, a new process of that worker running and consuming.
        eventually(lambda: crash in supervisor.log(), 30, 0.2, supervisor.diagnose)
        restarted = eventually(lambda: supervisor.running(ALL_PROCESSES), 30, 0.2,
                               supervisor.diagnose)["transaction-alerts.0"]["pid"]  # fmt: skip
        assert restarted != victim
        assert supervisor.started_pids("transaction-alerts/0")[-1] == restarted
        _produce(settings)
        alerts = eventually(
            lambda: [r for r in read_topic(settings, settings.transaction_alerts_topic)
                     if r.key == b"zed"], 30, 0.5, supervisor.diagnose,
        )  # fmt: skip
        assert json.loads(alerts[0].value)["kind"] == "deposit"

        # Every group caught up with what was produced, then a clean stop.
        def caught_up() -> bool:
            return all(g.lag == 0 for g in group_lags(settings, worker_groups(settings)))

        eventually(caught_up, 60, 0.5, lambda: f"{_lag_report(settings)}\n{supervisor.diagnose()}")
        workers = supervisor.statuses()
        supervisor.process.send_signal(signal.SIGTERM)
        assert supervisor.process.wait(60) == 0, supervisor.diagnose()
    finally:
        supervisor.stop()

    log = supervisor.log()
    for child in ("price-alerts/0", "transaction-alerts/0", "jobs-payments/0"):
        pid = supervisor.started_pids(child)[-1]
        assert re.search(rf"{re.escape(child)} \(.*pid {pid}\) exited 0 after .*: stopped", log), (
            log
        )
    assert "every worker stopped cleanly" in log
    assert not any(_alive(s["pid"]) for s in workers.values())
    assert {s["state"] for s in read_statuses(supervisor.status_dir)} == {"stopped"}
    # Nothing produced is left uncommitted: committed offsets are the end offsets.
    for group in group_lags(settings, worker_groups(settings)):
        written = [p for p in group.partitions if p.end > 0]
        assert written, format_group(group)
        assert all(p.committed == p.end for p in written), format_group(group)


def test_a_worker_exiting_2_stops_every_worker_and_the_supervisor_exits_2(env, tmp_path):
    # Only the child checks its own options: retrying it cannot help.
    supervisor = Supervisor(tmp_path, env, "--instances", "jobs=0",
                            "--worker-args", "transaction-alerts=--batch-size 0")  # fmt: skip
    try:
        eventually(lambda: supervisor.process.poll() is not None, 90, 0.2, supervisor.diagnose)
        assert supervisor.process.returncode == 2, supervisor.diagnose()
    finally:
        supervisor.stop()
    log = supervisor.log()
    bad = supervisor.started_pids("transaction-alerts/0")
    assert len(bad) == 1, log  # not restarted
    assert "--batch-size must be >= 1, got 0" in log  # the child's own error
    assert (f"transaction-alerts/0 (worker transaction-alerts, instance 0, pid {bad[0]}) "
            "exited 2") in log  # fmt: skip
    assert "stopped (transaction-alerts/0 exited 2: bad settings or usage); exit status 2" in log
    (other,) = supervisor.started_pids("price-alerts/0")
    assert not _alive(other)


def test_no_worker_outlives_a_sigkilled_supervisor(env, tmp_path):
    # The jobs daemon: a child and its REALTIME lane, a grandchild of the supervisor.
    supervisor = Supervisor(tmp_path, env, "--instances", "price-alerts=0,transaction-alerts=0")
    try:
        lanes = {"jobs-payments-normal.0", "jobs-payments-realtime.0"}
        workers = eventually(lambda: supervisor.running(lanes), 90, 0.5, supervisor.diagnose)
        supervisor.process.kill()
        supervisor.process.wait(10)
        pids = [
            workers["jobs-payments-normal.0"]["pid"],
            workers["jobs-payments-realtime.0"]["pid"],
        ]
        eventually(lambda: not any(map(_alive, pids)), 30, 0.2, supervisor.diagnose)
    finally:
        supervisor.stop()
    # The daemon was SIGKILLed by the kernel (PR_SET_PDEATHSIG); its REALTIME lane saw its
    # parent gone and stopped cleanly.
    lane = next(s for s in read_statuses(supervisor.status_dir) if s["pid"] == pids[1])
    assert lane["state"] == "stopped", supervisor.diagnose()
