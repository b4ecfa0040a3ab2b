"""moeify's own MoE model classes (configuration, router, experts, causal LM).

Every module in this folder except this one is also saved next to converted weights so that
`trust_remote_code=True` loads them without moeify installed; they import only torch, transformers and each other.
The configuration loads at once; the modeling classes when first used (the modeling code imports much of
transformers).
"""

from typing import Any

from .configuration_moeify import MoeifyConfig, RouterConfig

# `save_pretrained` writes a complete `auto_map` (and copies the modeling files) for classes registered like this.
MoeifyConfig.register_for_auto_class()

_MODELING = ("MoeifyForCausalLM", "MoeifyModel", "MoeifyPreTrainedModel", "MoeifySparseMoeBlock")
__all__ = ["MoeifyConfig", "RouterConfig", *_MODELING]


def __getattr__(name: str) -> Any:
    if name in _MODELING:
        from . import modeling_moeify

        modeling_moeify.MoeifyForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        return getattr(modeling_moeify, name)
    raise AttributeError(f"module 'moeify.modeling' has no attribute {name!r}")
