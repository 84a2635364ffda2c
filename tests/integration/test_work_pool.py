"""The work-pool path of prefect.yaml against a real Prefect server (the session's harness):
`prefect work-pool create`, `prefect deploy --all`, `python -m flows automations`, and a
process worker running a `price-averages` deployment run to Completed."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

from flows.automations import declared_automations
from flows.deployments import declared_deployments, load_flow
from tasks.kafka import ensure_topics, project_topics
from tasks.warehouse import connect
from tests.helpers import eventually
from tests.integration.prefect_support import (
    background,
    flow_run,
    prefect_env,
    python,
    remove_automations,
    remove_deployments,
    run_logged,
    run_report,
    tail,
)

pytestmark = pytest.mark.integration

POOL = "local-process"  # prefect.yaml's work pool
DEPLOYMENTS = {f"{load_flow(d['entrypoint']).name}/{d['name']}" for d in declared_deployments()}


@pytest.fixture
def work_pool(prefect_api):
    """No deployment of prefect.yaml, no automation of ours, no work pool before and after."""
    names = [a.name for a in declared_automations()]
    remove_deployments(DEPLOYMENTS)
    remove_automations(names)
    yield POOL
    remove_deployments(DEPLOYMENTS)
    remove_automations(names)
    with get_client(sync_client=True) as client:
        if client.read_work_pools(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(
                any_=[POOL]))):  # fmt: skip
            client.delete_work_pool(POOL)


def _heartbeat_trigger_within(deployment_id) -> float:
    with get_client(sync_client=True) as client:
        owned = client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")
    (automation,) = owned
    return automation.trigger.within.total_seconds()


def test_deploy_all_and_a_process_worker_run_price_averages(work_pool, settings, tmp_path):
    ensure_topics(project_topics(settings), settings)
    log = tmp_path / "prefect-cli.log"
    env = prefect_env(STREAM_HEARTBEAT_TIMEOUT_S="600")

    created = run_logged(python("-m", "prefect", "work-pool", "create", POOL, "--type",
                                "process"), env, log)  # fmt: skip
    assert created.returncode == 0, tail(log)
    deployed = run_logged(python("-m", "prefect", "--no-prompt", "deploy", "--all"), env, log)
    assert deployed.returncode == 0, tail(log)
    with get_client(sync_client=True) as client:
        registered = client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL]))
        )
    assert {f"{_flow_name(d.flow_id)}/{d.name}" for d in registered} == DEPLOYMENTS
    (price_averages,) = [d for d in registered if d.name == "price-averages"]
    # prefect.yaml's own value first; then the setting, by the documented command (600 s:
    # it must not fire during this test, which sends no heartbeats).
    assert _heartbeat_trigger_within(price_averages.id) == 120
    applied = run_logged(python("-m", "flows", "automations"), env, log)
    assert applied.returncode == 0, tail(log)
    assert _heartbeat_trigger_within(price_averages.id) == 600
    with get_client(sync_client=True) as client:
        for automation in declared_automations():
            assert len(client.read_automations_by_name(automation.name)) == 1, automation.name

    worker_log = tmp_path / "worker.log"
    worker_env = env | {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    with background(python("-m", "prefect", "worker", "start", "--pool", POOL), worker_env,
                    worker_log) as worker:  # fmt: skip
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(price_averages.id)

        def finished():
            state = flow_run(run.id).state
            return state is not None and state.is_final()

        def diagnose() -> str:
            alive = "running" if worker.poll() is None else f"exited {worker.returncode}"
            return f"{run_report(run.id)}\nworker {alive}\n{tail(worker_log)}"

        eventually(finished, 240, 0.5, diagnose)
        assert flow_run(run.id).state.is_completed(), diagnose()

    # The run used this test's settings (the worker's environment): its row is here.
    con = connect(settings, read_only=True)
    try:
        rows = con.execute(
            "SELECT product_id FROM price_average_history WHERE flow_run_id = ?", [str(run.id)]
        ).fetchall()
    finally:
        con.close()
    assert rows == [("BTC-USD",)]


def _flow_name(flow_id) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow(flow_id).name
