"""erllama-py: llama.cpp models in a supervised actor system, with a token-exact tiered KV cache.

::

    import erllama_py

    with erllama_py.start() as rt:                       # sys.yaml path, dict, or defaults
        rt.load_model("m", model="gemma-3-270m")
        print(rt.complete("m", "The capital of France is", max_tokens=8)["text"])
"""

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
from erllama_py.errors import RuntimeStoppedError as RuntimeStoppedError
from erllama_py.errors import WorkerCrashedError as WorkerCrashedError
from erllama_py.runtime import Runtime as Runtime
from erllama_py.runtime import start as start

__all__ = [
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
    "Runtime",
    "RuntimeStoppedError",
    "WorkerCrashedError",
    "start",
]
__version__ = "0.1.0"
