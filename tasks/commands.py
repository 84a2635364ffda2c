"""Sub-command dispatch shared by `python -m stream_workers` and `python -m sources`."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
import typing
from types import ModuleType

from pydantic import SecretStr, ValidationError

from tasks.kafka import BrokerUnavailableError, KafkaConfigError
from tasks.settings import Settings

# Exit statuses: 1 the Kafka cluster did not answer; 2 a usage or settings error (retrying
# with the same command line and environment cannot help).
UNAVAILABLE, BAD_SETTINGS = 1, 2


def available(package: ModuleType) -> list[str]:
    """The package's command names: its public modules, dashes for underscores."""
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_")
    )


def settings_error(error: ValidationError) -> str:
    """One line naming each bad setting as its environment variable (never a secret's
    value)."""
    parts = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a rule across settings names them itself
            parts.append(message)
            continue
        name = str(problem["loc"][0])
        field = Settings.model_fields.get(name)
        annotation = field.annotation if field is not None else None
        secret = annotation is SecretStr or SecretStr in typing.get_args(annotation)
        given = problem.get("input")
        # The value given, unless it is a secret or the message already says it.
        omit = secret or given is None or str(given) in message
        parts.append(f"{name.upper()}: {message}" + ("" if omit else f" (got {given!r})"))
    return "invalid settings: " + "; ".join(parts).replace("\n", " ")


def dispatch(package: ModuleType, argv: list[str], what: str) -> int:
    """Run `<package>.<argv[0]>.main(argv[1:])`, or print the usage with the known names.

    Bad settings and an unreachable or refusing Kafka cluster end the command with one
    error line (no traceback) and a non-zero status.
    """
    names = available(package)
    if not argv or argv[0] not in names:
        prog = package.__name__
        print(
            f"usage: python -m {prog} <{what}> [options]\n{what}s: {', '.join(names) or '(none yet)'}",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"{package.__name__}.{argv[0].replace('-', '_')}")
    log = logging.getLogger(argv[0])
    try:
        return module.main(argv[1:])
    except ValidationError as error:
        if error.title != Settings.__name__:
            raise
        log.error("stopping: %s", settings_error(error))
        return BAD_SETTINGS
    except BrokerUnavailableError as error:
        log.error("stopping: %s", " ".join(str(error).split()))
        return BAD_SETTINGS if isinstance(error, KafkaConfigError) else UNAVAILABLE
