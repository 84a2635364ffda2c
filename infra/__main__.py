"""`python -m infra up|down|status|kafka-fetch|topics|demo`: the local stack."""

from __future__ import annotations

import argparse
import os
import sys

from infra import kafka_broker, prefect_server, services
from infra import status as worker_status
from tasks.kafka import BrokerUnavailableError, ensure_topics, project_topics
from tasks.settings import get_settings

DEMO_METRICS_PORT = 9410


def up(workers: bool = False) -> None:
    started = kafka_broker.ensure_running()
    print(f"kafka: {'started' if started else 'already running'} at "
          f"{get_settings().kafka_bootstrap_servers}")  # fmt: skip
    created = ensure_topics(project_topics())
    print(f"topics: {len(created)} created")
    started = prefect_server.ensure_running()
    print(f"prefect: {'started' if started else 'already running'}; UI at "
          f"http://{prefect_server.HOST}:{prefect_server.PORT}")  # fmt: skip
    if workers:
        start_workers()


def start_workers() -> None:
    """`python -m stream_workers all` in the background, its events to the Prefect server."""
    pid = services.running_pid(services.WORKERS)
    if pid is None:
        # The server `up` started, or the one PREFECT_API_URL already names.
        env = {k: os.environ.get(k, v) for k, v in prefect_server.client_env().items()}
        pid = services.start_workers(env=env)
        what = "started"
    else:
        what = "already running"
    print(f"stream workers: {what} (pid {pid}; log {services.log_path(services.WORKERS)}; "
          "`make status` lists them)")  # fmt: skip


def down() -> None:
    # The stream workers first, while Kafka is there for their last commits.
    if services.stop_workers():
        clean = "every worker stopped cleanly" in services.log_tail(services.WORKERS, 3)
        print(f"{services.WORKERS}: {'stopped cleanly' if clean else 'stopped, NOT cleanly'} "
              f"(log {services.log_path(services.WORKERS)})")  # fmt: skip
    # Served flows (left by `make demo DEMO_ARGS=--keep`), then the stack.
    for name in services.running_services():
        if name not in {kafka_broker.NAME, prefect_server.NAME} and services.stop(name, 20):
            print(f"{name}: stopped")
    for name, stop in (("prefect", prefect_server.stop), ("kafka", kafka_broker.stop)):
        print(f"{name}: {'stopped' if stop() else 'was not running (from here)'}")


def status() -> int:
    kafka_ok = kafka_broker.is_answering()
    prefect_ok = prefect_server.healthy()
    print(f"kafka:   {'up' if kafka_ok else 'down'} ({get_settings().kafka_bootstrap_servers})")
    print(f"prefect: {'up' if prefect_ok else 'down'} ({prefect_server.API_URL})")
    print(worker_status.report(get_settings(), kafka_up=kafka_ok))
    return 0 if kafka_ok and prefect_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description=__doc__)
    parser.add_argument(
        "command", choices=["up", "down", "status", "kafka-fetch", "topics", "demo"]
    )
    parser.add_argument(
        "--keep", action="store_true", help="demo: leave the system running for the UI"
    )
    parser.add_argument(
        "--workers", action="store_true",
        help="up: also run every stream worker (`python -m stream_workers all`) in the background",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-port", type=int, default=None, metavar="P",
        help="demo: the workers' metrics ports start here (default: STREAM_METRICS_PORT, else "
        f"{DEMO_METRICS_PORT}; 0: no metrics)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(workers=args.workers)
        elif args.command == "down":
            down()
        elif args.command == "status":
            return status()
        elif args.command == "kafka-fetch":
            print(f"kafka jars in {kafka_broker.fetch()}")
        elif args.command == "topics":
            print(f"created: {ensure_topics(project_topics()) or 'nothing (all exist)'}")
        elif args.command == "demo":
            from infra.demo import run_demo

            port = args.metrics_port
            if port is None:
                port = get_settings().stream_metrics_port or DEMO_METRICS_PORT
            return run_demo(keep=args.keep, metrics_port=port or None)
    except (services.ServiceError, BrokerUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
