"""The automations of automations.yaml, created or updated by name.

automations.yaml declares the automations that are not a deployment's trigger (those live
in prefect.yaml): each entry is Prefect's own automation model (`name`, `description`,
`trigger`, `actions`). `python -m flows` applies them when it starts and `python -m flows
automations` on demand; an automation of the same name is updated in place (its id and UI
link stay), extra copies of it (e.g. from repeated `prefect automation create --from-file
automations.yaml`) are deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from prefect.events.schemas.automations import AutomationCore

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

AUTOMATIONS_YAML = Path(__file__).resolve().parent.parent / "automations.yaml"


def declared_automations(path: Path = AUTOMATIONS_YAML) -> list[AutomationCore]:
    """The `automations:` of the file, validated by Prefect's model."""
    entries = yaml.safe_load(path.read_text())["automations"]
    automations = [AutomationCore.model_validate(entry) for entry in entries]
    names = [a.name for a in automations]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: automation names must be unique (they are the key): {names}")
    return automations


def apply_automations(
    client: SyncPrefectClient, automations: list[AutomationCore] | None = None
) -> list[str]:
    """Create or update each automation by name; returns one line per automation."""
    done = []
    for automation in declared_automations() if automations is None else automations:
        existing = client.read_automations_by_name(automation.name)  # latest update first
        if not existing:
            client.create_automation(automation)
            done.append(f"automation {automation.name!r}: created")
            continue
        keep, *copies = existing
        client.update_automation(keep.id, automation)
        for copy in copies:
            client.delete_automation(copy.id)
        extra = f" ({len(copies)} extra copies deleted)" if copies else ""
        done.append(f"automation {automation.name!r}: updated{extra}")
    return done
