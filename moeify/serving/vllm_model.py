"""`MoeifyForCausalLM` for vLLM (registered by `moeify.serving.vllm_plugin`; imports vLLM, so only vLLM loads it).

vLLM's Transformers backend builds the transformers model and swaps each 3-D `experts` module for its fused MoE
kernel, and where it recognises the MoE block it routes the tokens itself. In vLLM 0.32 that kernel's activation
is chosen by architecture name (SiLU for anything but gpt-oss) and its router computes softmax top-k (its CPU
router asserts softmax scoring). So this class lets vLLM fuse only moeify models with SiLU experts and a plain
softmax top-k router; for the others (GELU experts such as Gemma 3's, sigmoid scoring, an MLP router, a selection
bias, MoE++ null experts or gating residuals) it keeps the experts out of the swap, and moeify's own router and
experts code compute them inside vLLM: slower than the fused kernel, but the tokens are transformers'. Attention,
norms and the rest are vLLM's as usual.
"""

from __future__ import annotations

from torch import nn
from vllm.model_executor.models.transformers import TransformersMoEForCausalLM

from moeify.modeling import RouterConfig

FUSED_ACTIVATIONS = ("silu", "swish")  # what vLLM's fused MoE kernel computes for a moeify model
# Router settings that do not change what a served model computes (losses and training-time noise or drops).
SERVING_NEUTRAL = ("aux_loss_coef", "z_loss_coef", "jitter", "noisy_top_k", "capacity_factor", "mlp_hidden_size")
EXPERTS = "experts"  # the module name vLLM's backend swaps
_HIDDEN = "moeify_experts"  # where the experts wait while vLLM swaps the rest


def experts_fusable(config: object) -> bool:
    """Whether vLLM's fused MoE kernel and router compute this moeify model's MoE blocks as moeify does: SiLU
    experts behind a softmax top-k router with nothing else."""
    if getattr(config, "mlp_activation", "silu") not in FUSED_ACTIVATIONS:
        return False
    router = dict(getattr(config, "router", None) or {})
    defaults = RouterConfig().to_dict()
    return all(router.get(key, value) == value for key, value in defaults.items() if key not in SERVING_NEUTRAL)


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
