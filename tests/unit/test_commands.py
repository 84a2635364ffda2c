"""The command dispatcher of `python -m stream_workers` and `python -m sources`."""

import stream_workers
from tasks.commands import available, dispatch


def test_only_modules_with_a_main_are_commands_each_with_its_description():
    commands = available(stream_workers)
    assert list(commands) == ["jobs", "price-alerts", "transaction-alerts"]  # not `runtime`
    assert commands["price-alerts"] == "the realtime side of price alerts."


def test_an_unknown_command_is_named_and_the_known_ones_listed(capsys):
    assert dispatch(stream_workers, ["nope"], "worker") == 2
    err = capsys.readouterr().err
    assert err.startswith("unknown worker 'nope'\n")
    assert "  transaction-alerts  per-user running totals" in err


def test_help_lists_the_commands_and_succeeds(capsys):
    assert dispatch(stream_workers, ["--help"], "worker") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m stream_workers <worker> [options]")
    assert "  jobs                the job processor daemon." in out
    assert dispatch(stream_workers, [], "worker") == 2  # no command: usage, as an error
