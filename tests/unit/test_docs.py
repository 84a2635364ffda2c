"""The README and docs/ stay true to the code: settings, contracts, links, the diagram."""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from flows.__main__ import declared_deployments, load_flow
from flows.automations import declared_automations
from infra.settings_doc import COMMAND, DOC, FALLBACK, render
from tasks.commands import available
from tasks.kafka import job_topics, project_topics
from tasks.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONTRACTS = DOCS / "contracts.md"
OPERATIONS = DOCS / "operations.md"
README_MAX_BYTES = 12_000  # a guide, not a manual: the detail lives in docs/
SETTING = re.compile(
    r"\b(?:KAFKA|DLQ|TRADES|PRICE|NOTIFICATIONS|TRANSACTIONS?|JOBS?|WAREHOUSE|LOADER|DEPOSIT"
    r"|WITHDRAWAL|STREAM|LOG|WORD_COUNT|PAYMENTS)_[A-Z0-9_]*[A-Z0-9]\b"
)


def defaults() -> Settings:
    """The settings as documented: defaults only, no environment, no .env."""
    return Settings.model_construct()


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", path.read_text(), flags=re.MULTILINE)
    return {slug(h) for h in headings}


# --- docs/settings.md -----------------------------------------------------------------------


def test_settings_doc_is_generated_from_the_current_settings():
    expected = render()
    actual = DOC.read_text() if DOC.is_file() else ""
    lines = difflib.unified_diff(
        actual.splitlines(), expected.splitlines(), "docs/settings.md", "generated", lineterm=""
    )
    diff = "\n".join(list(lines)[:40])
    assert actual == expected, f"docs/settings.md is out of date; run {COMMAND}\n{diff}"


def test_every_setting_has_one_row_with_its_default_and_a_meaning():
    text = render()
    for name, field in Settings.model_fields.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name.upper()}` |")]
        assert len(rows) == 1, f"{name.upper()}: {len(rows)} rows"
        cells = [c.strip() for c in rows[0].strip("|").split(" | ")]
        default = field.get_default(call_default_factory=True)
        if default is None:
            assert cells[2] == "unset", rows[0]
        else:
            shown = cells[2].strip("`")
            assert shown in {str(default), str(default).lower(), f"{default:g}"
                             if isinstance(default, float) else ""}, rows[0]  # fmt: skip
        assert cells[-1], f"{name.upper()} has no meaning: give it a description in Settings"


def test_fallback_meanings_name_real_settings():
    assert set(FALLBACK) <= set(Settings.model_fields), set(FALLBACK) - set(Settings.model_fields)


# --- README and docs/ ---------------------------------------------------------------------


def test_settings_named_in_readme_and_docs_exist():
    fields = {name.upper() for name in Settings.model_fields}
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in markdown_files()
        if path != DOC
        for name in SETTING.findall(path.read_text())
        if name not in fields
    }
    assert not unknown, f"not a field of tasks/settings.py:Settings: {sorted(unknown)}"


def test_readme_has_the_sections_automations_link_to():
    headings = re.findall(r"^### (.+)$", README.read_text(), flags=re.MULTILINE)
    for heading in ("Dead letters", "transaction-totals failed"):
        assert headings.count(heading) == 1, f"README needs exactly one '### {heading}'"
    assert {"dead-letters", "transaction-totals-failed"} <= anchors(README)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


# --- docs/contracts.md --------------------------------------------------------------------


def test_contracts_name_every_topic():
    text = CONTRACTS.read_text()
    s = defaults()
    topics = [t.name for t in project_topics(s)] + [t.name for t in job_topics("payments", s)]
    missing = [name for name in topics if f"`{name}`" not in text]
    assert not missing, f"docs/contracts.md does not name topic(s) {missing}"


def test_contracts_list_every_table_with_its_columns():
    text = CONTRACTS.read_text()
    created = re.compile(r"CREATE (?:OR REPLACE )?TABLE (?:IF NOT EXISTS )?(\w+)", re.IGNORECASE)
    missing = []
    for sql in sorted((ROOT / "sql").rglob("*.sql")):
        for table in created.findall(sql.read_text()):
            if f"`{table}`" not in text:
                missing.append(f"{table} ({sql.relative_to(ROOT)})")
    assert not missing, f"docs/contracts.md does not describe table(s) {missing}"


def _signature(fn) -> str:
    """`name(param: type = default, ...)` as docs/contracts.md writes it."""
    parts = []
    for param in inspect.signature(fn).parameters.values():
        annotation = param.annotation
        if not isinstance(annotation, str):
            annotation = inspect.formatannotation(annotation)
        part = f"{param.name}: {annotation}"
        if param.default is not param.empty:
            default = param.default
            part += " = " + (f'"{default}"' if isinstance(default, str) else repr(default))
        parts.append(part)
    return f"{fn.__name__}({', '.join(parts)})"


def test_contracts_give_every_deployment_its_flow_signature_and_schedule():
    text = CONTRACTS.read_text()
    for spec in declared_deployments():
        flow = load_flow(spec["entrypoint"])
        assert f"`{_signature(flow.fn)}`" in text, f"signature of {spec['entrypoint']}"
        assert f"`{flow.name}/{spec['name']}`" in text, f"deployment {spec['name']}"
        for schedule in spec.get("schedules", []):
            assert f"`{schedule['cron']}`" in text, f"cron of {spec['name']}"


def test_contracts_list_every_command():
    import sources
    import stream_workers

    text = CONTRACTS.read_text()
    missing = [f"python -m stream_workers {w}" for w in available(stream_workers)]
    missing += [f"python -m sources {s}" for s in available(sources)]
    infra_main = ast.parse((ROOT / "infra" / "__main__.py").read_text())
    choices = next(
        kw.value
        for node in ast.walk(infra_main)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "choices"
    )
    missing += [f"python -m infra {c}" for c in ast.literal_eval(choices)]
    missing = [command for command in missing if command not in text]
    assert not missing, f"docs/contracts.md does not list {missing}"


def phony_targets() -> list[str]:
    """The targets of every `.PHONY:` line of the Makefile."""
    lines = re.findall(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    return [target for line in lines for target in line.split()]


def test_contracts_list_every_make_target_and_flows_command():
    text = CONTRACTS.read_text()
    assert "browser" in phony_targets(), "the Makefile's .PHONY lines as read here"
    missing = [f"make {t}" for t in phony_targets() if f"`make {t}`" not in text]
    missing += [c for c in ("python -m flows [serve]", "python -m flows automations")
                if c not in text]  # fmt: skip
    assert not missing, f"docs/contracts.md does not list {missing}"


def test_readme_stays_a_guide():
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes: move detail into docs/"


def test_deployments_in_prefect_yaml_are_the_ones_documented():
    declared = {d["name"] for d in declared_deployments()}
    readme = README.read_text()
    svg = (DOCS / "architecture.svg").read_text()
    assert {name for name in declared if f"`{name}`" not in readme} == set(), "README"
    assert {name for name in declared if name not in svg} == set(), "docs/architecture.svg"


# --- metrics, events and automations (docs/operations.md, docs/contracts.md) -------------

METRIC_KINDS = {"Counter", "Gauge", "Histogram"}


def registered_metrics() -> dict[str, str]:
    """{series name as scraped: kind} of every metric stream_workers/metrics.py creates."""
    tree = ast.parse((ROOT / "stream_workers" / "metrics.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in METRIC_KINDS and node.args
                and isinstance(node.args[0], ast.Constant)):  # fmt: skip
            name = node.args[0].value
            # prometheus-client exposes a counter `x` as `x_total`.
            found[f"{name}_total" if node.func.id == "Counter" else name] = node.func.id
    return found


def emitted_events() -> set[str]:
    """The event names stream_workers/events.py emits: the constants passed to `_emit`."""
    from stream_workers import events

    tree = ast.parse(inspect.getsource(events))
    return {
        getattr(events, node.args[0].id)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "_emit" and node.args and isinstance(node.args[0], ast.Name)
    }  # fmt: skip


def test_operations_doc_names_every_metric_and_docs_name_no_other():
    metrics = registered_metrics()
    assert len(metrics) >= 8, f"metrics found in stream_workers/metrics.py: {metrics}"
    table = OPERATIONS.read_text()
    missing = [name for name in metrics if f"| `{name}" not in table]
    assert not missing, f"docs/operations.md's metrics table lacks {missing}"
    histogram_series = {f"{n}{suffix}" for n, kind in metrics.items() if kind == "Histogram"
                        for suffix in ("_bucket", "_sum", "_count")}  # fmt: skip
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in markdown_files()
        for name in re.findall(r"\bstream_worker_[a-z_]+", path.read_text())
        if name not in metrics and name not in histogram_series
    }
    assert not unknown, f"not a metric of stream_workers/metrics.py: {sorted(unknown)}"


def test_docs_name_every_event_and_no_other():
    from stream_workers.events import NEW_DEAD_LETTERS_LABEL

    names = emitted_events()
    assert len(names) >= 5, f"events found in stream_workers/events.py: {names}"
    for path in (CONTRACTS, OPERATIONS):
        missing = [name for name in sorted(names) if f"| `{name}` |" not in path.read_text()]
        assert not missing, f"{path.relative_to(ROOT)}: no table row for event(s) {missing}"
    assert f"`{NEW_DEAD_LETTERS_LABEL}`" in CONTRACTS.read_text()
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in markdown_files()
        for name in re.findall(r"\b(?:stream_worker|price_alert)\.[a-z_]+", path.read_text())
        if name not in names
    }
    assert not unknown, f"not an event of stream_workers/events.py: {sorted(unknown)}"


def test_contracts_and_operations_name_every_automation():
    names = [a.name for a in declared_automations()]
    names += [t["name"] for d in declared_deployments() for t in d.get("triggers") or []]
    assert names, "no automation declared"
    for path in (CONTRACTS, OPERATIONS):
        missing = [name for name in names if name not in path.read_text()]
        assert not missing, f"{path.relative_to(ROOT)} does not name automation(s) {missing}"


# --- the diagram and the benchmarks -------------------------------------------------------


def test_architecture_svg_is_well_formed_and_names_the_workers():
    root = ET.parse(DOCS / "architecture.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = " ".join(t.strip() for t in root.itertext())
    for name in ("price-alerts", "transaction-alerts", "jobs", "tasks/", "DuckDB", "Prefect"):
        assert name in text, name


def test_benchmarks_doc_gives_each_script_its_command():
    text = (DOCS / "benchmarks.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py")
    missing = [s for s in scripts if f".venv/bin/python bench/{s}" not in text]
    assert not missing, f"docs/benchmarks.md gives no command for {missing}"


# --- `python -m sources <source> --help` --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "module", "topic", "shown"),
    [
        (["--help"], "trades", "TRADES_TOPIC", ["(default: 200)", "(default: BTC-USD)"]),
        (["--help"], "transactions", "TRANSACTIONS_TOPIC", ["(default: 500)", "(default: 50)"]),
        (["create", "--help"], "price_alerts", "PRICE_ALERTS_TOPIC", ["--threshold"]),
    ],
)
def test_source_help_shows_defaults_the_topic_it_writes_and_its_settings(
    argv, module, topic, shown, monkeypatch, capsys
):
    monkeypatch.setenv(topic, "my-topic")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9093,kafka-2:9093")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(f"sources.{module}").main(argv)
    finally:
        get_settings.cache_clear()
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for expected in [*shown, f"my-topic ({topic})", f"{topic}=my-topic",
                     "KAFKA_BOOTSTRAP_SERVERS=kafka-1:9093,kafka-2:9093", "docs/settings.md"]:  # fmt: skip
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert "(default: None)" not in text
