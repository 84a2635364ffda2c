"""The deployments of prefect.yaml, as `python -m flows` serves them, and their triggers.

prefect.yaml is the one declaration of deployments: `prefect deploy --all` reads it for a
work pool, and this module reads it to serve the same flows, schedules, parameters and
triggers without one.

One trigger value comes from the settings instead of the file: the `within` of a Proactive
trigger on `stream_worker.heartbeat` is STREAM_HEARTBEAT_TIMEOUT_S. prefect.yaml holds the
setting's default; its `{{ $VAR }}` templating cannot carry the setting, because it yields a
string and Prefect refuses a string `within` on a Proactive trigger (and it would not read
`.env`). So `runner_deployments` applies the setting when serving, and
`sync_deployment_triggers` re-creates the triggers of deployments `prefect deploy` made.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from prefect import Flow
from prefect.events import DeploymentTriggerTypes
from prefect.schedules import Cron
from pydantic import TypeAdapter

from stream_workers.events import HEARTBEAT
from tasks.settings import Settings, get_settings

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.deployments.runner import RunnerDeployment

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"

_TRIGGERS: TypeAdapter[DeploymentTriggerTypes] = TypeAdapter(DeploymentTriggerTypes)


def declared_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml, as written."""
    return yaml.safe_load(path.read_text())["deployments"]


def load_flow(entrypoint: str) -> Flow:
    """`flows/word_count.py:word_count` -> the flow object."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def is_heartbeat_timeout(spec: dict[str, Any]) -> bool:
    """A trigger that fires when stream worker heartbeats stop (its `within` is the setting)."""
    return spec.get("posture") == "Proactive" and HEARTBEAT in (spec.get("expect") or [])


def deployment_triggers(
    spec: dict[str, Any], settings: Settings | None = None
) -> list[DeploymentTriggerTypes]:
    """The `triggers:` of one declared deployment, named as `prefect deploy` names them,
    with STREAM_HEARTBEAT_TIMEOUT_S applied to the heartbeat timeout."""
    settings = settings or get_settings()
    triggers = []
    for i, trigger in enumerate(spec.get("triggers") or [], start=1):
        trigger = {"name": f"{spec['name']}__automation_{i}", **trigger}
        if is_heartbeat_timeout(trigger):
            trigger["within"] = settings.stream_heartbeat_timeout_s
        triggers.append(_TRIGGERS.validate_python(trigger))
    return triggers


def runner_deployments(
    path: Path = PREFECT_YAML, settings: Settings | None = None
) -> list[RunnerDeployment]:
    """Every deployment of prefect.yaml as a deployment this process can serve."""
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
                triggers=deployment_triggers(spec, settings),
            )
        )
    return deployments


def sync_deployment_triggers(
    client: SyncPrefectClient, path: Path = PREFECT_YAML, settings: Settings | None = None
) -> list[str]:
    """Re-create the triggers of the declared deployments that exist on the server (as
    `prefect deploy` does: its deployment's own automations are replaced), with the
    settings applied; returns one line per deployment saying what was done."""
    from prefect.exceptions import ObjectNotFound

    done = []
    for spec in declared_deployments(path):
        if not spec.get("triggers"):
            continue
        full_name = f"{load_flow(spec['entrypoint']).name}/{spec['name']}"
        try:
            deployment = client.read_deployment_by_name(full_name)
        except ObjectNotFound:
            done.append(f"deployment {full_name}: not deployed, its triggers skipped")
            continue
        client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
        names = []
        for trigger in deployment_triggers(spec, settings):
            trigger.set_deployment_id(deployment.id)
            automation = trigger.as_automation()
            client.create_automation(automation)
            names.append(automation.name)
        done.append(f"deployment {full_name}: triggers {names} re-created")
    return done
