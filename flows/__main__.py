"""`python -m flows`: serve every deployment of prefect.yaml from this process, or apply the
automations."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flows.automations import apply_automations, declared_automations
from flows.deployments import (
    PREFECT_YAML,
    declared_deployments,
    load_flow,
    runner_deployments,
    sync_deployment_triggers,
)

__all__ = ["PREFECT_YAML", "declared_deployments", "load_flow", "main", "runner_deployments"]

DESCRIPTION = """\
Serve every deployment of prefect.yaml from this process (no work pool needed): their cron
schedules, runs started from the UI or `prefect deployment run`, and their triggers. It first
creates or updates the automations of automations.yaml by name. Talks to PREFECT_API_URL.

The work-pool path instead: `prefect work-pool create local-process --type process`,
`prefect deploy --all`, `python -m flows automations`, `prefect worker start --pool
local-process`."""

SERVE_HELP = "serve the deployments (the default when no command is given)"
AUTOMATIONS_HELP = "apply automations.yaml and the triggers of prefect.yaml (work-pool path)"
AUTOMATIONS_DESCRIPTION = """\
Create or update the automations of automations.yaml by name, and re-create the triggers of
the prefect.yaml deployments that exist on the server, with STREAM_HEARTBEAT_TIMEOUT_S as the
heartbeat timeout. Run it after `prefect deploy --all`, and again after changing either file
or the setting (`python -m flows` does all this itself when it starts). Talks to
PREFECT_API_URL."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (an option without one says what happens), the description and epilog
    as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def deployments_epilog() -> str:
    """What `python -m flows` serves, read from prefect.yaml."""
    lines = ["deployments served (prefect.yaml):"]
    for spec in declared_deployments():
        when = [f"cron {s['cron']} {s.get('timezone', 'UTC')}" for s in spec.get("schedules", [])]
        when += [f"trigger: {t.get('name', 'unnamed')}" for t in spec.get("triggers") or []]
        lines.append(f"  {spec['name']:<19} {spec['entrypoint']}")
        lines.append(f"  {'':<19} {'; '.join(when) or 'no schedule'}")
    lines.append("automations (automations.yaml):")
    lines += [f"  {a.name}" for a in declared_automations()]
    return "\n".join(lines)


def _serve_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--limit",
        type=int,
        default=default,
        metavar="N",
        help="most flow runs at once in this process (default: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows",
        description=DESCRIPTION,
        epilog=deployments_epilog(),
        formatter_class=_HelpFormatter,
    )
    _serve_options(parser, None)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve",
        help=SERVE_HELP,
        description=f"{SERVE_HELP}.",
        epilog=deployments_epilog(),
        formatter_class=_HelpFormatter,
    )
    # Not given after `serve`: the value given before it (`python -m flows --limit 2 serve`).
    _serve_options(serve_parser, argparse.SUPPRESS)
    commands.add_parser(
        "automations",
        help=AUTOMATIONS_HELP,
        description=AUTOMATIONS_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    return parser


def _print_done(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)


def serve(limit: int | None = None) -> None:
    """Apply automations.yaml, then serve every deployment of prefect.yaml until stopped."""
    from prefect import serve as prefect_serve
    from prefect.client.orchestration import get_client

    deployments = runner_deployments()  # import errors show before anything is changed
    with get_client(sync_client=True) as client:
        _print_done(apply_automations(client))
    prefect_serve(*deployments, limit=limit)


def automations() -> None:
    """Apply automations.yaml and the deployment triggers of prefect.yaml."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        _print_done(apply_automations(client))
        _print_done(sync_deployment_triggers(client))


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    if args.command == "automations":
        automations()
    else:
        serve(limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
