from decimal import Decimal

from kafka.consumer.fetcher import ConsumerRecord

from tasks.kafka import dead_letter, decode_json, encode_json, encode_key, project_topics
from tasks.settings import Settings


def test_decimals_travel_as_exact_strings():
    raw = encode_json({"price": Decimal("6500.010"), "n": 1})
    assert raw == b'{"price":"6500.010","n":1}'
    assert decode_json(raw) == {"price": "6500.010", "n": 1}


def test_tombstones_stay_none():
    assert encode_json(None) is None
    assert decode_json(None) is None
    assert encode_key("alert-1") == b"alert-1"


def _record(value: bytes) -> ConsumerRecord:
    return ConsumerRecord(
        topic="trades", partition=2, leader_epoch=0, offset=41, timestamp=0, timestamp_type=0,
        key=b"BTC-USD", value=value, headers=[], checksum=None, serialized_key_size=7,
        serialized_value_size=len(value), serialized_header_size=0,
    )  # fmt: skip


def test_dead_letter_keeps_the_raw_value_and_reason():
    letter = dead_letter(_record(b"\xff{not json"), "value is not JSON")
    assert letter["topic"] == "trades" and letter["partition"] == 2 and letter["offset"] == 41
    assert letter["key"] == "BTC-USD"
    assert letter["value"] == "\ufffd{not json"
    assert letter["reason"] == "value is not JSON"


def test_every_source_topic_has_a_dlq_and_compaction_where_declared():
    s = Settings(_env_file=None)
    topics = {t.name: t for t in project_topics(s)}
    assert topics["price-alerts"].compacted
    assert not topics["trades"].compacted
    for source in ("trades", "price-alerts", "transactions", "transaction-totals-changelog"):
        assert f"{source}.dlq" in topics
