"""GGUF Jinja chat templates on real llama.cpp: real families' templates (stored in
``chat_templates/`` as data), tools and tool turns, add_generation_prompt, BOS handling,
the generic tool prompt for a template without tool support, and hostile templates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from erllama_py.errors import InvalidRequestError
from erllama_py.model.jinja_chat import TOOL_CALL_OPEN, supports_tools
from erllama_py.model.llama_backend import LlamaBackend
from erllama_py.model.testmodel import main_make_test_model, write_test_model

TEMPLATES = Path(__file__).parent / "chat_templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL_ID = "call00001"  # Mistral's template insists on 9 characters
TOOL_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 21C"},
]
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


def _backend(tmp: Path, name: str, template: str | None) -> LlamaBackend:
    path = write_test_model(tmp / f"{name}.gguf", chat_template=template)
    return LlamaBackend.load(path, n_ctx=256, n_batch=64, n_seq_max=1, n_threads=1)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LlamaBackend]]:
    """One tiny GGUF per stored template, carrying it as tokenizer.chat_template."""
    tmp = tmp_path_factory.mktemp("families")
    loaded = {
        f.stem: _backend(tmp, f.stem, f.read_text(encoding="utf-8"))
        for f in sorted(TEMPLATES.glob("*.jinja"))
    }
    yield loaded
    for b in loaded.values():
        b.close()


def test_every_stored_family_is_a_gguf_template_rendered_by_jinja(families):
    assert set(families) == {"gemma3", "llama3.1", "mistral-nemo", "qwen2.5"}
    for name, b in families.items():
        assert b.info.chat_template == (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def test_qwen_renders_tools_tool_calls_and_tool_results_natively(families):
    text = families["qwen2.5"].apply_chat_template(TOOL_TURN, True, None, [WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER) in text  # tojson is json.dumps, as in transformers
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in (
        text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    without = families["qwen2.5"].apply_chat_template(HELLO, False, None, None)
    assert (
        without == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
    )


def test_llama3_renders_tools_in_the_first_user_message_and_drops_the_templates_bos(families):
    b = families["llama3.1"]
    assert b.info.add_bos  # tokenizing adds BOS: the template's own is dropped
    text = b.apply_chat_template(TOOL_TURN, True, None, [WEATHER])
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert "Today Date: " in text  # strftime_now
    assert '"name": "get_weather"' in text and "Weather in Paris?<|eot_id|>" in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not b.apply_chat_template(HELLO, False, None, None).endswith("<|end_header_id|>\n\n")
    tokens = b.tokenize(text, True, True)
    assert tokens[0] == b.info.bos and tokens[1] != b.info.bos


def test_mistral_renders_available_tools_calls_and_results(families):
    text = families["mistral-nemo"].apply_chat_template(TOOL_TURN, True, None, [WEATHER])
    assert text.startswith("[AVAILABLE_TOOLS][")
    assert (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]'
        in (text)
    )
    assert '[TOOL_RESULTS]{"content": sunny, 21C, "call_id": "call00001"}[/TOOL_RESULTS]' in text
    plain = families["mistral-nemo"].apply_chat_template(HELLO, True, None, None)
    assert plain == "[INST]Be brief.\n\nHello![/INST]"


def test_gemma3_has_no_tool_support_so_tools_arrive_as_a_generic_system_prompt(families):
    b = families["gemma3"]
    assert not supports_tools(b.info.chat_template)
    plain = b.apply_chat_template(HELLO, True, None, None)
    assert plain == "<start_of_turn>user\nBe brief.\n\nHello!<end_of_turn>\n<start_of_turn>model\n"
    text = b.apply_chat_template(TOOL_TURN, True, None, [WEATHER])
    # The template insists that roles alternate; the generic path merges and converts turns.
    assert text.startswith("<start_of_turn>user\nYou can call the following tools.")
    assert '"name": "get_weather"' in text and "Be brief." in text
    call = TOOL_CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert f"<start_of_turn>model\n{call}<end_of_turn>" in text
    assert "<start_of_turn>user\n<tool_response>\nsunny, 21C\n</tool_response><end_of_turn>" in text
    assert text.endswith("<start_of_turn>model\n")


def test_a_template_that_refuses_the_conversation_is_an_invalid_request(families):
    odd = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        families["gemma3"].apply_chat_template([*odd[:1], {"role": "assistant", "content": "x"},
                                                {"role": "assistant", "content": "y"}])  # fmt: skip


HOSTILE = {
    "escape": "{{ ().__class__.__base__.__subclasses__() }}",
    "mutation": "{{ messages.append(1) }}",
    "nested-ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "nested-message-loops": "{% for a in messages %}{% for b in messages[:] %}{% for c in messages"
    " %}{% for d in messages %}{% for e in messages %}{% for f in messages %}{% for g in "
    "messages|reverse %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}"
    "{% endfor %}{% endfor %}",
    "huge-string": "{{ 'x' * 1000000000 }}",
    "huge-output": "{% for i in range(99999) %}{{ 'y' * 1000 }}{% endfor %}",
    "huge-power": "{{ 9 ** 99999999 }}",
    "huge-width": "{{ '%0999999999d' % 1 }}",
    "huge-format": "{{ '{:>999999999}'.format(1) }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "syntax": "{% for m in messages %}",
    "raise": "{{ raise_exception('no thanks') }}",
    "error": "{{ messages[99].content }}{{ 1 / 0 }}",
}


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_or_broken_template_is_refused_and_the_backend_stays_usable(tiny, source):
    many = [m for _ in range(10) for m in HELLO]  # 20 messages: 20**7 iterations nested
    with pytest.raises(InvalidRequestError) as info:
        tiny.apply_chat_template(many, True, source)
    assert info.value.param == "messages" and "template" in str(info.value)
    assert tiny.apply_chat_template(HELLO).endswith("<|im_start|>assistant\n")


def test_a_builtin_family_name_still_renders_through_llama_cpp(tiny):
    text = tiny.apply_chat_template(HELLO, True, "gemma")
    assert text.endswith("<start_of_turn>model\n")


def test_make_test_model_writes_a_template_file_into_the_gguf(tmp_path):
    source = (TEMPLATES / "qwen2.5.jinja").read_text(encoding="utf-8")
    (tmp_path / "t.jinja").write_text(source, encoding="utf-8")
    out = tmp_path / "q.gguf"
    assert main_make_test_model([str(out), "--chat-template", str(tmp_path / "t.jinja")]) == 0
    b = LlamaBackend.load(out, n_ctx=128, n_batch=32, n_seq_max=1, n_threads=1)
    try:
        assert b.info.chat_template == source
    finally:
        b.close()
