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
