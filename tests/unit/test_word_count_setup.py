"""What a word count needs before it starts: the Dask extra, and a corpus that exists."""

from __future__ import annotations

import sys

import pytest

from flows.word_count import shard_task_runner
from tasks.settings import Settings
from tasks.words import CorpusError, resolve_corpus


def test_dask_without_the_extra_names_it(monkeypatch):
    # None in sys.modules makes `import prefect_dask` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    with pytest.raises(
        ImportError, match=r"WORD_COUNT_TASK_RUNNER=dask .* pip install -e '\.\[dask\]'"
    ):
        shard_task_runner(Settings(word_count_task_runner="dask"), shards=2)


def test_threads_need_no_dask(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    runner = shard_task_runner(Settings(word_count_task_runner="threads"), shards=2)
    assert type(runner).__name__ == "ThreadPoolTaskRunner"


def test_a_missing_corpus_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError) as raised:
        resolve_corpus("data/corpus/shakespeare.txt")
    message = str(raised.value)
    assert "'data/corpus/shakespeare.txt' matches no file" in message
    assert f"relative to {tmp_path}" in message
    assert "`python -m sources shakespeare`" in message
