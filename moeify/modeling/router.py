"""Routers: which experts each token uses, and with what weight.

Copied next to the weights for `trust_remote_code=True`: imports torch and transformers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_moeify import MoeifyConfig


class MoeifyTopKRouter(nn.Module):
    """Softmax top-k router (Mixtral): `p = softmax(W x)`, keep the k largest, renormalise if asked.

    With `norm_topk_prob=True` the weights of the selected experts sum to one, so experts that are
    copies of one dense MLP reproduce it exactly, whatever `W` is.
    """

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.text_config.hidden_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route `(tokens, hidden)` states; returns logits `(tokens, E)`, weights and indices `(tokens, k)`."""
        router_logits = F.linear(hidden_states, self.weight)
        router_probs = F.softmax(router_logits.float(), dim=-1)
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index
