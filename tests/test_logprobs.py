"""The engine's logprob pieces without a model (``runner/logprobs.py``): log-softmax, the
top-N list, token entries and the bookkeeping that keeps entries with their text; plus the
stop matcher naming the stop string it found."""

from __future__ import annotations

import codecs

import numpy as np
import pytest

from pollama.runner.base import Logprob
from pollama.runner.engine import StopMatcher, Utf8Decoder
from pollama.runner.logprobs import (
    IMPOSSIBLE,
    HeldLogprobs,
    log_softmax,
    token_entry,
    top_tokens,
)


def reference(logits: np.ndarray) -> np.ndarray:
    """Log-softmax in float64, the textbook way."""
    x = logits.astype(np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def test_log_softmax_matches_float64_and_sums_to_one() -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(49152) * 6).astype(np.float32)
    out = log_softmax(logits)
    assert out.dtype == np.float32 and out.shape == logits.shape
    np.testing.assert_allclose(out, reference(logits), atol=1e-4)
    assert abs(np.exp(out.astype(np.float64)).sum() - 1.0) < 1e-4
    assert (out <= 0).all()
    # shifting the logits changes nothing; huge logits do not overflow
    np.testing.assert_allclose(log_softmax(logits + np.float32(1000)), out, atol=1e-3)


def test_log_softmax_is_a_copy_that_later_masking_cannot_change() -> None:
    logits = np.array([2.0, 1.0, 0.5, -1.0], dtype=np.float32)
    out = log_softmax(logits)
    before = out.copy()
    logits[:2] = -np.inf  # what a grammar does to llama.cpp's buffer after measuring
    np.testing.assert_array_equal(out, before)
    assert np.isfinite(out).all()


def test_log_softmax_of_impossible_row_is_minus_inf_not_nan() -> None:
    out = log_softmax(np.full(5, -np.inf, dtype=np.float32))
    assert np.isneginf(out).all()
    out = log_softmax(np.array([0.0, -np.inf], dtype=np.float32))
    assert out[0] == 0.0 and np.isneginf(out[1])


def test_top_tokens_sorted_most_likely_first() -> None:
    rng = np.random.default_rng(3)
    lp = log_softmax(rng.standard_normal(1000).astype(np.float32))
    top = top_tokens(lp, 20)
    assert [i for i, _ in top] == list(np.argsort(-lp, kind="stable")[:20])
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert top[0][0] == int(lp.argmax())  # what greedy sampling picks
    assert top_tokens(lp, 0) == [] and top_tokens(lp, -3) == []
    assert len(top_tokens(lp[:5], 20)) == 5  # never more than the vocabulary


@pytest.mark.parametrize("size", [49152, 5037, 130, 64])
def test_top_tokens_agree_with_a_full_sort(size: int) -> None:
    """Against sorting the whole row, ties and a last partial group included."""
    rng = np.random.default_rng(size)
    for trial in range(30):
        row = rng.integers(-40, 0, size).astype(np.float32) / 4  # many equal values
        if trial % 3 == 0:
            row[-rng.integers(1, 40) :] = 1.0  # the best tokens at the very end
        if trial % 3 == 1:
            row[rng.choice(size, 8, replace=False)] = 2.0
        expected = sorted(range(size), key=lambda i: (-row[i], i))
        for n in (1, 3, 20):
            assert [i for i, _ in top_tokens(row, n)] == expected[:n]


def test_top_tokens_ties_go_to_the_lowest_ids() -> None:
    lp = np.array([-3.0, -1.0, -2.0, -1.0, -2.0, -2.0, -2.0], dtype=np.float32)
    assert top_tokens(lp, 1) == [(1, -1.0)]
    assert top_tokens(lp, 3) == [(1, -1.0), (3, -1.0), (2, -2.0)]
    assert top_tokens(lp, 4) == [(1, -1.0), (3, -1.0), (2, -2.0), (4, -2.0)]
    assert [i for i, _ in top_tokens(lp, 7)] == [1, 3, 2, 4, 5, 6, 0]
    # a tie cut by the top-N boundary, in a vocabulary-sized row
    wide = np.full(49152, -9.0, dtype=np.float32)
    wide[[40000, 7, 31337, 123, 9]] = [-1.0, -1.0, -1.0, -1.0, -0.5]
    assert top_tokens(wide, 3) == [(9, -0.5), (7, -1.0), (123, -1.0)]
    assert top_tokens(wide, 5)[3:] == [(31337, -1.0), (40000, -1.0)]


def test_token_entry_texts_bytes_and_alternatives() -> None:
    pieces = {0: b"", 1: b" caf", 2: b"\xc3", 3: b"\xa9", 4: "é".encode()}
    lp = log_softmax(np.array([0.0, 3.0, 1.0, 0.5, 2.0], dtype=np.float32))
    entry = token_entry(2, lp, 3, pieces.__getitem__)
    assert (entry.token, entry.bytes) == ("\ufffd", [0xC3])  # half a character
    assert entry.logprob == pytest.approx(float(lp[2]))
    assert [(t.token, t.bytes) for t in entry.top_logprobs] == [
        (" caf", list(b" caf")), ("é", [0xC3, 0xA9]), ("\ufffd", [0xC3])
    ]
    assert [t.logprob for t in entry.top_logprobs] == sorted(lp.tolist(), reverse=True)[:3]
    eog = token_entry(0, lp, 0, pieces.__getitem__)
    assert (eog.token, eog.bytes, eog.top_logprobs) == ("", [], [])
    ruled_out = log_softmax(np.array([0.0, -np.inf, 1.0, -np.inf, 0.0], dtype=np.float32))
    entry = token_entry(1, ruled_out, 5, pieces.__getitem__)
    assert entry.logprob == IMPOSSIBLE == -9999.0  # a JSON number, never -Infinity
    assert [t.logprob for t in entry.top_logprobs][3:] == [IMPOSSIBLE, IMPOSSIBLE]


def _stream(pieces: list[bytes], stops: list[str] = ()) -> list[tuple[str, list[str]]]:
    """Token pieces through the decoder, the stop matcher and the held entries, as the
    engine runs them: the ``(text, entry tokens)`` of every chunk it would send, then of
    the last one (the flush at the end, or the text before a stop string)."""
    held, decoder, matcher = HeldLogprobs(), Utf8Decoder(), StopMatcher(stops)
    chunks: list[tuple[str, list[str]]] = []
    decoded = 0
    for piece in pieces:
        out = decoder.push(piece)
        entry = Logprob(piece.decode("utf-8", "replace"), -1.0, list(piece))
        held.add(entry, decoded, decoded + len(out) + decoder.holding)
        decoded += len(out)
        text, stopped = matcher.push(out)
        got = held.finish(len(text)) if stopped else held.release(len(text))
        chunks.append((text, [e.token for e in got]))
        if stopped:
            return chunks
    tail = matcher.push(decoder.flush())[0] + matcher.flush()
    chunks.append((tail, [e.token for e in held.finish(len(tail))]))
    return chunks


def test_held_entries_wait_for_the_end_of_their_character() -> None:
    # "a", then "€" in three byte tokens, then "!"
    assert _stream([b"a", b"\xe2", b"\x82", b"\xac", b"!"]) == [
        ("a", ["a"]), ("", []), ("", []), ("€", ["\ufffd", "\ufffd", "\ufffd"]),
        ("!", ["!"]), ("", []),
    ]


def test_held_entries_follow_text_the_stop_matcher_holds() -> None:
    assert _stream([b"Hi ", b"E", b"N", b"d more"], ["END"]) == [
        ("Hi ", ["Hi "]), ("", []), ("", []), ("ENd more", ["E", "N", "d more"]), ("", []),
    ]


def test_entries_swallowed_by_a_stop_string_are_dropped() -> None:
    # " two<" began before the stop string, so it stays; "/s" and "> three" were swallowed
    assert _stream([b"one", b" two<", b"/s", b"> three"], ["</s>", "zz"]) == [
        ("one", ["one"]), (" two", []), ("", []), ("", [" two<"]),
    ]
    # a stop string that is exactly a token: that token goes, the rest stays
    assert _stream([b"one", b" two", b".", b" three"], [" two"]) == [
        ("one", ["one"]), ("", []),
    ]


def test_the_end_releases_a_partial_character_and_an_empty_token() -> None:
    # the request ends inside a character; then an end-of-generation token (no text)
    assert _stream([b"ok", b"\xe2", b""]) == [
        ("ok", ["ok"]), ("", []), ("", []), ("\ufffd", ["\ufffd", ""]),
    ]


def test_stop_matcher_names_the_stop_string_that_matched() -> None:
    m = StopMatcher(["STOP", "</end>"])
    assert m.push("a </en") == ("a ", False) and m.matched == ""
    assert m.push("d> STOP") == ("", True) and m.matched == "</end>"
    m = StopMatcher(["later", "ab", "abc"])
    assert m.push("xx abc later") == ("xx ", True) and m.matched == "ab"
    m = StopMatcher(["zz"])
    assert m.push("no stop") == ("no stop", False) and m.matched == ""


def test_utf8_decoder_says_when_it_holds_a_partial_character() -> None:
    d = Utf8Decoder()
    assert not d.holding
    d.push(b"\xf0\x9f")
    assert d.holding
    assert d.push(b"\x98\x80") == "\U0001f600" and not d.holding
    incremental = codecs.getincrementaldecoder("utf-8")("replace")
    assert incremental.decode(b"\xe2A") == d.push(b"\xe2A") == "\ufffdA" and not d.holding
