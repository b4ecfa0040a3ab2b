"""Routed experts stored as fused 3-D tensors, run through transformers' experts implementations.

`gate_up_proj` is `(E, 2 * I, H)` (gate rows then up rows, as in Mixtral / Qwen-MoE) and `down_proj` is
`(E, H, I)`. `@use_experts_implementation` dispatches the forward to `grouped_mm` (default), `batched_mm`,
`eager`, ... chosen with `from_pretrained(experts_implementation=...)`. The eager forward below is the
reference the others must match.

Copied next to the weights for `trust_remote_code=True`: imports torch and transformers only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .configuration_moeify import MoeifyConfig


class MoeifyExpertsBase(nn.Module):
    """Expert weights and the eager (loop over experts hit) forward; use the decorated subclasses."""

    def __init__(self, config: MoeifyConfig, bias: bool = False) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.text_config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, 2 * self.intermediate_dim))
            self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.act_fn = ACT2FN[config.mlp_activation]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """`hidden_states` `(T, H)`, `top_k_index` / `top_k_weights` `(T, k)` -> weighted sum `(T, H)`."""
        biased = getattr(self, "has_bias", False)
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate_up = nn.functional.linear(
                current_state, self.gate_up_proj[expert_idx], self.gate_up_proj_bias[expert_idx] if biased else None
            )
            gate, up = gate_up.chunk(2, dim=-1)
            current = nn.functional.linear(
                self.act_fn(gate) * up, self.down_proj[expert_idx], self.down_proj_bias[expert_idx] if biased else None
            )
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


@use_experts_implementation
class MoeifyExperts(MoeifyExpertsBase):
    """Routed experts without biases (Llama, Mistral, Qwen, Gemma, Phi-3 MLPs)."""

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__(config, bias=False)


@use_experts_implementation(has_bias=True)
class MoeifyExpertsWithBias(MoeifyExpertsBase):
    """Routed experts whose projections carry biases (dense models with `mlp_bias=True`)."""

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__(config, bias=True)


def build_experts(config: MoeifyConfig) -> MoeifyExpertsBase:
    """The experts module that matches `config.mlp_bias`."""
    return MoeifyExpertsWithBias(config) if config.mlp_bias else MoeifyExperts(config)
