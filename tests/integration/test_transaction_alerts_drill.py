"""The exactly-once drill: two worker processes, SIGKILLed (or SIGTERMed, or paused) at random
moments and restarted, several rounds; the outputs must be as if each transaction had been
processed once. Each round starts only when both workers say (in their status files) that
they run with their partitions restored and the broker sees the group Stable."""

import random
import signal
import subprocess
import sys
import time

import pytest

from sources.transactions import generate
from tasks.kafka import group_lag
from tests.conftest import subprocess_env
from tests.helpers import eventually, group_ready, group_report, status_report
from tests.integration._transactions import (
    MALFORMED,
    alerts_by_user,
    changelog_totals,
    dead_letters,
    produce,
    reference,
)

pytestmark = pytest.mark.integration

ROUNDS = ("restart", "takeover", "sigterm", "zombie", "restart")
# One chunk before the rounds, one per round, one more while the victim is away (every
# round but a quick restart), one at the end.
AWAY = sum(round_ != "restart" for round_ in ROUNDS)
USERS, CHUNKS, CHUNK = 12, 1 + len(ROUNDS) + AWAY + 1, 350  # 3500 transactions


def test_sigkilled_workers_neither_drop_nor_duplicate_alerts_or_totals(settings, seed, tmp_path):
    status_dir = tmp_path / "status"
    env = subprocess_env() | {
        "STREAM_STATUS_DIR": str(status_dir),
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
        return "\n".join(f"--- worker {i} (whole log: {p})\n{p.read_text()[-4000:]}"
                         for i, p in logs.items())  # fmt: skip

    def diagnose() -> str:
        group = group_report(settings, settings.transaction_alerts_group,
                             [settings.transactions_topic])  # fmt: skip
        return (f"seed {seed} (replay: SEED={seed}), round {round_}\n{group}\n"
                f"{status_report(status_dir)}\n{worker_logs()}")  # fmt: skip

    def lag() -> int | None:
        return group_lag(settings.transaction_alerts_group, [settings.transactions_topic], settings)

    round_ = "start"
    stream = list(generate(USERS, CHUNKS * CHUNK, seed=seed))
    chunks = iter([stream[i * CHUNK : (i + 1) * CHUNK] for i in range(CHUNKS)])
    bad = iter(MALFORMED)
    rng = random.Random(seed)

    produced_in: list[str] = []  # the round each chunk was produced in

    def produce_next() -> None:
        chunk = next(chunks)
        produced_in.append(round_)
        cut = rng.randrange(len(chunk))
        malformed = next(bad, None)  # one per chunk while they last
        produce(settings, chunk[:cut] + ([malformed[:2]] if malformed else []) + chunk[cut:])

    def ready() -> bool:
        # Both processes' own state: partitions assigned and restored, the group Stable.
        # From now on a kill hits a working process.
        pids = {process.pid for process in workers.values()}
        return group_ready(settings, settings.transaction_alerts_group,
                           [settings.transactions_topic], status_dir, pids)  # fmt: skip

    workers = {"0": start("0"), "1": start("1")}
    try:
        eventually(ready, 90, 0.2, diagnose)
        produce_next()
        eventually(lambda: lag() == 0, 60, 0.1, diagnose)
        # kill + restart at once; kill, the survivor takes over, restart; and a pause
        # (SIGSTOP) long enough that the group moves on: the zombie must be fenced.
        for round_ in ROUNDS:
            produce_next()
            # A random moment while they work through the chunk.
            eventually(lambda: (lag() or 0) < CHUNK, 30, 0.02, diagnose)
            time.sleep(rng.uniform(0.0, 0.3))  # not a wait for anything: the moment of the kill
            victim = rng.choice(sorted(workers))
            if round_ == "zombie":
                workers[victim].send_signal(signal.SIGSTOP)
            elif round_ == "sigterm":
                # Mid-batch: it finishes and commits the batch in hand, then exits 0.
                workers[victim].send_signal(signal.SIGTERM)
                assert workers[victim].wait(30) == 0, diagnose()
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
            eventually(ready, 90, 0.2, diagnose)
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
        if got[user] != alerts:
            mine = got[user]
            first = next(i for i in range(max(len(mine), len(alerts)))
                         if i >= min(len(mine), len(alerts)) or mine[i] != alerts[i])  # fmt: skip
            at = (alerts[first] if first < len(alerts) else mine[first])[2]
            chunk = next(i for i, t in enumerate(stream) if t.time == at) // CHUNK
            raise AssertionError(
                f"{user}: {len(got[user])} alerts, want {len(alerts)}; the first differs at "
                f"{at} (chunk {chunk}, produced in round {produced_in[chunk]})\n{diagnose()}"
            )
    assert changelog_totals(settings) == want_totals
    letters = dead_letters(settings)
    want_letters = sorted((m[1].decode(), m[2]) for m in MALFORMED)
    got_letters = sorted((d["value"], d["reason"]) for d in letters)
    assert len(got_letters) == len(want_letters), got_letters
    for (value, reason), (want_value, want_start) in zip(got_letters, want_letters, strict=True):
        assert value == want_value and reason.startswith(want_start), (value, reason)
