"""Text deltas from token bytes: whole UTF-8 characters, stop sequences held back and cut."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from erllama_py.model.textstream import TextStream


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def _run(stream: TextStream, pieces: list[bytes]) -> list[str]:
    out = [stream.feed(p) for p in pieces]
    out.append(stream.flush())
    return out


def test_a_character_split_across_tokens_is_emitted_whole() -> None:
    stream = TextStream()
    euro = "€".encode()
    assert stream.feed(euro[:1]) == ""
    assert stream.feed(euro[1:2]) == ""
    assert stream.feed(euro[2:] + b"!") == "€!"


def test_a_stop_sequence_is_cut_and_reported() -> None:
    stream = TextStream(["STOP"])
    deltas = _run(stream, [b"hello S", b"TO", b"P and more"])
    assert "".join(deltas) == "hello "
    assert stream.match is not None
    assert stream.match.stop == "STOP"
    assert stream.text == "hello "


def test_text_that_may_start_a_stop_sequence_is_held_back() -> None:
    stream = TextStream(["\n\n"])
    assert stream.feed(b"line\n") == "line"
    assert stream.feed(b"x") == "\nx"


def test_the_leftmost_stop_wins_and_the_longest_at_the_same_position() -> None:
    stream = TextStream(["ab", "abc", "b"])
    assert "".join(_run(stream, [b"xxabcd"])) == "xx"
    assert stream.match is not None
    assert stream.match.stop == "abc"


def test_nothing_is_emitted_after_a_match() -> None:
    stream = TextStream(["."])
    assert stream.feed(b"one. two") == "one"
    assert stream.feed(b" three") == ""
    assert stream.flush() == ""


def test_a_short_stop_inside_a_longer_one_that_starts_earlier_waits_for_it() -> None:
    # "C" matches first, but "0C0" starts earlier and wins once its last character comes.
    stream = TextStream(["C", "0C0"])
    assert stream.feed(b"0C") == ""
    assert stream.feed(b"0") == ""
    assert stream.match is not None and (stream.match.stop, stream.match.position) == ("0C0", 0)
    other = TextStream(["C", "0C0"])
    assert other.feed(b"0C") == ""
    assert other.feed(b"x") == "0"  # "0C0" can no longer match: "C" at 1 stands
    assert other.match is not None and other.match.stop == "C"


def test_a_stop_held_back_at_the_end_is_applied_by_flush() -> None:
    stream = TextStream(["C", "0C0"])
    assert stream.feed(b"0C") == ""
    assert stream.flush() == "0"
    assert stream.text == "0"


def test_an_incomplete_character_at_the_end_becomes_a_replacement() -> None:
    stream = TextStream()
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.flush() == "\ufffd"


@given(
    text=st.text(min_size=0, max_size=60),
    cuts=st.lists(st.integers(0, 400), max_size=20),
    stops=st.lists(st.text(min_size=1, max_size=4), max_size=3),
)
def test_deltas_concatenate_to_the_text_cut_before_the_first_stop(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    stream = TextStream(stops)
    deltas = _run(stream, _split(text.encode(), cuts))
    candidates = [(text.find(s), -len(s), s) for s in stops if s and s in text]
    expected = text[: min(candidates)[0]] if candidates else text
    assert "".join(deltas) == expected
    assert stream.text == expected
    for delta in deltas:
        for stop in stops:
            assert stop not in delta or stop not in text[: len(expected) + len(stop)]
