"""The exactly-once drill: two worker processes, SIGKILLed at random moments and restarted,
several rounds; the outputs must be as if each transaction had been processed once."""

import random
import signal
import subprocess
import sys
import time

import pytest

from sources.transactions import generate
from tasks.kafka import group_lag
from tests.conftest import subprocess_env
from tests.helpers import eventually, group_report
from tests.integration._transactions import (
    MALFORMED,
    alerts_by_user,
    changelog_totals,
    dead_letters,
    produce,
    reference,
)

pytestmark = pytest.mark.integration

USERS, CHUNKS, CHUNK = 12, 9, 350  # 3150 transactions


def test_sigkilled_workers_neither_drop_nor_duplicate_alerts_or_totals(settings, unique, tmp_path):
    env = subprocess_env() | {
        # Small batches: many transactions in flight, so kills land inside them.
        "TRANSACTION_ALERTS_BATCH_SIZE": "10",
        "TRANSACTION_ALERTS_SESSION_TIMEOUT_MS": "6000",
        "TRANSACTION_ALERTS_TXN_TIMEOUT_MS": "5000",
    }
    logs = {}

    def start(instance: str) -> subprocess.Popen:
        logs[instance] = tmp_path / f"worker-{instance}.log"
        with open(logs[instance], "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "stream_workers", "transaction-alerts",
                 "--instance", instance],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def worker_logs() -> str:
        return "\n".join(f"--- worker {i}\n{p.read_text()[-4000:]}" for i, p in logs.items())

    def diagnose() -> str:
        group = group_report(settings, settings.transaction_alerts_group,
                             [settings.transactions_topic])  # fmt: skip
        return f"seed {seed}, round {round_}\n{group}\n{worker_logs()}"

    def lag() -> int | None:
        return group_lag(settings.transaction_alerts_group, [settings.transactions_topic], settings)

    seed = int(unique, 16) % 1000
    round_ = "start"
    stream = list(generate(USERS, CHUNKS * CHUNK, seed=seed))
    chunks = iter([stream[i * CHUNK : (i + 1) * CHUNK] for i in range(CHUNKS)])
    bad = iter(MALFORMED)
    rng = random.Random(unique)

    def produce_next() -> None:
        chunk = next(chunks)
        cut = rng.randrange(len(chunk))
        malformed = next(bad, None)  # one per chunk while they last
        produce(settings, chunk[:cut] + ([malformed[:2]] if malformed else []) + chunk[cut:])

    def restored(instance: str) -> int:
        return logs[instance].read_text().count("from the changelog")

    def up(instance: str, before: int = 0) -> None:
        # Its partitions assigned and restored: from now on a kill hits a working process.
        eventually(lambda: restored(instance) > before, 60, 0.1, diagnose)

    workers = {"0": start("0"), "1": start("1")}
    try:
        up("0")
        up("1")
        produce_next()
        eventually(lambda: lag() == 0, 60, 0.1, diagnose)
        # kill + restart at once; kill, the survivor takes over, restart; and a pause
        # (SIGSTOP) long enough that the group moves on: the zombie must be fenced.
        for round_ in ("restart", "takeover", "restart", "zombie", "restart"):
            produce_next()
            # A random moment while they work through the chunk.
            eventually(lambda: (lag() or 0) < CHUNK, 30, 0.02, diagnose)
            time.sleep(rng.uniform(0.0, 0.3))
            victim = rng.choice(sorted(workers))
            before = restored(victim)
            if round_ == "zombie":
                workers[victim].send_signal(signal.SIGSTOP)
            else:
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait(10)
            if round_ != "restart":
                # The survivor must take the other's partitions over and go on.
                produce_next()
                eventually(lambda: lag() == 0, 60, 0.2, diagnose)
            if round_ == "zombie":
                workers[victim].send_signal(signal.SIGCONT)
            else:
                workers[victim] = start(victim)
            up(victim, before)
        produce_next()
        assert next(chunks, None) is None
        eventually(lambda: lag() == 0, 60, 0.5, diagnose)
        for process in workers.values():
            process.send_signal(signal.SIGTERM)
        for process in workers.values():
            assert process.wait(30) == 0, worker_logs()
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    want_alerts, want_totals = reference(stream)
    assert sum(map(len, want_alerts.values())) > 200
    got = alerts_by_user(settings)
    assert got.keys() == want_alerts.keys(), worker_logs()
    for user, alerts in want_alerts.items():
        assert got[user] == alerts, f"{user}: {len(got[user])} alerts, want {len(alerts)}"
    assert changelog_totals(settings) == want_totals
    letters = dead_letters(settings)
    want_letters = sorted((m[1].decode(), m[2]) for m in MALFORMED)
    got_letters = sorted((d["value"], d["reason"]) for d in letters)
    assert len(got_letters) == len(want_letters), got_letters
    for (value, reason), (want_value, want_start) in zip(got_letters, want_letters, strict=True):
        assert value == want_value and reason.startswith(want_start), (value, reason)
