"""Optional dependencies: import them where needed, and say which extra to install when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

#: Top-level module -> the extra of ``pyproject.toml`` that provides it.
EXTRAS = {
    "matplotlib": "plot",
    "yaml": "plot",
    "safetensors": "checkpoints",
    "huggingface_hub": "checkpoints",
    "transformers": "hf",
    "accelerate": "hf",
    "wandb": "logging",
    "tensorboard": "logging",
    "lightning": "lightning",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`MissingExtraError` saying what to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'instrumented-adamw[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(
            f"{purpose} needs the optional package {top!r}, which is not installed: {hint}"
        ) from exc
