"""Chat prompts through llama.cpp's built-in template families.

llama.cpp does not run Jinja: ``llama_chat_apply_template`` recognises a known
family (``gemma``, ``chatml``, ``llama3``...) from a name or from the text of a
GGUF's template, and renders ``role``/``content`` pairs with it.
"""

from __future__ import annotations

import ctypes

import llama_cpp as _L

from erllama_py.errors import InvalidRequestError, ModelError

__all__ = ["MAX_RENDERED_BYTES", "render_builtin"]

MAX_RENDERED_BYTES = 4 << 20


def render_builtin(
    template: str, messages: list[tuple[str, str]], add_generation_prompt: bool
) -> str:
    """Render ``(role, content)`` pairs with a built-in family named by, or recognised in,
    ``template``.

    Raises:
        InvalidRequestError: llama.cpp knows no such family, or the result is over 4 MiB.
    """
    arr = (_L.llama_chat_message * len(messages))()
    keep = []
    for i, (role, content) in enumerate(messages):
        r, c = role.encode(), content.encode()
        keep += [r, c]
        arr[i].role = r
        arr[i].content = c
    tb = template.encode()
    size = max(1024, 2 * sum(len(b) for b in keep))
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = int(
            _L.llama_chat_apply_template(tb, arr, len(messages), add_generation_prompt, buf, size)
        )
        if n < 0:
            raise InvalidRequestError(
                f"chat template not supported by llama.cpp: {template[:60]!r}", param="template"
            )
        if n > MAX_RENDERED_BYTES:
            raise InvalidRequestError("rendered chat is larger than 4 MiB", param="messages")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n
    raise ModelError("chat template rendering did not converge")
