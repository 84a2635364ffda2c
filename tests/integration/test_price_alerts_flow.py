"""The batch flow `ten_minute_average` under the real Prefect harness, Kafka and DuckDB."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from flows.price_averages import ARTIFACT_KEY, ten_minute_average
from sources.price_alerts import create_alert
from tasks.warehouse import connect
from tests.helpers import artifacts
from tests.integration.prices_support import notifications, produce, produce_raw, read_all, trade

pytestmark = pytest.mark.integration

AS_OF = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)


def test_flow_fires_reached_alerts_once_and_records_history(prefect_api, settings):
    create_alert("ann", "BTC-USD", "150", alert_id="equal")
    create_alert("bob", "BTC-USD", "150.00000001", alert_id="above")
    produce(settings, settings.trades_topic, [
        ("BTC-USD", trade(1, "BTC-USD", "999", AS_OF - timedelta(minutes=10, microseconds=1))),
        ("BTC-USD", trade(2, "BTC-USD", "100", AS_OF - timedelta(minutes=10))),  # inside
        ("BTC-USD", trade(3, "BTC-USD", "200.00", AS_OF)),  # inside
        ("BTC-USD", trade(4, "BTC-USD", "1", AS_OF + timedelta(microseconds=1))),
        ("ETH-USD", trade(5, "ETH-USD", "5000", AS_OF)),
        ("BTC-USD", trade(6, "BTC-USD", "-5", AS_OF)),
    ])  # fmt: skip
    produce_raw(settings, settings.trades_topic, "BTC-USD", b"{broken")

    first = ten_minute_average(as_of=AS_OF, product_id="BTC-USD")
    assert (first["trades"], first["average_price"]) == (2, "150.00000000")
    assert first["fired"] == ["equal"]
    assert first["rejected"][settings.trades_topic] == 2
    again = ten_minute_average(as_of=AS_OF, product_id="BTC-USD")
    assert again["fired"] == [] and again["average_price"] == "150.00000000"

    (note,) = notifications(settings)
    assert note | {"fired_at": None} == {
        "alert_id": "equal", "user_id": "ann", "product_id": "BTC-USD", "threshold": "150",
        "average_price": "150.00000000", "window_end": AS_OF.isoformat(), "fired_at": None,
        "source": "batch",
    }  # fmt: skip
    tombstones = [k for k, v in read_all(settings, settings.price_alerts_topic) if v is None]
    assert tombstones == ["equal"]

    con = connect(settings, read_only=True)
    history = con.execute(
        "SELECT as_of, trade_count, CAST(average_price AS VARCHAR), fired "
        "FROM price_average_history ORDER BY computed_at"
    ).fetchall()
    rejects = con.execute('SELECT reason FROM load_rejects ORDER BY "offset"').fetchall()
    con.close()
    assert [(h[0], h[1], h[2], h[3]) for h in history] == [
        (AS_OF, 2, "150.00000000", 1),
        (AS_OF, 2, "150.00000000", 0),
    ]
    assert "not positive" in rejects[0][0] and "not UTF-8 JSON" in rejects[1][0]

    table = json.loads(artifacts(ARTIFACT_KEY)[1]["data"])  # newest first: [0] is the rerun
    assert [(r["average_price"], r["fired alert"], r["user"]) for r in table] == [
        ("150.00000000", "equal", "ann")
    ]


def test_an_empty_window_fires_nothing_and_says_so(prefect_api, settings):
    create_alert("ann", "SOL-USD", "0.00000001", alert_id="tiny")
    produce(settings, settings.trades_topic,
            [("SOL-USD", trade(1, "SOL-USD", "10", AS_OF - timedelta(hours=1)))])  # fmt: skip
    result = ten_minute_average(as_of=AS_OF, product_id="SOL-USD")
    assert (result["trades"], result["average_price"], result["fired"]) == (0, None, [])
    assert notifications(settings) == []
    table = json.loads(artifacts(ARTIFACT_KEY)[0]["data"])
    assert table[0]["average_price"] == "empty window: nothing fires"
    assert table[0]["product_id"] == "SOL-USD"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"product_id": "btc-usd"}, "'btc-usd'"),
        ({"product_id": "BTC USD"}, "'BTC USD'"),
        ({"as_of": datetime(2024, 1, 1, 12)}, "'2024-01-01T12:00:00' has no timezone"),
        ({"as_of": "2024-13-01T00:00:00Z"}, "'2024-13-01T00:00:00Z'"),
        ({"as_of": "yesterday"}, "'yesterday'"),
    ],
)
def test_bad_parameters_are_refused_before_any_write(prefect_api, settings, params, message):
    with pytest.raises(ValueError, match=message):
        ten_minute_average(**params)
    assert not settings.warehouse_path.exists()


def test_default_as_of_is_the_scheduled_time(prefect_api, settings):
    before = datetime.now(UTC)
    result = ten_minute_average(product_id="BTC-USD")
    as_of = datetime.fromisoformat(result["as_of"])
    assert before - timedelta(seconds=5) <= as_of <= datetime.now(UTC)
    assert datetime.fromisoformat(result["window_start"]) == as_of - timedelta(minutes=10)
