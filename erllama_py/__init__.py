"""erllama-py: llama.cpp models in a supervised actor system, with a token-exact tiered KV cache."""

from erllama_py.errors import ErllamaError as ErllamaError

__all__ = ["ErllamaError"]
__version__ = "0.1.0"
