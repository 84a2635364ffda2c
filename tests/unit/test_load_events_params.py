import pytest

from flows.load_events import validate_topics


def test_valid_topic_names_pass():
    assert validate_topics(["trades", "jobs.payments.realtime"]) == [
        "trades",
        "jobs.payments.realtime",
    ]


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", "..", "x" * 250])
def test_bad_topic_names_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="topics"):
        validate_topics(["trades", bad])
