"""moeify's own MoE model classes (configuration, router, experts, causal LM).

Every file in this folder is also saved next to converted weights so that `trust_remote_code=True` loads
them without moeify installed; they import only torch, transformers and each other.
"""

from .configuration_moeify import MoeifyConfig
from .modeling_moeify import MoeifyForCausalLM, MoeifyModel, MoeifyPreTrainedModel, MoeifySparseMoeBlock

__all__ = ["MoeifyConfig", "MoeifyForCausalLM", "MoeifyModel", "MoeifyPreTrainedModel", "MoeifySparseMoeBlock"]
