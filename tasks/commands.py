"""What `python -m stream_workers` and `python -m sources` share: the sub-command dispatch,
the logging setup (text, or JSON lines with LOG_FORMAT=json) and the option parser of a
worker daemon."""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
import pkgutil
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TextIO

from pydantic import SecretStr, ValidationError

from tasks.kafka import BrokerUnavailableError, KafkaConfigError
from tasks.settings import Settings

# Exit statuses: 1 the Kafka cluster did not answer; 2 a usage or settings error (retrying
# with the same command line and environment cannot help).
UNAVAILABLE, BAD_SETTINGS = 1, 2


class UsageError(Exception):
    """A command line that cannot work, found after parsing (e.g. a port in use): `dispatch`
    ends the command with one error line and status 2."""


# --- logging ------------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_FORMAT_PROCESS = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

_log_context: dict[str, str] = {}


def log_context(**fields: str) -> None:
    """Fields every JSON log line of this process carries from now on (worker, instance)."""
    _log_context.update(fields)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _log_context.items():
            if name not in record.__dict__:
                setattr(record, name, value)
        return True


def log_handler(
    log_format: str = "text", *, process_name: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """A handler writing readable lines, or with "json" one JSON object per line: timestamp
    (UTC, ISO 8601), level, logger, message, the `log_context` fields (worker, instance)
    and, when there is one, the exception with its traceback."""
    handler = logging.StreamHandler(stream)
    if log_format != "json":
        text = TEXT_FORMAT_PROCESS if process_name else TEXT_FORMAT
        handler.setFormatter(logging.Formatter(text))
        return handler
    from pythonjsonlogger.json import JsonFormatter

    fields = "%(levelname)s %(name)s %(message)s" + (" %(processName)s" if process_name else "")
    renames = {"levelname": "level", "name": "logger", "exc_info": "exception",
               "processName": "process"}  # fmt: skip
    handler.setFormatter(JsonFormatter(fields, rename_fields=renames, timestamp=True))
    handler.addFilter(_Context())
    return handler


def setup_logging(log_format: str | None = None, *, process_name: bool = False) -> None:
    """INFO and up to stderr as `log_handler` formats it, by default as LOG_FORMAT says
    (text while the settings are invalid: the command then says why, in one line);
    kafka-python's own INFO (a line per connection) left out."""
    if log_format is None:
        from tasks.settings import get_settings

        try:
            log_format = get_settings().log_format
        except ValidationError:
            log_format = "text"
    logging.basicConfig(
        level=logging.INFO, handlers=[log_handler(log_format, process_name=process_name)],
        force=True,
    )  # fmt: skip
    logging.getLogger("kafka").setLevel(logging.WARNING)


# --- a worker daemon's options ------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default shown; the description and the epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # "(default: None)" or "(default: False)" would say nothing the help does not.
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# Settings every worker reads (besides its own): its Kafka connection and its telemetry.
COMMON_SETTINGS = ("stream_metrics_port", "stream_status_dir", "stream_events_enabled",
                   "stream_events_buffer", "stream_heartbeat_interval_s", "log_format")  # fmt: skip


def env_name(field: str) -> str:
    """The environment variable of a Settings field."""
    if field not in Settings.model_fields:
        raise ValueError(f"no setting {field!r}")
    return field.upper()


def topic_text(settings: Settings, field: str, *, dlq: bool = False) -> str:
    """A topic as now configured, with the setting that names it (`trades (TRADES_TOPIC)`)."""
    topic = getattr(settings, field)
    if dlq:
        return f"{settings.dlq_topic(topic)} ({env_name(field)} + DLQ_SUFFIX)"
    return f"{topic} ({env_name(field)})"


def worker_parser(
    command: str,
    description: str,
    settings: Settings,
    *,
    reads: Iterable[str],
    writes: Iterable[str],
    own_settings: Iterable[str],
    instance_help: str,
    instance_default: str | None = None,
) -> argparse.ArgumentParser:
    """The parser of `python -m stream_workers <command>`: defaults shown, the common options
    (`--instance`, `--metrics-port`, `--metrics-host`), and an epilog naming the topics it
    reads and writes (`topic_text`) and the settings (environment variables) it follows;
    `own_settings` (Settings field names) are shown with their current values."""

    def wrapped(label: str, items: list[str]) -> list[str]:
        lines, line = [], f"  {label}"
        for n, item in enumerate(items):
            piece = item + ("," if n < len(items) - 1 else "")
            if len(line) + 1 + len(piece) > 88 and line.strip() != label:
                lines.append(line)
                line = " " * (len(label) + 2)
            line += " " + piece
        return [*lines, line]

    own = [f"{env_name(f)}={getattr(settings, f)}" for f in own_settings]
    common = ["KAFKA_BOOTSTRAP_SERVERS and the other KAFKA_* connection settings",
              *map(env_name, COMMON_SETTINGS), "PREFECT_API_URL (events)"]  # fmt: skip
    epilog = "\n".join([
        "topics (as now configured):",
        *wrapped("reads: ", list(reads)),
        *wrapped("writes:", list(writes)),
        "",
        "settings (environment variables or .env; its own with their current values):",
        *wrapped("own:   ", own),
        *wrapped("common:", common),
    ])  # fmt: skip
    parser = argparse.ArgumentParser(
        prog=f"python -m stream_workers {command}",
        description=" ".join(description.split()),
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--instance", default=instance_default, help=instance_help)
    parser.add_argument(
        "--metrics-port", type=int, default=settings.stream_metrics_port, metavar="PORT",
        help="serve Prometheus metrics on this port (default: %(default)s, from "
        "STREAM_METRICS_PORT; None: no endpoint)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST",
        help="the address the metrics endpoint listens on",
    )  # fmt: skip
    return parser


# --- dispatch -----------------------------------------------------------------------------


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
    log_context(**{what: argv[0]})
    try:
        return module.main(argv[1:])
    except UsageError as error:
        log.error("stopping: %s", error)
        return BAD_SETTINGS
    except ValidationError as error:
        if error.title != Settings.__name__:
            raise
        log.error("stopping: %s", settings_error(error))
        return BAD_SETTINGS
    except BrokerUnavailableError as error:
        log.error("stopping: %s", " ".join(str(error).split()))
        return BAD_SETTINGS if isinstance(error, KafkaConfigError) else UNAVAILABLE
