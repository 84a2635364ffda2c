"""The loader flow under a real Prefect API (the session's test harness)."""

import json

import pytest

from flows.load_events import load_events
from tasks.kafka import TopicSpec, ensure_topics, make_producer
from tasks.warehouse import connect
from tests.helpers import artifacts

pytestmark = pytest.mark.integration


def test_flow_loads_new_events_once_and_publishes_an_artifact(prefect_api, settings, unique):
    topic = f"flow-events-{unique}"
    ensure_topics([TopicSpec(topic, 2)], settings)
    producer = make_producer(settings)
    for i in range(120):
        producer.send(topic, key=str(i), value={"i": i})
    producer.close()  # flushes; no client left running after the test

    assert load_events(topics=[topic]) == {topic: 120}
    assert load_events(topics=[topic]) == {topic: 0}

    con = connect(settings, read_only=True)
    assert con.execute("SELECT count(*) FROM raw_events WHERE topic = ?", [topic]).fetchone() == (
        120,
    )
    con.close()
    mine = [a for a in artifacts("raw-events") if topic in str(a["data"])]
    assert len(mine) == 2
    first_run = json.loads(mine[-1]["data"])
    assert first_run == [{"topic": topic, "loaded now": 120, "in warehouse": 120}]


def test_bad_topic_parameter_is_refused_before_any_write(prefect_api, settings):
    with pytest.raises(ValueError, match="not a valid Kafka topic name"):
        load_events(topics=["no spaces allowed"])
    assert not settings.warehouse_path.exists()
