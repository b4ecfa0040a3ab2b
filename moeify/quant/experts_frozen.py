"""Frozen full-precision experts with per-expert LoRA inside the grouped dispatch: `Experts4bit`'s bf16 sibling.

peft's `target_parameters` LoRA on fused experts forms `W + delta` for every expert every forward and gets the
gradient of that whole `(E, out, in)` matrix in backward. `ExpertsFrozen` replaces a model's `*.experts` module
(same call contract, same parameter names and tensors: nothing is copied) and runs the experts as
`moeify.quant.Experts4bit` does, without the 4-bit storage: tokens sorted by expert once, the frozen weights as
grouped GEMMs, each expert's LoRA as two more grouped GEMMs on its own tokens. The weights need no gradient, so
backward computes input gradients and the LoRA factors' only. Wrapped by `moeify.quant.ExpertsLora`, it saves
adapters in peft's `target_parameters` layout, which stock peft loads onto the untouched model.

On the CPU the sorted tokens run in chunks of whole experts whose `(rows, 2I)` gate_up output stays under
`CPU_CHUNK_BYTES`: glibc serves blocks under 32 MiB from its heap, recycled call after call, while larger ones are
mapped and page-faulted in afresh each time (BENCHMARKS.md, issue 12: 0.8-0.9x the time at 4096 tokens, the same at
256). Accelerators, whose caching allocator recycles any size, run all experts as one chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..modeling.expert_kernels import CPU_CHUNK_BYTES
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
        sorted_weights = top_k_weights.reshape(-1)[order, None]
        output = torch.zeros_like(hidden_states)
        for start, end in self._chunks(offsets, hidden_states):
            if (start, end) == (0, self.num_experts):
                rows, chunk = slice(None), _Chunk(start, end, offsets, sorted_ids, None)
            else:
                first = int(offsets[start - 1]) if start else 0
                rows = slice(first, int(offsets[end - 1]))
                experts = torch.arange(start, end, device=offsets.device)
                chunk = _Chunk(start, end, offsets[start:end] - first, sorted_ids[rows], experts)
            gate, up = self._project("gate_up", hidden_states[tokens[rows]], chunk, lora).chunk(2, dim=-1)
            out = self._project("down", self.act_fn(gate) * up, chunk, lora)
            out = out * sorted_weights[rows].to(out.dtype)
            output.index_add_(0, tokens[rows], out.to(hidden_states.dtype))
        return output

    def _chunks(self, offsets: torch.Tensor, hidden_states: torch.Tensor) -> list[tuple[int, int]]:
        """Ranges `[start, end)` of experts run together: all of them off the CPU, else whole experts until their
        gate_up output would exceed `CPU_CHUNK_BYTES` (one expert at least)."""
        if hidden_states.device.type != "cpu":
            return [(0, self.num_experts)]  # no host sync: the counts stay on the device
        row_bytes = self.shapes["gate_up"][0] * hidden_states.element_size()
        ends = offsets.tolist()
        ranges, start, first = [], 0, 0
        for expert in range(1, self.num_experts + 1):
            last = expert == self.num_experts
            if last or (ends[expert] - first) * row_bytes > CPU_CHUNK_BYTES:
                ranges.append((start, expert))
                start, first = expert, ends[expert - 1]
        return ranges

    def _project(self, name: str, x: torch.Tensor, chunk: _Chunk, lora: dict[str, LoraFactors]) -> torch.Tensor:
        # In place: grouped_mm's backward does not need its output, and each `(rows, out)` temporary saved is one
        # allocation fewer of the block's largest size (on CPU, fresh pages of it cost about as much as the add).
        out = grouped_linear(x, getattr(self, f"{name}_proj")[chunk.start : chunk.end], chunk.offsets)
        if self.has_bias:
            out = out.add_(getattr(self, f"{name}_proj_bias")[chunk.sorted_ids].to(out.dtype))
        if name in lora:
            out = out.add_(lora_delta(x, lora[name], self.num_experts, chunk.offsets, chunk.experts))
        return out

    def extra_repr(self) -> str:
        (two_i, hidden), experts = self.shapes["gate_up"], self.num_experts
        return f"num_experts={experts}, hidden={hidden}, intermediate={two_i // 2}, frozen"


class _Chunk(NamedTuple):
    """Experts `[start, end)`: their rows' cumulative counts from the chunk's first row, each row's expert, and the
    experts as indices for the LoRA factors (None: all of them)."""

    start: int
    end: int
    offsets: torch.Tensor
    sorted_ids: torch.Tensor
    experts: torch.Tensor | None


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
