"""The command dispatcher of `python -m stream_workers` and `python -m sources`, the workers'
`--help`, their refusal of a metrics port they cannot use, and the log formats."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys

import pytest

import sources
import stream_workers
from tasks import commands
from tasks.commands import available, dispatch, log_context, log_handler
from tasks.settings import get_settings

WORKERS = ("price-alerts", "transaction-alerts", "jobs")


@pytest.fixture
def env(monkeypatch):
    """A clean settings environment for one test (restored afterwards), and log fields."""
    for name in ("STREAM_METRICS_PORT", "LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(commands, "_log_context", {})
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <argv>` in a child process (its own logging set up, as a user runs it)."""
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


# --- dispatch -----------------------------------------------------------------------------


def test_only_modules_with_a_main_are_commands_each_with_its_description():
    commands_ = available(stream_workers)
    assert set(WORKERS) <= set(commands_)
    assert not {"runtime", "metrics", "events"} & set(commands_)  # library modules
    assert commands_["price-alerts"] == "the realtime side of price alerts."


def test_an_unknown_command_is_named_and_the_known_ones_listed(capsys):
    assert dispatch(stream_workers, ["nope"], "worker") == 2
    err = capsys.readouterr().err
    assert err.startswith("unknown worker 'nope'\n")
    assert "  transaction-alerts  per-user running totals" in err
    assert dispatch(sources, ["nope"], "source") == 2
    err = capsys.readouterr().err
    assert err.startswith("unknown source 'nope'\n") and "  trades " in err


def test_help_lists_the_commands_and_succeeds(capsys):
    assert dispatch(stream_workers, ["--help"], "worker") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m stream_workers <worker> [options]")
    assert "  jobs                the job processor daemon." in out
    assert dispatch(stream_workers, [], "worker") == 2  # no command: usage, as an error


# --- each worker's --help -----------------------------------------------------------------


@pytest.mark.parametrize("worker", WORKERS)
def test_a_workers_help_shows_defaults_common_options_topics_and_settings(worker, env, capsys):
    env.setenv("TRADES_TOPIC", "trades-now")
    env.setenv("TRANSACTIONS_TOPIC", "transactions-now")
    env.setenv("JOBS_TOPIC_PREFIX", "jobs-now")
    env.setenv("STREAM_METRICS_PORT", "9310")
    with pytest.raises(SystemExit) as exit_:
        dispatch(stream_workers, [worker, "--help"], "worker")
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # as one line: wrapping aside
    assert out.startswith(f"usage: python -m stream_workers {worker} ")
    assert "--instance INSTANCE" in out
    assert "--metrics-port PORT serve Prometheus metrics on this port (default: 9310" in out
    assert "--metrics-host HOST the address the metrics endpoint listens on (default: " \
           "127.0.0.1)" in out  # fmt: skip
    topics = {"price-alerts": ("reads: trades-now (TRADES_TOPIC)",
                               "writes: notifications (NOTIFICATIONS_TOPIC)"),
              "transaction-alerts": ("reads: transactions-now (TRANSACTIONS_TOPIC)",
                                     "writes: transaction-alerts (TRANSACTION_ALERTS_TOPIC)"),
              "jobs": ("reads: jobs-now.<processor>.realtime and jobs-now.<processor>.normal",
                       "writes: job-results.<processor> (JOB_RESULTS_TOPIC_PREFIX)")}  # fmt: skip
    for text in topics[worker]:
        assert text in out
    own = {"price-alerts": "PRICE_ALERTS_BATCH_SIZE=5000",
           "transaction-alerts": "TRANSACTION_ALERTS_BATCH_SIZE=20000",
           "jobs": "JOBS_PROCESSOR_MAX_BATCH=500"}  # fmt: skip
    assert own[worker] in out
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "STREAM_METRICS_PORT", "STREAM_STATUS_DIR",
                 "STREAM_HEARTBEAT_INTERVAL_S", "STREAM_EVENTS_ENABLED", "LOG_FORMAT",
                 "PREFECT_API_URL"):  # fmt: skip
        assert name in out


def test_worker_specific_defaults_are_shown(env, capsys):
    with pytest.raises(SystemExit):
        dispatch(stream_workers, ["price-alerts", "--help"], "worker")
    out = " ".join(capsys.readouterr().out.split())
    assert "--group GROUP consumer group (default: price-alerts)" in out
    assert "(default: 5000)" in out


# --- a metrics port that cannot work ------------------------------------------------------


@pytest.mark.parametrize("worker", WORKERS)
def test_a_metrics_port_in_use_is_one_line_naming_it_and_exit_2(worker):
    extra = ["--processor", "payments"] if worker == "jobs" else []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("stream_workers", worker, *extra, "--metrics-port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.endswith(f" ERROR {worker}: stopping: cannot serve metrics on 127.0.0.1:"
                         f"{port} (--metrics-port {port}): Address already in use")  # fmt: skip


@pytest.mark.parametrize("port", ["0", "65536"])
def test_a_metrics_port_out_of_range_is_one_line_and_exit_2(port, env, caplog):
    assert dispatch(stream_workers, ["price-alerts", "--metrics-port", port], "worker") == 2
    [record] = caplog.records
    assert record.getMessage() == f"stopping: --metrics-port {port}: not a TCP port (1 to 65535)"
    assert record.exc_info is None


def test_a_bad_metrics_port_setting_is_one_line_naming_the_variable():
    env = {"PATH": "/usr/bin:/bin", "STREAM_METRICS_PORT": "70000"}
    done = run("stream_workers", "transaction-alerts", env=env)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "invalid settings: STREAM_METRICS_PORT: " in line and "70000" in line


# --- logs ---------------------------------------------------------------------------------


def _lines(handler: logging.Handler, stream: io.StringIO, emit) -> list[str]:
    logger = logging.getLogger("tests.commands.format")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().splitlines()


def test_json_log_lines_parse_with_timestamp_level_logger_message_context_and_exception(env):
    stream = io.StringIO()
    log_context(worker="price-alerts", instance="a")

    def emit(logger):
        logger.info("assigned %s", ["trades[0]"])
        try:
            int("x")
        except ValueError:
            logger.exception("processing failed")

    first, second = (json.loads(line) for line in _lines(log_handler("json", stream=stream),
                                                        stream, emit))  # fmt: skip
    assert first["message"] == "assigned ['trades[0]']"
    assert (first["level"], first["logger"]) == ("INFO", "tests.commands.format")
    assert (first["worker"], first["instance"]) == ("price-alerts", "a")
    assert first["timestamp"].endswith("+00:00") and "T" in first["timestamp"]
    assert "exception" not in first
    assert second["level"] == "ERROR" and second["message"] == "processing failed"
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: invalid literal for int()" in second["exception"]


def test_the_readable_format_stays_the_default(env):
    stream = io.StringIO()
    log_context(worker="price-alerts")
    [line] = _lines(log_handler(stream=stream), stream, lambda logger: logger.warning("hi"))
    assert line.endswith(" WARNING tests.commands.format: hi") and "price-alerts" not in line


def test_log_format_json_makes_the_command_log_json_lines():
    env = {"PATH": "/usr/bin:/bin", "LOG_FORMAT": "json"}
    done = run("stream_workers", "price-alerts", "--metrics-port", "0", env=env)
    assert done.returncode == 2
    [record] = [json.loads(line) for line in done.stderr.splitlines()]
    assert record["message"] == "stopping: --metrics-port 0: not a TCP port (1 to 65535)"
    assert (record["level"], record["logger"], record["worker"]) == (
        "ERROR", "price-alerts", "price-alerts",
    )  # fmt: skip
    # `python -m sources` logs the same way (here: no broker answers on port 1).
    env |= {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_TIMEOUT_S": "1"}
    done = run("sources", "trades", "--duration", "1", env=env)
    assert done.returncode == 1
    *_, last = [json.loads(line) for line in done.stderr.splitlines()]
    assert last["message"].startswith("stopping: Kafka broker not reachable at 127.0.0.1:1")
    assert (last["logger"], last["source"]) == ("trades", "trades")


def test_an_invalid_log_format_is_reported_in_readable_text():
    done = run("stream_workers", "price-alerts", env={"PATH": "/usr/bin:/bin",
                                                      "LOG_FORMAT": "yaml"})  # fmt: skip
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "ERROR price-alerts: stopping: invalid settings: LOG_FORMAT: " in line
