"""Registry of dense architectures moeify can upcycle: one small declarative module per architecture."""

from __future__ import annotations

from . import gemma3, llama, mistral, phi3, qwen2, qwen3
from .base import ArchitectureAdapter

ADAPTERS: dict[str, ArchitectureAdapter] = {
    module.ADAPTER.model_type: module.ADAPTER for module in (llama, mistral, qwen2, qwen3, gemma3, phi3)
}


def supported_model_types() -> list[str]:
    """The dense `model_type`s moeify can convert."""
    return sorted(ADAPTERS)


def get_adapter(model_type: str) -> ArchitectureAdapter:
    """The adapter for `model_type`; `KeyError` with the supported list when there is none."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise KeyError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


__all__ = ["ADAPTERS", "ArchitectureAdapter", "get_adapter", "supported_model_types"]
