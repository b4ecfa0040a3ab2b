"""Frozen full-precision experts with per-expert LoRA inside the grouped dispatch: `Experts4bit`'s bf16 sibling.

peft's `target_parameters` LoRA on fused experts forms `W + delta` for every expert every forward and gets the
gradient of that whole `(E, out, in)` matrix in backward. `ExpertsFrozen` replaces a model's `*.experts` module
(same call contract, same parameter names and tensors: nothing is copied) and runs the experts as
`moeify.quant.Experts4bit` does, without the 4-bit storage: tokens sorted by expert once, the frozen weights as
grouped GEMMs, each expert's LoRA as two more grouped GEMMs on its own tokens. The weights need no gradient, so
backward computes input gradients and the LoRA factors' only. Wrapped by `moeify.quant.ExpertsLora`, it saves
adapters in peft's `target_parameters` layout, which stock peft loads onto the untouched model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.experts import grouped_linear, sort_by_expert
from .experts_4bit import PROJECTIONS, LoraFactors, fused_experts, lora_delta


class ExpertsFrozen(nn.Module):
    """Full-precision routed experts that do not train; LoRA factors are passed in at call time."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if gate_up.ndim != 3 or getattr(experts, "is_transposed", False):
            raise ValueError(f"{type(experts).__name__} does not hold fused (E, 2I, H) / (E, H, I) expert weights.")
        self.num_experts, two_i, hidden = gate_up.shape
        self.shapes = {"gate_up": (two_i, hidden), "down": (hidden, two_i // 2)}
        self.gate_up_proj, self.down_proj = gate_up.requires_grad_(False), down.requires_grad_(False)
        self.has_bias = getattr(experts, "gate_up_proj_bias", None) is not None
        if self.has_bias:
            self.gate_up_proj_bias = experts.gate_up_proj_bias.requires_grad_(False)
            self.down_proj_bias = experts.down_proj_bias.requires_grad_(False)
        self.act_fn = experts.act_fn

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora: dict[str, LoraFactors] | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(T, H)`, `top_k_index` / `top_k_weights` `(T, k)` -> weighted sum `(T, H)`."""
        lora = lora or {}
        order, offsets, tokens = sort_by_expert(top_k_index, self.num_experts)
        sorted_ids = top_k_index.reshape(-1)[order]
        gate, up = self._project("gate_up", hidden_states[tokens], offsets, sorted_ids, lora).chunk(2, dim=-1)
        out = self._project("down", self.act_fn(gate) * up, offsets, sorted_ids, lora)
        out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, tokens, out.to(hidden_states.dtype))

    def _project(
        self,
        name: str,
        x: torch.Tensor,
        offsets: torch.Tensor,
        sorted_ids: torch.Tensor,
        lora: dict[str, LoraFactors],
    ) -> torch.Tensor:
        # In place: grouped_mm's backward does not need its output, and each `(rows, out)` temporary saved is one
        # allocation fewer of the block's largest size (on CPU, fresh pages of it cost about as much as the add).
        out = grouped_linear(x, getattr(self, f"{name}_proj"), offsets)
        if self.has_bias:
            out = out.add_(getattr(self, f"{name}_proj_bias")[sorted_ids].to(out.dtype))
        if name in lora:
            out = out.add_(lora_delta(x, lora[name], self.num_experts, offsets))
        return out

    def extra_repr(self) -> str:
        (two_i, hidden), experts = self.shapes["gate_up"], self.num_experts
        return f"num_experts={experts}, hidden={hidden}, intermediate={two_i // 2}, frozen"


def freeze_experts(model: nn.Module) -> list[str]:
    """Replace every fused `*.experts` module of `model` by an `ExpertsFrozen` sharing its tensors; their names."""
    replaced = []
    for name, module in fused_experts(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExpertsFrozen(module))
        replaced.append(name)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no fused experts module to freeze: is it an MoE?")
    return replaced


__all__ = ["PROJECTIONS", "ExpertsFrozen", "freeze_experts"]
