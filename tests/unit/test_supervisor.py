"""`python -m stream_workers all`: the port plan, the restart policy and the supervisor's
decisions, driven with fake processes and a fake clock (no child is started)."""

from __future__ import annotations

import signal

import pytest

from stream_workers.all import (
    WORKERS,
    Backoff,
    ChildSpec,
    Supervisor,
    check_ports,
    describe_exit,
    parse_instances,
    parse_worker_args,
    plan,
)


class FakeProcess:
    """A child process that exits when told to (or on the signals it is sent)."""

    pids = iter(range(1000, 100_000))

    def __init__(self, spec: ChildSpec, *, obeys_sigterm: bool = True) -> None:
        self.spec, self.pid = spec, next(self.pids)
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.obeys_sigterm = obeys_sigterm

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGTERM and self.obeys_sigterm:
            self.returncode = 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def supervisor(clock: Clock, specs=None, **kwargs) -> tuple[Supervisor, list[FakeProcess]]:
    """A supervisor whose children are FakeProcesses (all launched, in order, in the list)."""
    launched: list[FakeProcess] = []
    obeys = kwargs.pop("obeys", {})  # name -> whether it exits on SIGTERM

    def launch(spec: ChildSpec) -> FakeProcess:
        process = FakeProcess(spec, obeys_sigterm=obeys.get(spec.name, True))
        launched.append(process)
        return process

    specs = specs if specs is not None else plan(dict.fromkeys(WORKERS, 1), ["payments"])
    sup = Supervisor(specs, launch, clock=clock, **kwargs)
    sup.start()
    return sup, launched


def running(sup: Supervisor) -> dict[str, FakeProcess]:
    return {c.spec.name: c.process for c in sup.children if c.process is not None}  # type: ignore[misc]


# --- the plan -------------------------------------------------------------------------------


def test_instances_default_to_one_each_and_zero_leaves_a_worker_out():
    assert parse_instances("") == {"price-alerts": 1, "transaction-alerts": 1, "jobs": 1}
    assert parse_instances("price-alerts=2, jobs=0") == {
        "price-alerts": 2, "transaction-alerts": 1, "jobs": 0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "says"),
    [("nope=1", "'nope' is not a worker"), ("jobs=-1", "'jobs=-1'"), ("jobs", "'jobs'"),
     ("jobs=two", "'jobs=two'")],
)  # fmt: skip
def test_bad_instances_are_named(text, says):
    with pytest.raises(ValueError, match=says):
        parse_instances(text)


def test_the_plan_orders_children_and_gives_stable_instances_and_consecutive_ports():
    specs = plan({"price-alerts": 2, "transaction-alerts": 1, "jobs": 2},
                 ["refunds", "payments"], metrics_port=9400)  # fmt: skip
    assert [(s.name, s.metrics_port) for s in specs] == [
        ("price-alerts/0", 9400), ("price-alerts/1", 9401), ("transaction-alerts/0", 9402),
        ("jobs-payments/0", 9403), ("jobs-payments/1", 9404), ("jobs-refunds/0", 9405),
        ("jobs-refunds/1", 9406),
    ]  # fmt: skip
    assert specs[4].argv("py") == ["py", "-m", "stream_workers", "jobs", "--processor",
                                   "payments", "--instance", "1", "--metrics-port", "9404"]  # fmt: skip
    assert specs[4].metrics_url == "http://127.0.0.1:9404/metrics"


def test_without_a_base_port_no_child_gets_the_metrics_option():
    specs = plan(dict.fromkeys(WORKERS, 1), ["payments"],
                 extra=parse_worker_args(["transaction-alerts=--batch-size 5000"]))  # fmt: skip
    assert [s.argv("py")[3:] for s in specs] == [
        ["price-alerts", "--instance", "0"],
        ["transaction-alerts", "--instance", "0", "--batch-size", "5000"],
        ["jobs", "--processor", "payments", "--instance", "0"],
    ]
    assert all(s.metrics_url is None for s in specs)
    assert check_ports(specs, lambda port: False) is None  # nothing to check


def test_worker_args_name_a_worker():
    with pytest.raises(ValueError, match="'prices=-x'"):
        parse_worker_args(["prices=-x"])


def test_ports_past_the_range_are_refused_naming_the_first_bad_one():
    specs = plan(dict.fromkeys(WORKERS, 1), ["payments"], metrics_port=65534)
    problem = check_ports(specs, lambda port: True)
    assert problem == ("--metrics-port 65534: 3 workers need ports 65534-65536; port 65536 "
                       "(jobs-payments/0) is past 65535")  # fmt: skip


def test_a_port_in_use_is_named_with_its_child():
    specs = plan(dict.fromkeys(WORKERS, 1), ["payments"], metrics_port=9400)
    problem = check_ports(specs, lambda port: port != 9401)
    assert problem == "--metrics-port 9400: port 9401 (transaction-alerts/0) is already in use"
    assert check_ports(specs, lambda port: True) is None


# --- the restart policy ---------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run():
    backoff = Backoff(initial_s=1, max_s=60, stable_s=60)
    assert [backoff.after_crash(2.0) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.after_crash(60.0) == 1  # it ran a minute: a new crash, not the same one
    assert backoff.after_crash(0.5) == 2


def test_exits_are_described_with_the_code_or_the_signal_name():
    assert describe_exit(1) == "exited 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"


# --- the supervisor -------------------------------------------------------------------------


def test_a_crashed_child_is_restarted_after_its_backoff_and_the_crash_logged(clock, caplog):
    sup, launched = supervisor(clock)
    victim = running(sup)["transaction-alerts/0"]
    victim.returncode = -signal.SIGKILL
    clock.now += 5
    assert sup.step()
    assert "transaction-alerts/0" not in running(sup)
    crash = next(r.getMessage() for r in caplog.records if "crashed" in r.getMessage())
    assert (f"transaction-alerts/0 (worker transaction-alerts, instance 0, pid {victim.pid}) "
            "killed by SIGKILL after 5.0s; restarting in 1s") in crash  # fmt: skip
    clock.now += 0.9
    sup.step()
    assert "transaction-alerts/0" not in running(sup)
    clock.now += 0.1
    sup.step()
    again = running(sup)["transaction-alerts/0"]
    assert again is launched[-1] and again.spec == victim.spec  # the same --instance
    # A second crash in a row waits twice as long; the others were never touched.
    again.returncode = 1
    clock.now += 1
    sup.step()
    assert sup.children[1].restart_at == clock.now + 2
    assert [p.signals for p in launched[:3] if p is not victim] == [[], []]


def test_a_child_exiting_2_stops_the_others_and_the_supervisor_exits_2(clock, caplog):
    sup, launched = supervisor(clock)
    running(sup)["price-alerts/0"].returncode = 2
    assert sup.step()  # the others are being stopped
    others = [p for p in launched if p.spec.name != "price-alerts/0"]
    assert all(p.signals == [signal.SIGTERM] for p in others)
    assert not sup.step()
    assert sup.exit_code == 2
    assert len(launched) == 3  # nothing restarted
    assert "price-alerts/0 exited 2: bad settings or usage" in caplog.text


def test_sigterm_stops_every_child_and_exits_0_when_all_exited_0(clock):
    sup, launched = supervisor(clock)
    sup.request_stop(signal.SIGTERM)
    assert sup.step()
    assert all(p.signals == [signal.SIGTERM] for p in launched)
    assert not sup.step()
    assert sup.exit_code == 0


def test_a_pending_restart_is_dropped_when_stopping(clock):
    sup, launched = supervisor(clock)
    running(sup)["jobs-payments/0"].returncode = 1
    sup.step()
    sup.request_stop(signal.SIGINT)
    clock.now += 120
    sup.step()
    assert not sup.step()
    assert len(launched) == 3
    assert sup.exit_code == 1  # a child had not exited 0


def test_a_child_that_does_not_stop_in_time_is_killed_with_its_group(clock, monkeypatch, caplog):
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr("os.killpg", lambda pid, signum: killed.append((pid, signum)))
    sup, launched = supervisor(clock, stop_timeout_s=30, obeys={"jobs-payments/0": False})
    stuck = launched[2]
    sup.request_stop(signal.SIGTERM)
    assert sup.step()
    clock.now += 29
    assert sup.step() and killed == []
    clock.now += 1
    assert sup.step()
    assert killed == [(stuck.pid, signal.SIGKILL)]
    assert (f"jobs-payments/0 (pid {stuck.pid}): SIGKILL to it and its children (not stopped "
            "in 30s)") in caplog.text  # fmt: skip
    stuck.returncode = -signal.SIGKILL
    assert not sup.step()
    assert sup.exit_code == 1


def test_a_second_signal_kills_at_once(clock, monkeypatch):
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr("os.killpg", lambda pid, signum: killed.append((pid, signum)))
    sup, launched = supervisor(clock, obeys={s: False for s in ("price-alerts/0",
                                                                "transaction-alerts/0")})  # fmt: skip
    sup.request_stop(signal.SIGTERM)
    sup.step()
    sup.request_stop(signal.SIGTERM)
    sup.step()
    assert sorted(killed) == sorted((p.pid, signal.SIGKILL) for p in launched[:2])
    for p in launched[:2]:
        p.returncode = -signal.SIGKILL
    assert not sup.step()
    assert sup.exit_code == 128 + signal.SIGTERM


# --- what the demo reads of a worker's metrics ------------------------------------------------


def test_the_demo_sums_records_and_lag_per_worker_process_from_prometheus_text():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    from infra.demo import worker_metrics

    registry = CollectorRegistry()
    labels = ("worker", "instance", "lane")
    records = Counter("stream_worker_records", "records", labels, registry=registry)
    lag = Gauge("stream_worker_lag_records", "lag", (*labels, "topic", "partition"),
                registry=registry)  # fmt: skip
    records.labels("jobs-payments", "0", "realtime").inc(20)
    records.labels("jobs-payments", "0", "normal").inc(500)
    lag.labels("jobs-payments", "0", "normal", "jobs.payments.normal", "0").set(3)
    lag.labels("jobs-payments", "0", "normal", "jobs.payments.normal", "1").set(4)
    text = generate_latest(registry).decode()
    assert worker_metrics(text) == {
        ("jobs-payments", "0", "realtime"): (20, 0),
        ("jobs-payments", "0", "normal"): (500, 7),
    }


# --- what `make status` prints --------------------------------------------------------------


def test_status_rows_tell_live_workers_from_stale_files(tmp_path):
    import json
    import os

    from infra.status import format_workers, read_statuses, worker_rows

    def write(name: str, pid: int, state: str, lag: dict) -> None:
        status = {"worker": name.split(".")[0], "instance": name.split(".")[1], "pid": pid,
                  "state": state, "records": 7, "dead_letters": 1, "lag": lag,
                  "updated_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(status))

    write("price-alerts.0", os.getpid(), "running", {"trades[0]": 2, "trades[1]": 3})
    write("transaction-alerts.1", 2**22 + 12345, "stopped", {})  # past any pid_max: gone
    rows = worker_rows(read_statuses(tmp_path))
    assert [(r.worker, r.instance, r.alive, r.state, r.lag) for r in rows] == [
        ("price-alerts", "0", True, "running", 5),
        ("transaction-alerts", "1", False, "stopped", None),
    ]
    lines = format_workers(rows).splitlines()
    assert lines[0].split() == ["worker", "instance", "pid", "alive", "state", "records", "dead",
                                "letters", "lag", "updated"]  # fmt: skip
    assert lines[2].split()[3:8] == ["NO", "stopped", "7", "1", "-"]


def test_a_group_report_names_members_and_each_partitions_offsets():
    from infra.status import GroupLag, PartitionLag, format_group, member_text

    member = {"group_instance_id": "price-alerts.0", "member_assignment": {
        "assigned_partitions": [{"topic": "trades", "partitions": [2, 0, 1]}]}}  # fmt: skip
    report = GroupLag("price-alerts", "Stable", [member_text(member)], [
        PartitionLag("trades", 0, 10, 12, 2), PartitionLag("trades", 1, None, 3, 3),
    ])  # fmt: skip
    assert format_group(report).splitlines() == [
        "group price-alerts: state Stable, 1 member(s) (price-alerts.0 trades[0,1,2]), lag 5",
        "  partition  committed  end  lag",
        "  trades[0]  10         12   2",
        "  trades[1]  -          3    3",
    ]
