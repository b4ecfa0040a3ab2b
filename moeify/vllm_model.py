"""`MoeifyForCausalLM` for vLLM (registered by `moeify.vllm_plugin`; imports vLLM, so only vLLM loads it).

vLLM's Transformers backend builds the transformers model and swaps each 3-D `experts` module for its fused MoE
kernel. In vLLM 0.32 that kernel's activation is chosen by architecture name and is SiLU for anything but gpt-oss,
and it computes exactly `num_experts_per_tok` FFN slots per token. moeify's experts with another activation (GELU:
Gemma 3) or with MoE++ null experts (slots that skip the FFN) would be served wrongly, so for those this class
keeps the experts out of the swap and moeify's own experts code computes them (slower than the fused kernel,
but the tokens are transformers'). Routers, shared experts, attention and everything else are vLLM's as usual.
"""

from __future__ import annotations

from torch import nn
from vllm.model_executor.models.transformers import TransformersMoEForCausalLM

FUSED_ACTIVATIONS = ("silu", "swish")  # what vLLM's fused MoE kernel computes for a moeify model
EXPERTS = "experts"  # the module name vLLM's backend swaps
_HIDDEN = "moeify_experts"  # where the experts wait while vLLM swaps the rest


def experts_fusable(config: object) -> bool:
    """Whether vLLM's fused MoE kernel computes this moeify model's experts as moeify does."""
    activation = getattr(config, "mlp_activation", "silu")
    return activation in FUSED_ACTIVATIONS and not getattr(config, "num_null_experts", 0)


class MoeifyForCausalLM(TransformersMoEForCausalLM):
    """vLLM's Transformers-backend MoE causal LM, with moeify's experts kept where its fused kernel would differ."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        # Read by moeify's modeling code, which otherwise refuses to build under vLLM what its kernel gets wrong.
        config.vllm_experts_kept = not experts_fusable(config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def recursive_replace(self) -> None:
        if experts_fusable(self.config):
            super().recursive_replace()
            return
        holders = [module for module in self.model.modules() if isinstance(module._modules.get(EXPERTS), nn.Module)]
        for holder in holders:
            holder._modules[_HIDDEN] = holder._modules.pop(EXPERTS)
        try:
            super().recursive_replace()
        finally:
            for holder in holders:
                holder._modules[EXPERTS] = holder._modules.pop(_HIDDEN)
