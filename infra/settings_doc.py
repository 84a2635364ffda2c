"""docs/settings.md, generated from `tasks/settings.py:Settings`.

    .venv/bin/python -m infra.settings_doc            # print it
    .venv/bin/python -m infra.settings_doc --write    # rewrite docs/settings.md
    .venv/bin/python -m infra.settings_doc --check    # exit 1 if docs/settings.md is stale

Each row is a field: its environment variable, type, default, bounds and meaning. The
meaning is the field's `description` (else the fallback below), then the comments next to it
in the source (above it and on its line); the section is the `# --- name ---` comment the
field sits under. tests/unit/test_docs.py fails when the file and the class drift apart.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from tasks.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "settings.md"
COMMAND = ".venv/bin/python -m infra.settings_doc --write"

# What a field means where tasks/settings.py gives no `description` (its comments there, often
# a why, are added after it). A description there wins; a key that is no longer a field fails
# tests/unit/test_docs.py.
FALLBACK: dict[str, str] = {
    "kafka_bootstrap_servers": "comma-separated `host:port` brokers of the cluster",
    "kafka_security_protocol": "how clients connect to the brokers",
    "kafka_sasl_mechanism": "SASL mechanism; needs `SASL_PLAINTEXT` or `SASL_SSL`",
    "kafka_sasl_username": "SASL user (PLAIN, SCRAM-*)",
    "kafka_sasl_password": "SASL password: a secret, never logged or printed",
    "kafka_ssl_cafile": "PEM CA bundle that signs the brokers' certificates (checked at start)",
    "kafka_client_id": "client id the brokers see",
    "kafka_default_partitions": "partitions of the topics the project creates",
    "kafka_replication_factor": "replication factor of the topics the project creates",
    "dlq_suffix": "dead letters of `<topic>` go to `<topic><suffix>`",
    "trades_topic": "trades in (key `product_id`)",
    "price_alerts_topic": "alert subscriptions, compacted (key `alert_id`; null: fired or deleted)",
    "notifications_topic": "fired price alerts (key `user_id`)",
    "transactions_topic": "transactions in (key: the user)",
    "transaction_alerts_topic": "deposit / withdrawal alerts (key: the user)",
    "transaction_totals_changelog_topic": "per-user running totals, compacted (key: the user)",
    "jobs_topic_prefix": "job topics are `<prefix>.<processor>.<realtime|normal|slow>`",
    "job_results_topic_prefix": "job results are on `<prefix>.<processor>`",
    "warehouse_path": "the DuckDB file",
    "warehouse_concurrency_limit": "Prefect global concurrency limit (1 slot) serialising writers",
    "loader_batch_size": "records per DuckDB transaction of the exactly-once loader",
    "price_window_minutes": "length of the price average's window",
    "deposit_alert_threshold": "a user's total above this: a `deposit` alert",
    "withdrawal_alert_threshold": "a user's total below this: a `withdrawal` alert",
    "stream_events_buffer": "events waiting to be sent, at most; when full, the oldest is "
    "dropped and counted (`stream_worker_events_dropped_total`)",
    "stream_heartbeat_interval_s": "how often each worker sends a heartbeat event",
    "log_format": "`json`: one JSON object per log line (for log shippers)",
    "price_alerts_txn_timeout_ms": "worker: Kafka transaction timeout",
    "price_alerts_session_timeout_ms": "worker: consumer session timeout (a dead worker's "
    "partitions move after this)",
    "transaction_alerts_session_timeout_ms": "worker: consumer session timeout",
    "transaction_alerts_txn_timeout_ms": "worker: Kafka transaction timeout",
    "word_count_dask_workers": "temporary local Dask cluster: number of workers",
    "jobs_timeout_realtime_s": "submitter: how long a REALTIME job waits for its result",
    "jobs_timeout_normal_s": "submitter: how long a NORMAL batch waits for its results",
    "jobs_timeout_slow_s": "submitter: how long a SLOW batch waits for its results",
    "jobs_session_timeout_ms": "processor: consumer session timeout",
    "jobs_txn_timeout_ms": "processor: Kafka transaction timeout",
    "payments_upstream_path": "the simulated payments upstream's SQLite ledger",
    "payments_upstream_burst": "token bucket burst",
}

_SECTION = re.compile(r"#\s*-{3,}\s*(?P<name>.+?)\s*-{3,}\s*$")
_PRAGMA = re.compile(r"#\s*(fmt:|noqa|type:)")


def _comments(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """Full-line comments and trailing comments of a source file, by line number."""
    full: dict[int, str] = {}
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type != tokenize.COMMENT or _PRAGMA.match(tok.string):
            continue
        row, col = tok.start
        (trailing if tok.line[:col].strip() else full)[row] = tok.string
    return full, trailing


def source_notes(cls: type = Settings) -> tuple[dict[str, str], dict[str, str]]:
    """Per field of `cls`: the comments next to it in its source, and its section's name."""
    path = Path(inspect.getsourcefile(cls) or "")
    tree = ast.parse(path.read_text())
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    full, trailing = _comments(path)
    sections = sorted((row, m["name"]) for row, text in full.items() if (m := _SECTION.match(text)))
    notes: dict[str, str] = {}
    section_of: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        above = []
        row = node.lineno - 1
        while row in full and not _SECTION.match(full[row]):
            above.insert(0, full[row])
            row -= 1
        same_line = [trailing[r] for r in range(node.lineno, (node.end_lineno or 0) + 1)
                     if r in trailing]  # fmt: skip
        text = " ".join(c.lstrip("#").strip() for c in [*above, *same_line])
        if text:
            notes[name] = text
        before = [title for at, title in sections if at < node.lineno]
        section_of[name] = before[-1] if before else ""
    return notes, section_of


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in inner)
        return f"{name}, optional" if len(inner) < len(args) else name
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    names = {SecretStr: "secret", Path: "path", Decimal: "decimal", bool: "true / false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _bounds(field: FieldInfo) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge | annotated_types.Gt | annotated_types.Le |
                      annotated_types.Lt):  # fmt: skip
            for key, symbol in symbols.items():
                if hasattr(item, key):
                    parts.append(f"{symbol} {getattr(item, key)}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def meaning(name: str, field: FieldInfo, notes: dict[str, str]) -> str:
    """The field's description (else the fallback), then its comments in the source."""
    parts = [p for p in (field.description or FALLBACK.get(name), notes.get(name)) if p]
    return " ".join(p[:1].upper() + p[1:] + ("" if p.endswith(".") else ".") for p in parts)


def render(cls: type[Settings] = Settings) -> str:
    """The whole of docs/settings.md."""
    notes, section_of = source_notes(cls)
    out = [
        "# Settings",
        "",
        f"<!-- Generated from tasks/settings.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        "Every setting is a field of `tasks/settings.py:Settings`, read once per process from the",
        "environment (the field name in upper case) or from a `.env` file in the working",
        "directory; the environment wins. A bad value stops a command with one line naming the",
        "variable. `PREFECT_API_URL` and the other `PREFECT_*` variables are Prefect's own.",
        "This file is generated; `tests/unit/test_docs.py` fails when it is out of date.",
    ]
    current = None
    for name, field in cls.model_fields.items():
        section = section_of.get(name, "")
        if section != current:
            current = section
            title = section[:1].upper() + section[1:] if section else "Other"
            out += ["", f"## {title}", "", "| variable | type | default | bounds | meaning |",
                    "| --- | --- | --- | --- | --- |"]  # fmt: skip
        row = [f"`{name.upper()}`", _type_name(field.annotation), _default(field),
               _bounds(field), meaning(name, field, notes)]  # fmt: skip
        out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.settings_doc", description=__doc__.split("\n\n")[0]
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(ROOT)}")
    action.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    elif args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
