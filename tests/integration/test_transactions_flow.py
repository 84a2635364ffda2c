"""The batch check flow `transaction_totals` under a real Prefect API and a real broker."""

import json
from decimal import Decimal

import pytest

from flows.transaction_totals import ARTIFACT_KEY, TotalsMismatchError, transaction_totals
from sources.transactions import generate
from tasks.kafka import make_producer
from tasks.transactions import changelog_value, fold_changelog
from tasks.warehouse import connect
from tests.helpers import artifacts, eventually, read_topic
from tests.integration._transactions import MALFORMED, produce, reference, worker_thread

pytestmark = pytest.mark.integration


def _latest_artifact(topic: str) -> dict:
    mine = [a for a in artifacts(ARTIFACT_KEY) if f"`{topic}`" in (a["description"] or "")]
    return mine[0]


def _warehouse_totals(settings) -> dict[str, tuple[Decimal, int]]:
    con = connect(settings, read_only=True)
    try:
        rows = con.execute('SELECT "user", total, transactions FROM transaction_totals').fetchall()
        return {user: (total, n) for user, total, n in rows}
    finally:
        con.close()


def test_batch_totals_agree_with_the_stream_and_a_wrong_total_is_reported(prefect_api, settings):
    stream = list(generate(6, 500, seed=8))
    produce(settings, stream[:200] + [m[:2] for m in MALFORMED] + stream[200:400])
    with worker_thread(settings) as worker:
        eventually(lambda: worker.stats.records == 400 + len(MALFORMED), 60)

    # The stream is behind by 100 transactions: lag is not a mismatch.
    produce(settings, stream[400:])
    summary = transaction_totals()
    assert summary == {"loaded": 500, "rejected": len(MALFORMED), "users": 6, "compared": 6,
                       "mismatches": 0}  # fmt: skip
    _, want = reference(stream)
    assert _warehouse_totals(settings) == want
    artifact = _latest_artifact(settings.transactions_topic)
    assert json.loads(artifact["data"]) == []
    assert "**0 mismatches**" in artifact["description"]

    # A total on the changelog that the transactions do not add up to is reported.
    records = read_topic(settings, settings.transaction_totals_changelog_topic)
    changelog, _ = fold_changelog(records, {r.partition for r in records}, 2)
    partition, totals = next((p, ts) for p, ts in sorted(changelog.items()) if ts)
    user, total = sorted(totals.items())[0]
    wrong = total._replace(minor=total.minor + 1)  # one cent more
    producer = make_producer(settings)
    producer.send(settings.transaction_totals_changelog_topic, key=user, partition=partition,
                  value=changelog_value(user, wrong, settings.transaction_amount_scale))  # fmt: skip
    producer.flush()
    producer.close()

    with pytest.raises(TotalsMismatchError, match=r"1 of \d+ users' totals differ"):
        transaction_totals()
    rows = json.loads(_latest_artifact(settings.transactions_topic)["data"])
    assert [(r["user"], r["problem"]) for r in rows] == [(user, "totals differ")]
    assert Decimal(rows[0]["stream_total"]) - Decimal(rows[0]["batch_total"]) == Decimal("0.01")


@pytest.mark.parametrize("show", [0, -5, 10_001])
def test_bad_show_parameter_is_refused_before_any_write(prefect_api, settings, show):
    with pytest.raises(ValueError, match=f"show: {show}"):
        transaction_totals(show=show)
    assert not settings.warehouse_path.exists()
