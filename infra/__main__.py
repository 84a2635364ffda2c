"""`python -m infra up|down|status|kafka-fetch|topics|demo`: the local stack."""

from __future__ import annotations

import argparse
import sys

from infra import kafka_broker, prefect_server, services
from tasks.kafka import BrokerUnavailableError, ensure_topics, project_topics
from tasks.settings import get_settings


def up() -> None:
    started = kafka_broker.ensure_running()
    print(f"kafka: {'started' if started else 'already running'} at "
          f"{get_settings().kafka_bootstrap_servers}")  # fmt: skip
    created = ensure_topics(project_topics())
    print(f"topics: {len(created)} created")
    started = prefect_server.ensure_running()
    print(f"prefect: {'started' if started else 'already running'}; UI at "
          f"http://{prefect_server.HOST}:{prefect_server.PORT}")  # fmt: skip


def down() -> None:
    # Workers and served flows (left by `make demo DEMO_ARGS=--keep`) first, then the stack.
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
    return 0 if kafka_ok and prefect_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description=__doc__)
    parser.add_argument(
        "command", choices=["up", "down", "status", "kafka-fetch", "topics", "demo"]
    )
    parser.add_argument(
        "--keep", action="store_true", help="demo: leave the system running for the UI"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
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

            return run_demo(keep=args.keep)
    except (services.ServiceError, BrokerUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
