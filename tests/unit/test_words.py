"""The tokenizer, the fast counter, corpus resolution and sharding (no services)."""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

import tasks.words as words
from tasks.words import (
    WHITESPACE,
    CorpusError,
    as_counter,
    count_bytes,
    count_shard,
    decode,
    merge_counts,
    normalize_word,
    plan_shards,
    read_shard,
    reference_counts,
    resolve_corpus,
    tokenize,
    validate_request,
)

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "words"
SAMPLE_FILES = sorted(SAMPLE.glob("*.txt"))


def sample_reference() -> Counter[str]:
    return reference_counts(decode(f.read_bytes()) for f in SAMPLE_FILES)


# --- the tokenizer ----------------------------------------------------------------------


def test_whitespace_is_exactly_what_str_split_splits_on():
    computed = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    assert computed == WHITESPACE
    for c in WHITESPACE:
        assert f"a{c}b".split() == ["a", "b"], repr(c)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello,  world!! -- HELLO", ["hello", "world", "hello"]),
        # punctuation runs at both ends go, inner punctuation stays
        ('...Wait!!! "Stop?!" (yes) [Exit.] --', ["wait", "stop", "yes", "exit"]),
        ("o'er-leap well-a-day e.g. 3.14", ["o'er-leap", "well-a-day", "e.g", "3.14"]),
        # apostrophes: inside a word it stays, at the ends it is stripped
        ("Don't 'tis 'Tis rogues' ''", ["don't", "tis", "tis", "rogues"]),
        # tabs, newlines, CRLF, vertical tab, form feed, file separators
        (
            "one\ttwo\nthree\r\nfour\x0bfive\x0csix\x1cseven\x1f eight",
            ["one", "two", "three", "four", "five", "six", "seven", "eight"],
        ),
        # Unicode whitespace splits (NBSP, NEL, ideographic space, line separator)
        ("a\xa0b\x85c\u3000d\u2028e", ["a", "b", "c", "d", "e"]),
        # ...but the zero-width space is not whitespace for str.split()
        ("a\u200bb", ["a\u200bb"]),
        # non-ASCII punctuation is NOT stripped; lowercase is Python's str.lower()
        ("«Bonjour» naïve—Really CAFÉ", ["«bonjour»", "naïve—really", "café"]),
        ("İstanbul ΟΔΟΣ. ΣΑΣ'Σ", ["i̇stanbul", "οδος", "σασ'ς"]),
        ("", []),
        (" \t\n ", []),
        ("!!! ... ---", []),
    ],
)
def test_tokenize(text, expected):
    assert tokenize(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Hello,  world!! -- HELLO",
        "Don't 'tis\tO'ER\r\nthe  end.",
        "«Bonjour» naïve—Really CAFÉ café Café",
        "İstanbul ΟΔΟΣ. ΣΑΣ'Σ Σ ΑΣ",
        "a\xa0b\x85c\u3000d\u2028e\u200bf\x1cg",
        "ǅungla ẞtraße ＡＢＣ Ⅻ",
        "",
        "\n\n\n",
        "no newline at the end",
    ],
)
def test_fast_counter_agrees_with_the_reference(text):
    assert as_counter(count_bytes(text.encode())) == Counter(tokenize(text))


def test_invalid_utf8_is_decoded_with_replacement_characters():
    data = b"caf\xe9 ok \xff\xfeMore\n\xe2\x82 more \xc3"
    assert decode(data) == "caf\ufffd ok \ufffd\ufffdMore\n\ufffd more \ufffd"
    assert as_counter(count_bytes(data)) == Counter(
        {"caf\ufffd": 1, "ok": 1, "\ufffd\ufffdmore": 1, "\ufffd": 2, "more": 1}
    )
    assert as_counter(count_bytes(data)) == Counter(tokenize(decode(data)))


def test_fast_counter_agrees_on_random_text(monkeypatch):
    # Tiny rows, so the cutting of a shard into rows is exercised too.
    monkeypatch.setattr(words, "_ROW_BYTES", 7)
    alphabet = list("abcXYZ'-.,!?\"()") + list(" \t\n\r\x0b\x0c\x1d") + [
        "\xa0", "\x85", "\u2003", "\u3000", "\u200b", "é", "É", "İ", "Σ", "σ", "—", "«", "ß",
    ]  # fmt: skip
    rng = random.Random(5)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        data = text.encode()
        if rng.random() < 0.2:  # now and then some invalid UTF-8
            cut = rng.randrange(len(data) + 1)
            data = data[:cut] + rng.choice([b"\xff", b"\xe2\x82", b"\xc3"]) + data[cut:]
        assert as_counter(count_bytes(data)) == Counter(tokenize(decode(data))), data


def test_the_sample_agrees_with_the_reference():
    data = b"\n".join(f.read_bytes() for f in SAMPLE_FILES)
    reference = sample_reference()
    assert sum(reference.values()) > 20_000  # the sample is real text
    assert as_counter(count_bytes(data)) == reference


# --- sharding ---------------------------------------------------------------------------


@pytest.mark.parametrize("shards", range(1, 9))
def test_shards_are_exactly_the_corpus_cut_at_line_ends(shards):
    plan = plan_shards(SAMPLE_FILES, shards)
    assert len(plan) == shards
    by_file: dict[str, list] = {}
    for shard in plan:
        for piece in shard:
            by_file.setdefault(piece.path, []).append(piece)
    for file in SAMPLE_FILES:
        data = file.read_bytes()
        pieces = by_file[str(file)]
        assert b"".join(data[p.start : p.end] for p in pieces) == data  # union is the corpus
        assert [p.start for p in pieces[1:]] == [p.end for p in pieces[:-1]]  # no overlap
        for piece in pieces[1:]:
            assert data[piece.start - 1 : piece.start] == b"\n"  # cut after a newline


def test_shards_are_about_equal():
    plan = plan_shards(SAMPLE_FILES, 4)
    sizes = [sum(p.size for p in shard) for shard in plan]
    assert max(sizes) - min(sizes) < 2_000  # lines are short


@pytest.mark.parametrize("shards", range(1, 9))
def test_counts_do_not_depend_on_the_shard_count(shards):
    counted = [count_shard(shard, i) for i, shard in enumerate(plan_shards(SAMPLE_FILES, shards))]
    assert as_counter(merge_counts(c.counts for c in counted)) == sample_reference()
    assert sum(c.tokens for c in counted) == sum(sample_reference().values())
    assert [c.shard for c in counted] == list(range(shards))


def test_a_word_never_spans_two_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first lines\nend")  # no newline at the end
    (tmp_path / "b.txt").write_bytes(b"start\nof b")
    files = resolve_corpus(str(tmp_path))
    for shards in (1, 2, 3):
        plan = plan_shards(files, shards)
        got = merge_counts(count_bytes(read_shard(s)) for s in plan)
        assert as_counter(got) == Counter(["first", "lines", "end", "start", "of", "b"])


def test_one_long_line_leaves_later_shards_empty(tmp_path):
    corpus = tmp_path / "line.txt"
    corpus.write_text("one long line without any newline " * 50)
    plan = plan_shards([corpus], 4)
    assert [len(s) for s in plan] == [1, 0, 0, 0]
    counted = [count_shard(s, i) for i, s in enumerate(plan)]
    assert [c.tokens for c in counted] == [300, 0, 0, 0]
    assert counted[1].counts.height == 0


def test_empty_corpus_gives_empty_counts(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_bytes(b"")
    plan = plan_shards(resolve_corpus(str(corpus)), 3)
    counted = [count_shard(s, i) for i, s in enumerate(plan)]
    assert [c.tokens for c in counted] == [0, 0, 0]
    assert merge_counts(c.counts for c in counted).height == 0


# --- corpus resolution and parameters -------------------------------------------------------


def test_corpus_is_a_file_a_folder_or_a_glob(tmp_path):
    one = SAMPLE / "hamlet.txt"
    assert resolve_corpus(str(one)) == [one]
    assert resolve_corpus(str(SAMPLE)) == SAMPLE_FILES  # *.txt only: not ATTRIBUTION.md
    assert resolve_corpus(str(SAMPLE / "[hs]*.txt")) == [
        SAMPLE / "hamlet.txt", SAMPLE / "sonnets.txt",
    ]  # fmt: skip
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "x.txt").write_text("x")
    assert resolve_corpus(str(tmp_path / "**" / "*.txt")) == [tmp_path / "deep" / "er" / "x.txt"]
    assert resolve_corpus(str(tmp_path)) == [tmp_path / "deep" / "er" / "x.txt"]


@pytest.mark.parametrize("corpus", ["no/such/file.txt", "no/such/*.txt", "", "   "])
def test_a_corpus_that_matches_nothing_is_refused_by_name(corpus):
    with pytest.raises(CorpusError, match="corpus: ") as error:
        resolve_corpus(corpus)
    assert repr(corpus) in str(error.value)


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.md").write_text("not a .txt")
    with pytest.raises(CorpusError, match="matches no file"):
        resolve_corpus(str(tmp_path))


def test_an_unreadable_file_is_refused_by_name(tmp_path):
    dangling = tmp_path / "gone.txt"
    dangling.symlink_to(tmp_path / "deleted.txt")
    with pytest.raises(CorpusError, match=r"cannot read .*gone\.txt"):
        resolve_corpus(str(dangling))
    with pytest.raises(CorpusError, match=r"cannot read .*gone\.txt"):
        resolve_corpus(str(tmp_path))  # also inside a folder


def test_a_fifo_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(CorpusError, match="not a regular file"):
        resolve_corpus(str(fifo))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_is_refused(tmp_path):
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    with pytest.raises(CorpusError, match=r"cannot read .*locked\.txt"):
        resolve_corpus(str(locked))


@pytest.mark.parametrize("shards", [0, -1, True, 2.5, "3", 257])
def test_bad_shard_counts_are_refused_by_value(shards):
    with pytest.raises(ValueError, match=rf"shards: {shards!r}".replace(".", r"\.")):
        validate_request(str(SAMPLE), shards, None, max_shards=256)


@pytest.mark.parametrize("word", ["to be", "--", "", "a\tb", 7])
def test_requested_words_must_be_one_word(word):
    with pytest.raises(ValueError, match=r"words: "):
        normalize_word(word)


def test_requested_words_are_normalized_by_the_tokenizer():
    request = validate_request(str(SAMPLE), 2, ["More,", "more", "'Tis", "HAMLET"], 256)
    assert request.words == ("more", "tis", "hamlet")
    assert request.files == tuple(str(f) for f in SAMPLE_FILES)
    with pytest.raises(ValueError, match="words: 'more' must be a list"):
        validate_request(str(SAMPLE), 2, "more", 256)
