"""`python -m flows`: serve every deployment declared in prefect.yaml from this process.

prefect.yaml is the one declaration of deployments: `prefect deploy --all` reads it for a
work pool, and this module reads it to serve the same flows, schedules and parameters
without one.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.schedules import Cron

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def declared_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["deployments"]


def load_flow(entrypoint: str) -> Flow:
    """`flows/word_count.py:word_count` -> the flow object."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def runner_deployments(path: Path = PREFECT_YAML):
    deployments = []
    for spec in declared_deployments(path):
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in spec.get("schedules", [])
        ]
        deployments.append(
            load_flow(spec["entrypoint"]).to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=schedules,
            )
        )
    return deployments


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
    args = parser.parse_args()
    serve(*runner_deployments(), limit=args.limit)


if __name__ == "__main__":
    main()
