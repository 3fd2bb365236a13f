"""The shared-preamble save point of a chat (erllama_py.model.preamble)."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from erllama_py.model.preamble import PreambleCache, leading_system, shared_prefix_len
from erllama_py.params import ChatMessage

SYSTEM: ChatMessage = {"role": "system", "content": "you are terse"}
USER: ChatMessage = {"role": "user", "content": "hi"}


def test_the_leading_system_messages_count_only_when_a_turn_follows_them() -> None:
    assert leading_system([SYSTEM, SYSTEM, USER]) == [SYSTEM, SYSTEM]
    assert leading_system([SYSTEM]) == []
    assert leading_system([USER, SYSTEM, USER]) == []
    assert leading_system([]) == []


@given(st.lists(st.integers(0, 3)), st.lists(st.integers(0, 3)))
def test_shared_prefix_len_is_the_longest_common_prefix(a: list[int], b: list[int]) -> None:
    n = shared_prefix_len(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


def test_a_preamble_is_rendered_once_and_cut_where_the_prompt_differs() -> None:
    renders: list[Sequence[ChatMessage]] = []

    def render(messages: Sequence[ChatMessage]) -> list[int]:
        renders.append(messages)
        return [1, 2, 3, 4, 9]  # the template's end-of-conversation tokens differ

    cache = PreambleCache()
    assert cache.save_point([SYSTEM, USER], None, None, [1, 2, 3, 4, 5, 6], render) == 4
    assert cache.save_point([SYSTEM, USER], None, None, [1, 2, 3, 4, 7], render) == 4
    assert len(renders) == 2  # alone and before an empty user turn, once
    assert cache.save_point([USER], None, None, [1, 2, 3], render) is None
    assert cache.save_point([SYSTEM, USER], None, None, [1, 2, 3, 4], render) is None  # whole
    assert cache.save_point([SYSTEM, USER], "chatml", None, [5, 6], render) is None  # nothing


def test_the_least_recently_used_preamble_is_forgotten_first() -> None:
    count = 0

    def render(_messages: Sequence[ChatMessage]) -> list[int]:
        nonlocal count
        count += 1
        return [1, 2]

    cache = PreambleCache(capacity=2)
    chats = [[{"role": "system", "content": str(i)}, USER] for i in range(3)]
    for chat in (chats[0], chats[1], chats[0], chats[2], chats[0]):
        cache.save_point(chat, None, None, [1, 2, 3], render)  # type: ignore[arg-type]
    assert count == 6  # two renderings each; chats[0] stayed, chats[1] went for chats[2]
    cache.save_point(chats[1], None, None, [1, 2, 3], render)  # type: ignore[arg-type]
    assert count == 8


def test_a_system_text_folded_into_the_first_user_turn_still_has_its_save_point() -> None:
    # Gemma's and Mistral's templates have no system role: the system text opens the
    # first user turn, and the system messages alone render to nothing of it.
    def fold(messages: Sequence[ChatMessage]) -> list[int]:
        system = [ord(c) for m in messages if m["role"] == "system" for c in str(m["content"])]
        out = [0]  # BOS
        for m in messages:
            if m["role"] == "user":
                out += [1, *system, 2, *(ord(c) for c in str(m["content"])), 3]
                system = []
        return [*out, 4]  # the generation prompt

    prompt = fold([SYSTEM, USER])
    at = PreambleCache().save_point([SYSTEM, USER], None, None, prompt, fold)
    other = fold([SYSTEM, {"role": "user", "content": "another task"}])
    assert at == 2 + len("you are terse") + 1  # BOS, turn opener, the system text, its join
    assert prompt[:at] == other[:at]
