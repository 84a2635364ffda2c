"""Sub-command dispatch shared by `python -m stream_workers` and `python -m sources`."""

from __future__ import annotations

import ast
import importlib
import logging
import pkgutil
import sys
import typing
from pathlib import Path
from types import ModuleType

from pydantic import SecretStr, ValidationError

from tasks.kafka import BrokerUnavailableError, KafkaConfigError
from tasks.settings import Settings

# Exit statuses: 1 the Kafka cluster did not answer; 2 a usage or settings error (retrying
# with the same command line and environment cannot help).
UNAVAILABLE, BAD_SETTINGS = 1, 2


def available(package: ModuleType) -> dict[str, str]:
    """The package's commands (its public modules with a `main`, dashes for underscores),
    each with the first sentence of its docstring. Read from the source, not imported: a
    usage line must not pay for every command's imports."""
    commands = {}
    for m in pkgutil.iter_modules(package.__path__):
        path = Path(package.__path__[0]) / f"{m.name}.py"
        if m.name.startswith("_") or not path.exists():
            continue
        tree = ast.parse(path.read_text())
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue  # a library module of the package (e.g. the stream runtime)
        doc = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
        doc = doc.split("`: ", 1)[-1]  # drop the "`python -m ... <name>`: " prefix
        commands[m.name.replace("_", "-")] = doc
    return dict(sorted(commands.items()))


def usage(package: ModuleType, what: str) -> str:
    """The package's usage: the command line and each command with its description."""
    prog = f"python -m {package.__name__}"
    commands = available(package)
    width = max(map(len, commands), default=0)
    lines = [f"usage: {prog} <{what}> [options]",
             f"       {prog} <{what}> --help   (the options of one)",
             "", f"{what}s:"]  # fmt: skip
    lines += [f"  {name.ljust(width)}  {doc}" for name, doc in commands.items()]
    return "\n".join(lines)


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
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage(package, what), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in available(package):
        print(f"unknown {what} {argv[0]!r}\n{usage(package, what)}", file=sys.stderr)
        return 2
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
