"""prefect.yaml is the one declaration of deployments; `python -m flows` serves it."""

from prefect import Flow

from flows.__main__ import declared_deployments, load_flow, runner_deployments


def test_every_declared_deployment_points_at_a_flow():
    for spec in declared_deployments():
        assert isinstance(load_flow(spec["entrypoint"]), Flow), spec["entrypoint"]
        assert spec.get("work_pool", {}).get("name") == "local-process"


def test_served_deployments_match_the_declaration():
    declared = {d["name"]: d for d in declared_deployments()}
    served = {d.name: d for d in runner_deployments()}
    assert served.keys() == declared.keys()
    for name, deployment in served.items():
        crons = [s["cron"] for s in declared[name].get("schedules", [])]
        assert [s.schedule.cron for s in deployment.schedules] == crons


def test_no_secrets_in_prefect_yaml():
    import yaml

    from flows.__main__ import PREFECT_YAML

    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key).lower()
                yield from keys(value)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    found = set(keys(yaml.safe_load(PREFECT_YAML.read_text())))
    assert not {k for k in found if any(w in k for w in ("password", "secret", "token", "sasl"))}


def test_the_heartbeat_timeout_trigger_takes_its_within_from_the_setting():
    from prefect.events.schemas.automations import Posture

    from tasks.settings import Settings

    (price_averages,) = [d for d in runner_deployments(settings=Settings(
        stream_heartbeat_timeout_s=15)) if d.name == "price-averages"]  # fmt: skip
    (trigger,) = price_averages.triggers
    assert trigger.posture == Posture.Proactive
    assert trigger.expect == {"stream_worker.heartbeat"}
    assert trigger.match.root == {"prefect.resource.id": "stream-worker.price-alerts.*"}
    assert trigger.threshold == 1 and trigger.within.total_seconds() == 15
    others = [d for d in runner_deployments() if d.name != "price-averages"]
    assert [t for d in others for t in d.triggers] == []


def test_prefect_yaml_holds_the_settings_default_timeout():
    """What `prefect deploy --all` creates before `python -m flows automations` applies the
    setting: the setting's default, not another number."""
    from tasks.settings import Settings

    (spec,) = [d for d in declared_deployments() if d["name"] == "price-averages"]
    (trigger,) = spec["triggers"]
    assert trigger["within"] == Settings.model_fields["stream_heartbeat_timeout_s"].default


def test_automations_file_is_prefects_model_and_links_to_what_to_do():
    from prefect.events.actions import DoNothing

    from flows.automations import declared_automations

    automations = {a.name: a for a in declared_automations()}
    assert set(automations) == {"transaction-totals failed", "stream worker dead letters"}
    failed, dead = (
        automations["transaction-totals failed"],
        automations["stream worker dead letters"],
    )
    assert "README.md#transaction-totals-failed" in failed.description
    assert "README.md#dead-letters" in dead.description
    assert "prefect.flow-run.Failed" in failed.trigger.expect
    assert failed.trigger.match_related.root["prefect.resource.name"] == "transaction_totals"
    assert dead.trigger.match.root["stream-worker.new-dead-letters"] == "true"
    assert all(a.actions == [DoNothing()] for a in automations.values())


def test_help_describes_commands_defaults_and_what_is_served():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "flows", "--help"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.startswith("usage: python -m flows")
    assert "serve" in out and "automations" in out and "(default: no limit)" in out
    for spec in declared_deployments():
        assert f"{spec['name']} " in out and spec["entrypoint"] in out
    assert "trigger: price-averages when price-alerts is silent" in out
    assert "transaction-totals failed" in out
