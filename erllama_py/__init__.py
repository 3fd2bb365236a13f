"""erllama-py: llama.cpp models in a supervised actor system, with a token-exact tiered KV cache.

::

    import erllama_py

    with erllama_py.start("sys.yaml") as rt:              # a path, a dict, or None for defaults
        m = rt.model("gemma-3-270m")                       # or rt.load_model("m", model=...)
        result = m.complete("The capital of France is", max_tokens=8)
        print(result.text, result.usage.cached_tokens, result.cache.kind)
"""

from erllama_py.cache.counters import CounterSnapshot as CounterSnapshot
from erllama_py.cache.counters import TierStats as TierStats
from erllama_py.cache.rows import RowInfo as RowInfo
from erllama_py.errors import CacheError as CacheError
from erllama_py.errors import CacheFormatError as CacheFormatError
from erllama_py.errors import ConfigError as ConfigError
from erllama_py.errors import ContextOverflowError as ContextOverflowError
from erllama_py.errors import ErllamaError as ErllamaError
from erllama_py.errors import InvalidRequestError as InvalidRequestError
from erllama_py.errors import ModelAlreadyLoadedError as ModelAlreadyLoadedError
from erllama_py.errors import ModelError as ModelError
from erllama_py.errors import ModelFailedError as ModelFailedError
from erllama_py.errors import ModelLoadError as ModelLoadError
from erllama_py.errors import ModelNotFoundError as ModelNotFoundError
from erllama_py.errors import QueueFullError as QueueFullError
from erllama_py.errors import RequestTimeoutError as RequestTimeoutError
from erllama_py.errors import RuntimeStoppedError as RuntimeStoppedError
from erllama_py.errors import WorkerCrashedError as WorkerCrashedError
from erllama_py.kinds import FinishReason as FinishReason
from erllama_py.kinds import HitKind as HitKind
from erllama_py.kinds import Phase as Phase
from erllama_py.kinds import SaveReason as SaveReason
from erllama_py.kinds import TierKind as TierKind
from erllama_py.model_handle import ModelHandle as ModelHandle
from erllama_py.params import ChatMessage as ChatMessage
from erllama_py.params import CompletionOptions as CompletionOptions
from erllama_py.params import ModelOptions as ModelOptions
from erllama_py.params import SamplingParams as SamplingParams
from erllama_py.params import Tool as Tool
from erllama_py.results import CacheHit as CacheHit
from erllama_py.results import Completion as Completion
from erllama_py.results import Delta as Delta
from erllama_py.results import Done as Done
from erllama_py.results import ModelInfo as ModelInfo
from erllama_py.results import StreamEvent as StreamEvent
from erllama_py.results import Timings as Timings
from erllama_py.results import TokenLogprob as TokenLogprob
from erllama_py.results import TopLogprob as TopLogprob
from erllama_py.results import Usage as Usage
from erllama_py.results import WorkerStatus as WorkerStatus
from erllama_py.runtime import Runtime as Runtime
from erllama_py.runtime import astart as astart
from erllama_py.runtime import start as start
from erllama_py.streams import AsyncEventStream as AsyncEventStream
from erllama_py.streams import EventStream as EventStream

__all__ = [
    # running it
    "Runtime",
    "ModelHandle",
    "start",
    "astart",
    # what you pass
    "ChatMessage",
    "CompletionOptions",
    "ModelOptions",
    "SamplingParams",
    "Tool",
    # what you get back
    "CacheHit",
    "Completion",
    "CounterSnapshot",
    "Delta",
    "Done",
    "ModelInfo",
    "RowInfo",
    "StreamEvent",
    "TierStats",
    "Timings",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "WorkerStatus",
    "EventStream",
    "AsyncEventStream",
    # kinds
    "FinishReason",
    "HitKind",
    "Phase",
    "SaveReason",
    "TierKind",
    # errors
    "CacheError",
    "CacheFormatError",
    "ConfigError",
    "ContextOverflowError",
    "ErllamaError",
    "InvalidRequestError",
    "ModelAlreadyLoadedError",
    "ModelError",
    "ModelFailedError",
    "ModelLoadError",
    "ModelNotFoundError",
    "QueueFullError",
    "RequestTimeoutError",
    "RuntimeStoppedError",
    "WorkerCrashedError",
]
__version__ = "0.1.0"
