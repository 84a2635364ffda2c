"""A user drives the system from the Prefect UI, in headless Chromium: every deployment of
prefect.yaml runs to Completed with its default parameters from Run → Quick run, and the
Event Feed shows the heartbeats of a price-alerts stream worker.

All real: a Prefect server with its UI on a free port (started as `make up` starts it),
`python -m flows` serving the deployments, a `python -m stream_workers price-alerts` worker,
the Kafka broker and a DuckDB file. Screenshots of every step are kept in
var/ui-screenshots/ (a Playwright trace too when the test fails).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.__main__ import declared_deployments
from tests.conftest import subprocess_env
from tests.helpers import eventually, status_report
from tests.ui_support import (
    REPO,
    Background,
    PrefectServer,
    Screenshots,
    deployment_names,
    flow_run_report,
    heartbeats,
    read_flow_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(1500)]

# Debian's package (`make browser` installs it); Playwright cannot download its own here.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
UI_TIMEOUT_MS = 120_000  # one page or control, on a loaded 2-core machine
RUN_TIMEOUT_S = 420  # one flow run, from Quick run to a final state
FINAL_STATE = re.compile(r"^\s*(Completed|Failed|Crashed|Cancelled)\s*$")
FLOW_RUN_URL = re.compile(r"/runs/flow-run/([0-9a-f-]{36})")
CREATE_ATTEMPTS = 3  # Run → Quick run, when the server answers 503 (see quick_run)
REFUSAL_CHECK_MS = 3_000  # how often a wait for the UI looks at the server's answers


@dataclass
class System:
    """What the test started, and how to read it when something fails."""

    server: PrefectServer
    serve: Background
    worker: Background
    worker_instance: str
    status_dir: Path

    @property
    def worker_resource(self) -> str:
        return f"stream-worker.price-alerts.{self.worker_instance}"

    def report(self) -> str:
        processes = [p for p in (self.server.process, self.serve, self.worker) if p is not None]
        return "\n".join([*(p.tail() for p in processes), status_report(self.status_dir)])


def build_corpus(workdir: Path, log: Path) -> None:
    """The word-count deployment's default corpus, `data/corpus/shakespeare.txt` under
    `workdir`, built as the demo builds it (the download cached in the repository's .cache)."""
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "sources", "shakespeare",
             "--cache", str(REPO / ".cache" / "shakespeare")],
            cwd=workdir, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
            timeout=900,
        )  # fmt: skip
    assert done.returncode == 0, f"building the corpus failed:\n{log.read_text()[-3000:]}"
    assert (workdir / "data" / "corpus" / "shakespeare.txt").is_file()


@pytest.fixture
def system(settings, unique: str, tmp_path: Path) -> Iterator[System]:
    """A Prefect server, every deployment served from `workdir`, a price-alerts worker."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    build_corpus(workdir, tmp_path / "corpus.log")

    home = tmp_path / "prefect-home"
    server = PrefectServer(home=home, log=tmp_path / "prefect-server.log")
    status_dir = tmp_path / "status"
    instance = f"ui-{unique}"
    serve = worker = None
    try:
        server.start(subprocess_env())
        env = subprocess_env() | {
            "PREFECT_API_URL": server.api_url,
            "PREFECT_HOME": str(home),
            "PRICE_ALERTS_GROUP": f"price-alerts-{unique}",
            "STREAM_STATUS_DIR": str(status_dir),
        }
        serve = Background.start("python -m flows", [sys.executable, "-m", "flows"],
                                 tmp_path / "serve.log", env, workdir)  # fmt: skip
        worker = Background.start(
            "price-alerts worker",
            [sys.executable, "-m", "stream_workers", "price-alerts", "--instance", instance],
            tmp_path / "worker.log",
            env | {"STREAM_HEARTBEAT_INTERVAL_S": "1", "STREAM_EVENTS_ENABLED": "true"},
            workdir,
        )
        running = System(server, serve, worker, instance, status_dir)
        wanted = {d["name"] for d in declared_deployments()}
        eventually(lambda: not serve.alive() or deployment_names(server.api_url) >= wanted,
                   180, 1, running.report)  # fmt: skip
        assert serve.alive(), running.report()
        yield running
    finally:
        for process in (worker, serve):
            if process is not None:
                process.stop()
        server.stop()


def open_deployments(page, base_url: str) -> None:
    """The UI's start page (a fresh load: no toast of an earlier run), then Deployments in
    the sidebar."""
    page.goto(base_url)
    page.get_by_role("link", name="Deployments", exact=True).first.click()


def is_create_flow_run(response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/create_flow_run")


class RunRefused(Exception):
    """The server answered the UI's create_flow_run with 503 (see quick_run)."""


def until_visible(locator, refused: list[str]) -> None:
    """`expect(locator).to_be_visible()` with the UI timeout, given up as soon as the
    server has refused to create the run (the UI then shows nothing at all)."""
    from playwright.sync_api import expect

    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while True:
        try:
            expect(locator).to_be_visible(timeout=REFUSAL_CHECK_MS)
            return
        except AssertionError:
            if refused:
                raise RunRefused(refused[-1]) from None
            if time.monotonic() >= deadline:
                raise


def submit_quick_run(page, shots: Screenshots, base_url: str, name: str, refused: list[str]) -> str:
    """Open deployment `name`, Run → Quick run (→ Run if the UI asks for parameters), follow
    the new run to its page; its id."""
    from playwright.sync_api import expect

    open_deployments(page, base_url)
    link = page.get_by_role("link", name=name, exact=True)
    expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)
    shots.take(page, f"{name}-deployments")
    link.click()
    run = page.get_by_role("button", name="Run", exact=True)
    expect(run).to_be_visible(timeout=UI_TIMEOUT_MS)
    shots.take(page, f"{name}-deployment")
    run.click()
    quick = page.get_by_role("menuitem", name="Quick run")
    expect(quick).to_be_visible(timeout=UI_TIMEOUT_MS)
    shots.take(page, f"{name}-run-menu")
    quick.click()

    # A deployment with a required parameter opens the run form (defaults filled in);
    # the others create the run at once.
    form = page.get_by_role("dialog")
    view_run = page.get_by_role("button", name="View run")
    until_visible(form.or_(view_run).first, refused)
    if form.is_visible():
        shots.take(page, f"{name}-run-form")
        form.get_by_role("button", name="Run", exact=True).click()
    until_visible(view_run, refused)
    shots.take(page, f"{name}-run-created")
    view_run.click()
    page.wait_for_url(FLOW_RUN_URL, timeout=UI_TIMEOUT_MS)
    match = FLOW_RUN_URL.search(page.url)
    assert match, page.url
    shots.take(page, f"{name}-run-page")
    return match.group(1)


def quick_run(page, shots: Screenshots, system: System, name: str) -> None:
    """Start deployment `name` from the UI and wait on the run's page for Completed.

    When the server refuses to create the run with a 503 (what Prefect's server answers
    when its SQLite database is busy; Prefect's own clients retry it, the UI shows nothing),
    the user clicks again: at most CREATE_ATTEMPTS times, each refusal a warning."""
    from playwright.sync_api import expect

    refused: list[str] = []

    def note_refusal(response) -> None:
        if is_create_flow_run(response) and response.status == 503:
            refused.append(f"{response.status} {response.status_text}")

    page.on("response", note_refusal)
    try:
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            refused.clear()  # this attempt's answers only
            try:
                flow_run_id = submit_quick_run(page, shots, system.server.url, name, refused)
                break
            except RunRefused as refusal:
                # Visible in the warnings summary of a passing run too.
                warnings.warn(f"{name}: the Prefect server refused to create the run "
                              f"({refusal}); Quick run again ({attempt}/{CREATE_ATTEMPTS})",
                              stacklevel=1)  # fmt: skip
                if attempt == CREATE_ATTEMPTS:
                    raise AssertionError(f"{name}: every Quick run refused ({refusal})") from None
    finally:
        page.remove_listener("response", note_refusal)

    def failed() -> str:
        report = flow_run_report(system.server.api_url, flow_run_id)
        return f"deployment {name}: flow run {flow_run_id} did not complete\n{report}"

    final = eventually(
        lambda: (state := read_flow_run(system.server.api_url, flow_run_id).state)
        and state.is_final(),
        RUN_TIMEOUT_S, 1, failed,
    )  # fmt: skip
    assert final and read_flow_run(system.server.api_url, flow_run_id).state.is_completed(), (
        failed()
    )
    # What the user sees: the run page's state badge turns Completed.
    state = page.locator("main [data-slot='badge']").filter(has_text=FINAL_STATE)
    expect(state).to_have_text("Completed", timeout=UI_TIMEOUT_MS)
    shots.take(page, f"{name}-completed")


def heartbeat_in_feed(page, shots: Screenshots, system: System) -> None:
    """Event Feed → event type stream_worker.heartbeat → our worker's heartbeat → its
    raw event."""
    from playwright.sync_api import expect

    # The feed shows events up to the minute it was opened in: wait (API) until a heartbeat
    # is older than the current minute, so that opening the feed now must show it.
    def beat_before_this_minute() -> list:
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        return heartbeats(system.server.api_url, system.worker_resource, until=minute)

    def no_heartbeat() -> str:
        return f"no stream_worker.heartbeat of {system.worker_resource} in the API\n" + (
            system.report()
        )

    eventually(beat_before_this_minute, 180, 1, no_heartbeat)

    page.goto(system.server.url)
    page.get_by_role("link", name="Event Feed", exact=True).click()
    event_type = page.get_by_role("button", name="Filter by event type")
    expect(event_type).to_be_visible(timeout=UI_TIMEOUT_MS)
    shots.take(page, "event-feed")
    event_type.click()
    option = page.get_by_role("option", name="stream_worker.heartbeat", exact=True)
    expect(option).to_be_visible(timeout=UI_TIMEOUT_MS)
    option.click()
    page.keyboard.press("Escape")
    expect(event_type).to_have_text("stream_worker.heartbeat", timeout=UI_TIMEOUT_MS)
    title = page.get_by_role("link", name="Stream Worker Heartbeat")
    beat = (
        page.get_by_role("listitem")
        .filter(has_text=f"price-alerts.{system.worker_instance}")
        .filter(has=title)
        .first
    )
    expect(beat).to_be_visible(timeout=UI_TIMEOUT_MS)
    shots.take(page, "event-feed-heartbeats")
    beat.get_by_role("link", name="Stream Worker Heartbeat").click()
    raw = page.get_by_role("tab", name="Raw")
    expect(raw).to_be_visible(timeout=UI_TIMEOUT_MS)
    raw.click()
    expect(page.get_by_role("tabpanel")).to_contain_text(
        system.worker_resource, timeout=UI_TIMEOUT_MS
    )
    shots.take(page, "heartbeat-event")


@pytest.fixture
def chromium() -> str:
    """The browser binary, checked before anything is started."""
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: `make browser` installs it"
    return CHROMIUM


def test_a_user_runs_every_deployment_and_sees_worker_heartbeats_in_the_ui(
    chromium: str, system: System
):
    from playwright.sync_api import sync_playwright

    names = [d["name"] for d in declared_deployments()]
    assert names, "prefect.yaml declares no deployment"
    shots = Screenshots()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        # Only the server under test: the UI's analytics calls go nowhere.
        context.route(lambda url: not url.startswith(f"{system.server.url}/"),
                      lambda route: route.abort())  # fmt: skip
        context.tracing.start(screenshots=True, snapshots=True)
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        failed = True
        try:
            for name in names:
                quick_run(page, shots, system, name)
            heartbeat_in_feed(page, shots, system)
            failed = False
        finally:
            if failed:
                try:
                    shots.take(page, "failure")
                finally:
                    context.tracing.stop(path=shots.folder / "trace.zip")
                print(f"screenshots and a Playwright trace (`playwright show-trace`) in "
                      f"{shots.folder}\n{system.report()}")  # fmt: skip
            else:
                context.tracing.stop()
            browser.close()
