"""Routers: which experts each token uses, and with what weight; and the losses that keep them balanced.

One router class covers the MoE literature's variants, each switched on by `config.router` (`RouterConfig`):

    z = W x                               (linear; `mlp`: W2 tanh(W1 x))
      + W_map z_prev                      (gating residual, MoE++: the previous MoE layer's logits)
      + N(0, 1) softplus(W_noise x)       (noisy top-k, training only; x jittered first if asked)
    s = softmax(z) | sigmoid(z)           (float32)
    top-k of s + b                        (b: the aux-loss-free balancing bias, selection only)
    w = s[top-k] (/ sum, if normalize) * scaling_factor

The router scores `num_experts` FFN experts plus the MoE++ zero-computation experts (indices `num_experts ..`: zero,
then copy, then constant). With a capacity factor (training only), assignments beyond an expert's capacity are
dropped: their index becomes `dropped_index` and their weight 0. The forward returns `(logits, weights, index)` like
transformers' routers, so statistics and hooks read every router the same way.

Copied next to the weights for `trust_remote_code=True`: imports torch and transformers only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_moeify import NULL_EXPERT_KINDS, MoeifyConfig
from .experts import expert_counts


class RoutingState:
    """Routing passed from one MoE layer to the next inside one forward (the gating residual's previous logits).

    One per model, shared by its routers; a copy of a router (peft's `modules_to_save`) shares it too. The decoder
    layers are transformers' own, so the state travels beside them rather than through their arguments.
    """

    def __init__(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> RoutingState:
        return self


class MoeifyTopKRouter(nn.Module):
    """Top-k router over the FFN experts and the zero-computation experts, as `config.router` describes.

    With the defaults (softmax, renormalised top-k, no bias) the selected weights sum to one, so experts that are
    copies of one dense MLP reproduce it exactly, whatever `W` is.
    """

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__()
        settings = config.router
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.null_experts = {kind: int(settings["null_experts"][kind]) for kind in NULL_EXPERT_KINDS}
        self.num_null_experts = sum(self.null_experts.values())
        self.num_choices = self.num_experts + self.num_null_experts
        self.dropped_index = self.num_choices  # index of an assignment dropped for capacity
        self.scoring = settings["scoring"]
        self.normalize = settings["normalize"]
        self.scaling_factor = float(settings["scaling_factor"])
        self.jitter = float(settings["jitter"])
        self.capacity_factor = settings["capacity_factor"]
        self.hidden_dim = config.text_config.hidden_size
        inner = self.hidden_dim
        self.input_proj = None
        if settings["network"] == "mlp":
            inner = settings["mlp_hidden_size"]
            self.input_proj = nn.Linear(self.hidden_dim, inner, bias=False)
        self.weight = nn.Parameter(torch.empty(self.num_choices, inner))
        self.noise = nn.Linear(self.hidden_dim, self.num_choices, bias=False) if settings["noisy_top_k"] else None
        n = self.num_choices
        self.residual = nn.Linear(n, n, bias=False) if settings["gating_residual"] else None
        if settings["bias_update_rate"] > 0:
            self.bias_update_rate = float(settings["bias_update_rate"])
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_choices, dtype=torch.float32))
        else:
            self.bias_update_rate = 0.0
            self.e_score_correction_bias = None
        # FFN assignments counted in training since the last bias update. Not a buffer: DDP broadcasts buffers from
        # rank 0 before each forward, which would overwrite every other process's count.
        self.load: torch.Tensor | None = None
        # Set by the model: this layer's index, the previous MoE layer's, and the state they share.
        self.layer_index: int | None = None
        self.previous_layer: int | None = None
        self.state: RoutingState | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route `(tokens, hidden)` states; returns float32 logits `(tokens, choices)`, weights and indices
        `(tokens, k)`."""
        x = hidden_states.float()
        if self.training and self.jitter:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        h = torch.tanh(F.linear(x, self.input_proj.weight.float())) if self.input_proj is not None else x
        router_logits = F.linear(h, self.weight.float())
        if self.residual is not None and self.state is not None:
            previous = self.state.logits.get(self.previous_layer) if self.previous_layer is not None else None
            if previous is not None and previous.shape == router_logits.shape:
                router_logits = router_logits + F.linear(previous, self.residual.weight.float())
        if self.noise is not None and self.training:
            noise_std = F.softplus(F.linear(x, self.noise.weight.float()))
            router_logits = router_logits + torch.randn_like(router_logits) * noise_std
        if self.state is not None and self.layer_index is not None:
            self.state.logits[self.layer_index] = router_logits

        scores = router_probabilities(router_logits, self.scoring)
        selection = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        top_k_index = torch.topk(selection, self.top_k, dim=-1).indices
        top_k_weights = scores.gather(-1, top_k_index)
        if self.normalize:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if self.scaling_factor != 1.0:
            top_k_weights = top_k_weights * self.scaling_factor
        if self.training and self.capacity_factor is not None:
            top_k_index, top_k_weights = self.drop_overflow(top_k_index, top_k_weights)
        if self.training and self.e_score_correction_bias is not None:
            with torch.no_grad():
                counts = expert_counts(top_k_index, self.num_experts).float()  # null experts count for none
                self.load = counts if self.load is None else self.load + counts
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index

    def capacity(self, num_tokens: int) -> int:
        """Most assignments one FFN expert takes from a batch of `num_tokens` (Switch: ceil(cf * k * T / E))."""
        return math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_experts)

    def drop_overflow(
        self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop, in token order, each FFN expert's assignments beyond its capacity (index -> `dropped_index`,
        weight -> 0). Zero-computation experts have no capacity limit."""
        flat = top_k_index.reshape(-1)
        ffn = flat < self.num_experts
        one_hot = F.one_hot(torch.where(ffn, flat, self.num_experts), self.num_experts + 1)[:, : self.num_experts]
        position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(dim=-1) - 1  # order of arrival at its expert
        dropped = (ffn & (position >= self.capacity(top_k_index.shape[0]))).reshape(top_k_index.shape)
        return (
            top_k_index.masked_fill(dropped, self.dropped_index),
            top_k_weights.masked_fill(dropped, 0.0),
        )

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing step: `b <- b + u * sign(mean_load - load)` over the FFN experts, from the load
        counted since the last call (or `load`, e.g. summed over processes), then reset the count."""
        load = self.load if load is None else load
        self.load = None
        if self.e_score_correction_bias is None or load is None or load.sum() == 0:
            return
        step = self.bias_update_rate * torch.sign(load.mean() - load)
        self.e_score_correction_bias[: self.num_experts] += step.to(self.e_score_correction_bias.device)


def router_probabilities(router_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Scores the router selects from, in float32: softmax over choices, or element-wise sigmoid."""
    logits = router_logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else F.softmax(logits, dim=-1)


def _token_weights(num_tokens: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """1 for each token the losses count, 0 for padding: padding is weighted out rather than selected away, since a
    selection reads its size on the host (a synchronisation on accelerators)."""
    if attention_mask is None or attention_mask.numel() != num_tokens:
        # no mask, or one that does not describe these tokens (decoding with a cache)
        return torch.ones(num_tokens, device=device)
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    router_logits: torch.Tensor,
    top_k_index: torch.Tensor,
    num_choices: int,
    scoring: str = "softmax",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss of one layer: `n * sum_i f_i P_i` over the n choices, with f_i the share of
    tokens that selected choice i and P_i its mean probability (sigmoid scores normalised per token). Equals k when
    routing is uniform. Padding (`attention_mask` 0) is excluded; dropped assignments count for no choice."""
    probs = router_probabilities(router_logits, scoring)
    if scoring == "sigmoid":
        probs = probs / probs.sum(dim=-1, keepdim=True)
    index = top_k_index.reshape(len(probs), -1)
    weight = _token_weights(len(probs), attention_mask, probs.device)
    selected = F.one_hot(index, num_choices + 1)[..., :num_choices].sum(dim=1).float()  # (tokens, n); drop = n
    tokens = weight.sum().clamp(min=1)
    share = (selected * weight[:, None]).sum(dim=0) / tokens
    return num_choices * (share * (probs * weight[:, None]).sum(dim=0) / tokens).sum()


def router_z_loss(router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss of one layer: the mean over (non-padding) tokens of `logsumexp(z)^2`."""
    z = torch.logsumexp(router_logits.float(), dim=-1) ** 2
    weight = _token_weights(len(z), attention_mask, z.device)
    return (z * weight).sum() / weight.sum().clamp(min=1)
