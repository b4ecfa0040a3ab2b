"""Frozen full-precision experts with per-expert LoRA inside the grouped dispatch: `Experts4bit`'s bf16 sibling.

peft's `target_parameters` LoRA on fused experts forms `W + delta` for every expert every forward and gets the
gradient of that whole `(E, out, in)` matrix in backward. `ExpertsFrozen` replaces a model's `*.experts` module
(same call contract, same parameter names and tensors: nothing is copied) and runs the experts through the same
dispatch as `moeify.quant.Experts4bit` (`moeify.quant.dispatch.ExpertDispatch`), its weights used in place instead
of dequantized: tokens sorted by expert once, the frozen weights as grouped GEMMs, each expert's LoRA as two more
grouped GEMMs on its own tokens. The weights need no gradient, so backward computes input gradients and the LoRA
factors' only. Wrapped by `moeify.quant.ExpertsLoraLayer`, it saves adapters in peft's `target_parameters` layout, which
stock peft loads onto the untouched model.

On the CPU the sorted tokens run in chunks of consecutive whole experts whose `(rows, 2I)` gate_up output stays
under `CPU_CHUNK_BYTES`: glibc serves blocks under 32 MiB from its heap, recycled call after call, while larger ones
are mapped and page-faulted in afresh each time (BENCHMARKS.md: 0.8-0.9x the time at 4096 tokens, the same
at 256). Accelerators, whose caching allocator recycles any size, run all experts as one chunk, without reading the
counts back.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..kernels.cpu_experts import CPU_CHUNK_BYTES
from .dispatch import PROJECTIONS, ExpertChunk, ExpertDispatch, fused_experts


class ExpertsFrozen(ExpertDispatch):
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

    def chunk_weight(self, name: str, chunk: ExpertChunk, dtype: torch.dtype) -> torch.Tensor:
        return getattr(self, f"{name}_proj")[chunk.selector].to(dtype)  # chunks select by slice: a view, no copy

    def expert_bias(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_proj_bias")

    def chunks(self, top_k_index: torch.Tensor, dtype: torch.dtype) -> Iterator[ExpertChunk]:
        """The routing, sorted by expert once, cut into ranges of consecutive experts (`ranges`)."""
        order, counts = self.sorted_routing(top_k_index)
        num_top_k, device = top_k_index.shape[-1], top_k_index.device
        if device.type != "cpu":  # no host sync: the counts stay on the device
            experts = torch.arange(self.num_experts, device=device)
            yield ExpertChunk(experts, counts, order, order // num_top_k, slice(None))
            return
        ends = torch.cumsum(counts, 0).tolist()
        row_bytes = self.shapes["gate_up"][0] * torch.empty((), dtype=dtype).element_size()
        for start, end in self.ranges(ends, row_bytes):
            first = ends[start - 1] if start else 0
            rows = order[first : ends[end - 1]]
            experts = torch.arange(start, end, device=device)
            yield ExpertChunk(experts, counts[start:end], rows, rows // num_top_k, slice(start, end))

    def ranges(self, ends: list[int], row_bytes: int) -> list[tuple[int, int]]:
        """Ranges `[start, end)` of experts run together on the CPU, from each expert's cumulative row count `ends`:
        whole experts until their gate_up output would exceed `CPU_CHUNK_BYTES` (one expert at least)."""
        ranges, start, first = [], 0, 0
        for expert in range(1, self.num_experts + 1):
            if expert == self.num_experts or (ends[expert] - first) * row_bytes > CPU_CHUNK_BYTES:
                ranges.append((start, expert))
                start, first = expert, ends[expert - 1]
        return ranges

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
