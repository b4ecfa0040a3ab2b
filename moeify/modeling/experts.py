"""Routed experts stored as fused 3-D tensors, run through transformers' experts implementations.

`gate_up_proj` is `(E, 2 * I, H)` (gate rows then up rows, as in Mixtral / Qwen-MoE) and `down_proj` is
`(E, H, I)`. `@use_experts_implementation` dispatches the forward to transformers' `grouped_mm`, `batched_mm`, `eager`,
... chosen with `from_pretrained(experts_implementation=...)`; with moeify installed and imported, its own `"moeify"`
kernels are registered there too and are the default. The eager forward below is the reference the others must match.

`MoeifyMixLoraExperts` (MixLoRA, `moeify convert --method lora-experts`) instead holds one FFN shared by every
expert, `gate_up_proj` `(2 * I, H)` and `down_proj` `(H, I)`, plus each expert's LoRA delta (`deltas`).

Copied next to the weights for `trust_remote_code=True`: imports torch and transformers only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
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


def grouped_linear(inputs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`inputs` rows grouped by `offsets` (cumulative row counts, int32), group g times `weight[g]` `(out, in)`."""
    weight_t = weight.transpose(-2, -1)
    # A LoRA rank of 2 in float32 is not a size grouped_mm takes (its backward too), nor is a GPU before Ampere a
    # device it runs on.
    if grouped_mm_runs(inputs.device) and grouped_mm_takes(weight.shape[-2:], weight.element_size()):
        return F.grouped_mm(inputs.to(weight.dtype), weight_t, offs=offsets)
    # Otherwise one matmul per group (still no per-token weight copies).
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).tolist()
    parts = [inputs[s:e] @ weight_t[g] for g, (s, e) in enumerate(zip(starts, offsets.tolist(), strict=True))]
    return torch.cat(parts) if parts else inputs.new_zeros(0, weight.shape[-2])


def grouped_mm_runs(device: torch.device) -> bool:
    """Whether torch's `grouped_mm` runs on `device`, in any floating dtype: not under `torch.compile` (its meta
    function takes bfloat16 only), on CUDA from compute capability 8.0 (a T4 or V100 has none), on the CPU from torch
    2.11 (earlier CPU kernels want 16-byte aligned weights, which memory-mapped checkpoints do not guarantee). The
    rule transformers' `_can_use_grouped_mm` applies to its own path, for ours."""
    if not hasattr(F, "grouped_mm") or torch.compiler.is_compiling():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return _release(torch.__version__) >= (2, 11)
    return True


@functools.cache
def _release(version: str) -> tuple[int, int]:
    """`(major, minor)` of a torch version string ("2.13.0+cpu", "2.12.0a0+git..."); cached per string, as
    `grouped_linear` asks on every call."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(char for char in minor if char.isdigit()) or 0)


def grouped_mm_takes(sizes: tuple[int, ...] | torch.Size, element_size: int) -> bool:
    """Whether torch's `grouped_mm` takes operands whose rows have these `sizes` (elements of `element_size`
    bytes): each row a multiple of 16 bytes (it refuses others: "strides should be multiple of 16 bytes")."""
    return all(size * element_size % 16 == 0 for size in sizes)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) assignments sorted by expert, once: their order in the flattened routing, the cumulative
    count per expert (`offsets` for `grouped_linear`) and the token of each sorted row. Assignments to an index
    >= `num_experts` (MoE++ null experts, dropped for capacity) sort last, after `offsets[-1]`."""
    order = torch.argsort(top_k_index.reshape(-1), stable=True)
    offsets = torch.cumsum(expert_counts(top_k_index, num_experts), 0, dtype=torch.int32)
    return order, offsets, order // top_k_index.shape[-1]


def expert_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each expert's number of (token, k) assignments; an index >= `num_experts` (MoE++ null experts, dropped for
    capacity) counts for none. No host sync on accelerators (`torch.bincount` reads the largest index to size its
    output), so a CUDA graph can hold it."""
    flat = top_k_index.reshape(-1).long().clamp(max=num_experts)  # every index >= E into one extra bin, dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]


def routed_only(
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    parameters: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """`run` (an experts forward) on the assignments to a routed expert only (index < `num_experts`; the others are
    MoE++ null experts or dropped for capacity), each as a one-slot routing of its token's row, and the results
    added back into their tokens' rows: for experts that take every index for one of theirs.

    When no assignment is routed the output is zeros that stay on the graph through empty sums of the inputs and
    of `parameters` (the experts' weights): a block's backward reaches its inputs, and every weight gets a (zero)
    gradient, as DDP needs from each process in every step."""
    token_idx, slot = torch.nonzero(top_k_index < num_experts, as_tuple=True)
    output = torch.zeros_like(hidden_states)
    if not len(token_idx):
        empty = hidden_states[:0].sum() + top_k_weights[:0].sum().to(output.dtype)
        for weight in parameters:
            if weight.requires_grad:
                empty = empty + weight.reshape(-1)[:0].sum().to(output.dtype)
        return output + empty
    routed = run(hidden_states[token_idx], top_k_index[token_idx, slot, None], top_k_weights[token_idx, slot, None])
    return output.index_add_(0, token_idx, routed.to(hidden_states.dtype))


def expert_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    num_experts: int,
    offsets: torch.Tensor,
    experts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sorted row's expert LoRA `scale * B_e A_e x`, as two grouped GEMMs (never `W + delta`). The factors are
    in peft's `target_parameters` layout: A `(E * r, in)` with `A_e = A.view(E, r, in)[e]`, B `(out, E * r)` with
    `B_e = B.view(out, r, E)[..., e]`; `experts`: the experts the groups are (default: all, in order)."""
    a, b = expert_factors(lora_a, lora_b, num_experts, experts)
    return grouped_lora(x, a, b, scale, offsets)


def expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, experts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`experts`' (default: all) own factors from peft's layout (see `expert_lora`): `(n, r, in)` and `(n, out, r)`."""
    r = lora_a.shape[0] // num_experts
    a = lora_a.view(num_experts, r, -1)
    b = lora_b.view(-1, r, num_experts).permute(2, 0, 1)  # (E, out, r)
    return (a, b.contiguous()) if experts is None else (a[experts], b[experts])


def grouped_lora(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, offsets: torch.Tensor
) -> torch.Tensor:
    """`scale * B_g A_g x` for the rows of each group g (`offsets`), from per-group factors `(n, r, in)` and
    `(n, out, r)`."""
    low = grouped_linear(x, a.to(x.dtype), offsets)
    # The scale multiplies the (rows, r) intermediate, not the (rows, out) result: r / out of the element-wise work.
    return grouped_linear(low * scale, b.to(x.dtype), offsets)


class MoeifyExpertDeltas(nn.Module):
    """Each routed expert's LoRA on the shared FFN, in peft's `target_parameters` layout: `{p}_lora_A` `(E * r, in)`
    and `{p}_lora_B` `(out, E * r)` for p in `gate_up`, `down`; expert e's delta is `scale * B_e A_e` with
    `A_e = A.view(E, r, in)[e]`, `B_e = B.view(out, r, E)[..., e]`. B starts at zero, so an upcycled model is
    exact at step 0."""

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__()
        self.num_experts, self.rank = config.num_experts, config.expert_lora_rank
        self.scale = config.expert_lora_alpha / config.expert_lora_rank
        hidden, inner, n = config.text_config.hidden_size, config.moe_intermediate_size, self.num_experts * self.rank
        self.gate_up_lora_A = nn.Parameter(torch.empty(n, hidden))
        self.gate_up_lora_B = nn.Parameter(torch.zeros(2 * inner, n))
        self.down_lora_A = nn.Parameter(torch.empty(n, inner))
        self.down_lora_B = nn.Parameter(torch.zeros(hidden, n))

    def forward(self, inputs: torch.Tensor, offsets: torch.Tensor, projection: str) -> torch.Tensor:
        """`inputs` `(rows, in)` sorted by expert (`offsets`: cumulative counts) -> each row's delta `(rows, out)`."""
        lora_a, lora_b = getattr(self, f"{projection}_lora_A"), getattr(self, f"{projection}_lora_B")
        return expert_lora(inputs, lora_a, lora_b, self.scale, self.num_experts, offsets)


class MoeifyMixLoraExperts(nn.Module):
    """MixLoRA experts: every routed expert is the layer's one FFN plus its own LoRA delta.

    `expert_e(x) = (W_d + dW_d,e) (act(gate) * up)`, `[gate; up] = (W_gu + dW_gu,e) x`. The shared `W_gu x` runs
    once per token, the deltas and `W_d` once per (token, expert) pair sorted by expert (grouped GEMMs).
    """

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        hidden, inner = config.text_config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(hidden, inner))
        self.has_bias = bool(config.mlp_bias)
        if self.has_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(2 * inner))
            self.down_proj_bias = nn.Parameter(torch.zeros(hidden))
        self.deltas = MoeifyExpertDeltas(config)
        self.act_fn = ACT2FN[config.mlp_activation]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """`hidden_states` `(T, H)`, `top_k_index` / `top_k_weights` `(T, k)` -> weighted sum `(T, H)`."""
        order, offsets, tokens = sort_by_expert(top_k_index, self.num_experts)
        gate_up_bias = self.gate_up_proj_bias if self.has_bias else None
        shared = F.linear(hidden_states, self.gate_up_proj, gate_up_bias)  # once per token
        gate, up = (shared[tokens] + self.deltas(hidden_states[tokens], offsets, "gate_up")).chunk(2, dim=-1)
        inner = self.act_fn(gate) * up
        out = F.linear(inner, self.down_proj, self.down_proj_bias if self.has_bias else None)
        out = (out + self.deltas(inner, offsets, "down")) * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, tokens, out.to(hidden_states.dtype))


def build_experts(config: MoeifyConfig) -> nn.Module:
    """The experts module that matches the config: LoRA experts, or full experts with or without biases."""
    if config.expert_lora_rank:
        return MoeifyMixLoraExperts(config)
    return MoeifyExpertsWithBias(config) if config.mlp_bias else MoeifyExperts(config)
