"""`ModelHandle`: every per-model call, blocking and asyncio, on typed results.

Get one from a runtime with ``rt.model(name)`` (or ``rt.load_model``)::

    m = rt.model("gemma-3-270m")
    result = m.complete("The capital of France is", max_tokens=8)
    print(result.text, result.usage.cached_tokens, result.cache.kind)
    for event in m.stream("Once upon a time", max_tokens=16):
        ...
    result = await m.acomplete(prompt, max_tokens=8)

A handle addresses its model by name, so it stays valid across restarts of
the model's worker and actor; once the model is unloaded its calls raise
`ModelNotFoundError`. Every call validates its arguments before anything is
queued (a clear `InvalidRequestError` naming the parameter, never a hang).
Each blocking call has an ``a``-prefixed twin that never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TypeVar, Unpack, cast

import numpy as np
import pykka

from erllama_py.app import Tree
from erllama_py.errors import (
    ErllamaError,
    InvalidRequestError,
    ModelError,
    ModelFailedError,
)
from erllama_py.kinds import Phase, SaveReason
from erllama_py.model.actor import Call, Cancel, ModelActor, Submit
from erllama_py.model.request import (
    ChatPrompt,
    PromptInput,
    Request,
    RequestSink,
    SinkEvent,
    TextPrompt,
    TokenPrompt,
)
from erllama_py.model.state import actor_name, sup_name
from erllama_py.model.watchdog import watch
from erllama_py.params import ChatMessage, CompletionOptions, Tool, parse_options
from erllama_py.results import CacheHit, Completion, ModelInfo, WorkerStatus
from erllama_py.streams import POLL_S, AsyncEventStream, EventStream
from supervisors import NoProcError, which_children

__all__ = ["ModelHandle", "RuntimeCore"]

T = TypeVar("T")
ACTOR_WAIT_S = 30.0  # a restarting model actor is waited for this long
CALL_TIMEOUT_S = 60.0  # a direct call (tokenize, embed...) answers within this


@dataclass(frozen=True)
class RuntimeCore:
    """What a handle needs from its runtime: the tree, and whether the runtime runs."""

    tree: Tree
    check_running: Callable[[], None]


class ModelHandle:
    """One model of a running runtime (see the module docstring)."""

    def __init__(self, core: RuntimeCore, name: str) -> None:
        self._core = core
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<ModelHandle {self._name!r}>"

    # ------------------------------------------------------------------ completions

    def complete(
        self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> Completion:
        """Complete a prompt: text, or token ids used as given (no BOS added).

        Raises:
            ModelNotFoundError, ModelFailedError, InvalidRequestError,
            ContextOverflowError, RequestTimeoutError, WorkerCrashedError (the
            worker died under it: resubmit).
        """
        return self._wait(self._submit(self._prompt(prompt), options))

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> Completion:
        """Complete a conversation rendered with the model's chat template (or ``template``:
        Jinja text, or a llama.cpp built-in name such as ``"chatml"``); ``tools`` (OpenAI's
        shape) reach the model through the template, or a generic system prompt when it
        has no tool support."""
        return self._wait(self._submit(self._chat(messages, template, tools), options))

    def prefill(
        self, prompt: str | Sequence[int], *, parent_key: str | bytes | None = None
    ) -> Completion:
        """Warm the cache with a prompt without sampling, whatever the save policy's
        thresholds; the result's ``finish_key`` names the row."""
        options: CompletionOptions = {} if parent_key is None else {"parent_key": parent_key}
        return self._wait(self._submit(self._prompt(prompt), options, prefill_only=True))

    def stream(
        self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> EventStream:
        """Stream a completion: `Delta` events (whole UTF-8 characters), then one `Done`."""
        request = self._submit(self._prompt(prompt), options)
        return EventStream(request, self._cancel, self._core.check_running)

    def chat_stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> EventStream:
        """`stream` for a conversation."""
        request = self._submit(self._chat(messages, template, tools), options)
        return EventStream(request, self._cancel, self._core.check_running)

    # ------------------------------------------------------------------ asyncio twins

    async def acomplete(
        self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> Completion:
        """`complete` for asyncio; cancelling the awaiting task cancels the request."""
        return await self._await(self._submit(self._prompt(prompt), options))

    async def achat(
        self,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> Completion:
        """`chat` for asyncio."""
        return await self._await(self._submit(self._chat(messages, template, tools), options))

    async def aprefill(
        self, prompt: str | Sequence[int], *, parent_key: str | bytes | None = None
    ) -> Completion:
        """`prefill` for asyncio."""
        options: CompletionOptions = {} if parent_key is None else {"parent_key": parent_key}
        return await self._await(self._submit(self._prompt(prompt), options, prefill_only=True))

    def astream(
        self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> AsyncEventStream:
        """`stream` for asyncio (``async for event in m.astream(...)``); call it from a
        running event loop. Leaving the loop early cancels the request."""
        return self._async_stream(self._prompt(prompt), options)

    def achat_stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
        **options: Unpack[CompletionOptions],
    ) -> AsyncEventStream:
        """`chat_stream` for asyncio."""
        return self._async_stream(self._chat(messages, template, tools), options)

    # ------------------------------------------------------------------ tokens

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Token ids of `text` (with BOS when the model wants one and `add_special`; the
        text of control tokens read as those tokens with `parse_special`)."""
        if not isinstance(text, str):
            raise InvalidRequestError("text must be a string", self._name, param="text")
        return self._ask(lambda actor: actor.tokenize(text, add_special, parse_special))

    def chat_tokens(
        self,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> list[int]:
        """The prompt tokens `chat` would complete for these messages (rendered with the
        chat template, special tokens parsed): for counting, or to `prefill` a chat."""
        prompt = self._chat(messages, template, tools)
        return self._ask(
            lambda actor: actor.tokenize(
                actor.render_chat(prompt.messages, prompt.template, prompt.tools), True, True
            )
        )

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of token ids (invalid UTF-8 is replaced)."""
        checked = self._token_ids(tokens, "tokens") if len(tokens) else []
        data = self._ask(lambda actor: actor.detokenize(checked))
        return data.decode("utf-8", errors="replace")

    def embed(self, inputs: str | Sequence[str]) -> list[list[float]]:
        """One embedding per input text (mean-pooled, at most ``n_batch`` tokens each)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise InvalidRequestError(
                "inputs must be non-empty strings", self._name, param="inputs"
            )

        def embed_one(text: str) -> list[float]:
            return self._ask(lambda actor: actor.embed(actor.tokenize(text)))

        return [embed_one(text) for text in texts]

    def embed_tokens(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One embedding per token list (used as given: no BOS added)."""
        if not inputs:
            raise InvalidRequestError("inputs must not be empty", self._name, param="inputs")
        lists = [self._token_ids(list(tokens), "inputs") for tokens in inputs]
        if not all(lists):
            raise InvalidRequestError(
                "every input needs at least one token", self._name, param="inputs"
            )

        def embed_one(tokens: list[int]) -> list[float]:
            return self._ask(lambda actor: actor.embed(tokens))

        return [embed_one(tokens) for tokens in lists]

    def evict(self) -> int:
        """Save the state of every request in flight (reason ``evict``); returns how many."""
        return self._ask(lambda actor: actor.evict(SaveReason.EVICT))

    async def atokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """`tokenize` for asyncio."""
        return await asyncio.to_thread(self.tokenize, text, add_special, parse_special)

    async def achat_tokens(
        self,
        messages: Sequence[ChatMessage],
        *,
        template: str | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> list[int]:
        """`chat_tokens` for asyncio."""
        return await asyncio.to_thread(self.chat_tokens, messages, template=template, tools=tools)

    async def adetokenize(self, tokens: Sequence[int]) -> str:
        """`detokenize` for asyncio."""
        return await asyncio.to_thread(self.detokenize, tokens)

    async def aembed(self, inputs: str | Sequence[str]) -> list[list[float]]:
        """`embed` for asyncio."""
        return await asyncio.to_thread(self.embed, inputs)

    async def aembed_tokens(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """`embed_tokens` for asyncio."""
        return await asyncio.to_thread(self.embed_tokens, inputs)

    async def aevict(self) -> int:
        """`evict` for asyncio."""
        return await asyncio.to_thread(self.evict)

    # ------------------------------------------------------------------ inspection

    def info(self) -> ModelInfo:
        """Identity, settings, phase, queue and worker (pid, state, restarts)."""
        entry = self._core.tree.models.get(self._name)
        shared = entry.shared
        info = shared.info
        worker = WorkerStatus(pid=None, state="down", restarts=0)
        sup = self._core.tree.registry.whereis(sup_name(self._name))
        if isinstance(sup, pykka.ActorRef):
            with contextlib.suppress(Exception):
                for child in which_children(sup, timeout=5.0):
                    if child.id == "worker":
                        worker = WorkerStatus(child.pid, child.state, child.restarts)
        obs = shared.obs
        failed = entry.status == "failed"
        return ModelInfo(
            name=self._name,
            status=entry.status,
            phase=Phase.FAILED if failed else obs.phase,
            pending_len=obs.pending_len,
            active=obs.active,
            last_cache_hit=obs.last_cache_hit,
            requests_done=obs.requests_done,
            tokens_generated=obs.tokens_generated,
            backend=info.backend,
            path=info.path,
            description=info.description,
            architecture=info.architecture,
            quant=info.quant,
            fingerprint=(shared.fingerprint or info.fingerprint).hex(),
            n_vocab=info.n_vocab,
            n_ctx=info.n_ctx,
            n_ctx_train=info.n_ctx_train,
            n_batch=info.n_batch,
            n_seq_max=info.n_seq_max,
            n_swa=info.n_swa,
            n_embd=info.n_embd,
            bos=info.bos,
            eos=info.eos,
            add_bos=info.add_bos,
            chat_template=info.chat_template is not None,
            chat_template_fallback=info.chat_template_fallback,
            tier=shared.tier,
            deterministic=shared.deterministic,
            max_queue=shared.max_queue,
            policy=shared.policy,
            worker=worker,
            worker_starts=shared.worker_starts,
            loaded_at=shared.loaded_at,
            worker_hangs=obs.worker_hangs,
            seqs_moved=obs.seqs_moved,
        )

    def chat_template_text(self) -> str | None:
        """The chat template chats use by default: the GGUF's Jinja text, else the name of
        the llama.cpp built-in family it falls back to (None: neither). Lock-free: it
        reads what the model reported at load."""
        info = self._core.tree.models.get(self._name).shared.info
        return info.chat_template or info.chat_template_fallback

    async def ainfo(self) -> ModelInfo:
        """`info` for asyncio."""
        return await asyncio.to_thread(self.info)

    def phase(self) -> Phase:
        """What the model is doing (lock-free; lags by up to one tick)."""
        entry = self._core.tree.models.get(self._name)
        return Phase.FAILED if entry.status == "failed" else entry.shared.obs.phase

    def pending_len(self) -> int:
        """Requests waiting for a sequence (lock-free)."""
        return self._core.tree.models.get(self._name).shared.obs.pending_len

    def last_hit(self) -> CacheHit | None:
        """The cache hit of the last admission, or None before the first (lock-free)."""
        return self._core.tree.models.get(self._name).shared.obs.last_cache_hit

    # ------------------------------------------------------------------ plumbing

    def _actor(self) -> pykka.ActorRef[ModelActor]:
        core = self._core
        core.check_running()
        core.tree.models.live(self._name)
        try:
            ref = core.tree.registry.wait_for(actor_name(self._name), ACTOR_WAIT_S)
        except NoProcError:
            core.tree.models.live(self._name)  # raises ModelFailedError if it gave up meanwhile
            raise ModelFailedError(f"model {self._name!r} is not running", self._name) from None
        assert isinstance(ref, pykka.ActorRef)
        return ref

    def _ask(self, fn: Callable[[ModelActor], T]) -> T:
        """Run `fn` on the model actor and wait for its answer (never a Pykka error)."""
        # Longer than a hung worker takes to be noticed (its deadline, once for the call
        # in progress and once for this one) and replaced (ACTOR_WAIT_S).
        floor = self._core.tree.models.live(self._name).shared.deadline.floor_s
        timeout = max(CALL_TIMEOUT_S, 2 * floor + ACTOR_WAIT_S)
        try:
            result = cast(T, self._actor().ask(Call(fn), timeout=timeout))
        except pykka.ActorDeadError:
            raise ModelFailedError(
                f"model {self._name!r} stopped during the call", self._name
            ) from None
        except pykka.Timeout:
            raise ModelError(
                f"model {self._name!r} did not answer within {timeout:g} s", self._name
            ) from None
        return result

    def _token_ids(self, tokens: object, param: str) -> list[int]:
        name = self._name
        n_vocab = self._core.tree.models.live(name).shared.info.n_vocab
        if not isinstance(tokens, Sequence) or isinstance(tokens, str | bytes):
            kind = type(tokens).__name__
            raise InvalidRequestError(
                f"{param} must be text or a list of token ids, got {kind}", name, param=param
            )
        out: list[int] = []
        for i, item in enumerate(tokens):
            token = int(item) if isinstance(item, np.integer) else item
            if isinstance(token, bool) or not isinstance(token, int):
                raise InvalidRequestError(
                    f"{param}[{i}] is not a token id: {token!r}", name, param=param
                )
            if not 0 <= token < n_vocab:
                raise InvalidRequestError(
                    f"{param}[{i}] = {token} is outside the vocabulary [0, {n_vocab})",
                    name,
                    param=param,
                )
            out.append(token)
        return out

    def _prompt(self, prompt: object) -> PromptInput:
        self._core.check_running()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", self._name, param="prompt")
            self._core.tree.models.live(self._name)
            return TextPrompt(prompt)
        if isinstance(prompt, Sequence | np.ndarray) and not isinstance(prompt, bytes):
            if not len(prompt):
                raise InvalidRequestError("the prompt is empty", self._name, param="prompt")
            return TokenPrompt(tuple(self._token_ids(list(prompt), "prompt")))
        raise InvalidRequestError(
            f"prompt must be text or a list of token ids, got {type(prompt).__name__}",
            self._name,
            param="prompt",
        )

    def _chat(
        self, messages: object, template: str | None, tools: Sequence[Tool] | None = None
    ) -> ChatPrompt:
        self._core.check_running()
        name = self._name
        if not isinstance(messages, list | tuple) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", name, param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise InvalidRequestError(
                    f"messages[{i}] must be an object", name, param="messages"
                )
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not role:
                raise InvalidRequestError(
                    f"messages[{i}].role must be a string", name, param="messages"
                )
            if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
                raise InvalidRequestError(
                    f"messages[{i}].content must be a string", name, param="messages"
                )
        if template is not None and (not isinstance(template, str) or not template):
            raise InvalidRequestError("template must be a non-empty string", name, param="template")
        if tools is not None and not (
            isinstance(tools, list | tuple)
            and all(
                isinstance(t, Mapping) and isinstance(t.get("function"), Mapping) for t in tools
            )
        ):
            raise InvalidRequestError(
                'tools must be a list of {"type": "function", "function": {...}}', name,
                param="tools",
            )  # fmt: skip
        self._core.tree.models.live(name)
        return ChatPrompt(tuple(messages), template, tuple(tools) if tools else None)

    def _submit(
        self,
        prompt: PromptInput,
        options: CompletionOptions,
        *,
        prefill_only: bool = False,
        sink: RequestSink | None = None,
    ) -> Request:
        opts = parse_options(options, model=self._name)
        request = Request(prompt, opts, sink or RequestSink(), prefill_only=prefill_only)
        actor = self._actor()
        try:
            actor.tell(Submit(request))
        except pykka.ActorDeadError:
            raise ModelFailedError(f"model {self._name!r} is not running", self._name) from None
        watch(request, self._name, lambda: self._tell_cancel(request))
        return request

    def _tell_cancel(self, request: Request) -> None:
        with contextlib.suppress(ErllamaError, pykka.ActorDeadError):
            self._actor().tell(Cancel(request.id))

    def _cancel(self, request: Request) -> None:
        # A cancelled future (asyncio cancels the future it wraps) still needs the actor told.
        if request.sink.done and not request.sink.future.cancelled():
            return
        self._tell_cancel(request)

    def _wait(self, request: Request) -> Completion:
        future = request.sink.future
        try:
            while not futures.wait([future], timeout=POLL_S).done:
                self._core.check_running()
            return future.result()
        except BaseException:
            self._cancel(request)
            raise

    async def _await(self, request: Request) -> Completion:
        try:
            return await asyncio.wrap_future(request.sink.future)
        except asyncio.CancelledError:
            self._cancel(request)
            raise

    def _async_stream(self, prompt: PromptInput, options: CompletionOptions) -> AsyncEventStream:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[SinkEvent] = asyncio.Queue()

        def notify(event: SinkEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        request = self._submit(prompt, options, sink=RequestSink(notify))
        return AsyncEventStream(request, events, self._cancel)
