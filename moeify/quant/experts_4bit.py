"""Routed experts stored in 4-bit (bitsandbytes NF4 / FP4), with optional per-expert LoRA, for training.

`Experts4bit` replaces a model's `*.experts` module (moeify's, Mixtral's, Qwen-MoE's: fused `gate_up_proj`
`(E, 2I, H)` and `down_proj` `(E, H, I)`) and keeps its call contract
`(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`.

Storage: each expert is quantized on its own (its blocks never cross into another expert), so the experts a
batch uses are sliced out of the packed bytes and dequantized in one bitsandbytes call. The packed bytes are a
frozen parameter viewed as a float dtype (FSDP shards float parameters); scales are small buffers.

Forward: tokens are sorted by expert once; only experts that received tokens are dequantized, in chunks of at
most `max_dequantized_bytes` (default: 48 MiB on the CPU, 1 GiB on accelerators, see `moeify.quant.config`); each
chunk runs as grouped GEMMs (`torch.nn.functional.grouped_mm`), LoRA as two more grouped GEMMs on the same sorted
tokens (never `W + delta`). The dequantized weights are not kept: the autograd function saves the inputs, the
routing, the RNG state and each chunk's gate_up output (like any layer; gradient checkpointing discards and
recomputes it), and backward dequantizes each chunk's weights again for the input gradient, redoing only the
element-wise part and the LoRA branches (same dropout masks), never a GEMM with the base weights. The expert output
is not saved: the routing weights' gradient `<grad, W_down a + lora + bias>` is computed as `<W_down^T grad, a> +
<grad, lora + bias>`, from the product backward forms anyway. The 4-bit base is frozen.

LoRA factors (held by `moeify.quant.lora.ExpertsLora`, passed in at call time) use peft's `target_parameters`
layout: `lora_A` is `(E * r, in)` (expert-major rows) and `lora_B` is `(out, E * r)` (expert index fastest in the
columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import bitsandbytes.functional as bnb_functional
import torch
from bitsandbytes.functional import QuantState
from torch import nn

from ..modeling.experts import expert_factors, grouped_linear, grouped_lora
from .config import ExpertQuantization

PROJECTIONS = ("gate_up", "down")
_NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the scales of double quantization


class Experts4bit(nn.Module):
    """4-bit routed experts; build with `Experts4bit.from_experts(module, ...)` (LoRA: `moeify.quant.lora`)."""

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        quantization: ExpertQuantization | None = None,
        has_bias: bool = False,
    ) -> None:
        super().__init__()
        self.quantization = quantization or ExpertQuantization()
        self.quantization.validate(hidden_dim, intermediate_dim)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.has_bias = has_bias
        self.shapes = {"gate_up": (2 * intermediate_dim, hidden_dim), "down": (hidden_dim, intermediate_dim)}
        storage = self.quantization.storage_dtype
        per_storage = torch.empty((), dtype=storage).element_size()
        for name, (out_dim, in_dim) in self.shapes.items():
            numel = out_dim * in_dim
            blocks = numel // self.quantization.blocksize
            packed = torch.zeros(num_experts, numel // 2, dtype=torch.uint8).view(storage)
            assert packed.shape[-1] * per_storage == numel // 2
            self.register_parameter(f"{name}_packed", nn.Parameter(packed, requires_grad=False))
            if self.quantization.double_quant:
                nested = -(-blocks // _NESTED_BLOCKSIZE)
                self.register_buffer(f"{name}_absmax", torch.zeros(num_experts, blocks, dtype=torch.uint8))
                self.register_buffer(f"{name}_nested_absmax", torch.zeros(num_experts, nested))
                self.register_buffer(f"{name}_offset", torch.zeros(num_experts))
            else:
                self.register_buffer(f"{name}_absmax", torch.zeros(num_experts, blocks))
            if has_bias:
                self.register_buffer(f"{name}_bias", torch.zeros(num_experts, out_dim))
        self.register_buffer("code", torch.zeros(16))  # the 4-bit codebook (NF4 or FP4 values)
        self.register_buffer("nested_code", torch.zeros(256))  # the 8-bit codebook of double quantization

    # Building and storage.

    @classmethod
    def like(cls, experts: nn.Module, quantization: ExpertQuantization | None = None) -> Experts4bit:
        """Empty 4-bit storage for the shapes of a full-precision experts module (fused `gate_up_proj` `(E, 2I, H)`,
        `down_proj` `(E, H, I)`, optional biases); its weights may still be on the meta device."""
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if gate_up.ndim != 3 or down.ndim != 3:
            raise ValueError(
                f"{type(experts).__name__} does not hold fused 3-D expert weights (gate_up_proj, down_proj)."
            )
        num_experts, two_i, hidden = gate_up.shape
        if getattr(experts, "is_transposed", False) or down.shape != (num_experts, hidden, two_i // 2):
            raise ValueError(
                f"{type(experts).__name__}: expected gate_up_proj (E, 2I, H) and down_proj (E, H, I), got "
                f"{tuple(gate_up.shape)} and {tuple(down.shape)}."
            )
        has_bias = getattr(experts, "gate_up_proj_bias", None) is not None
        return cls(num_experts, hidden, two_i // 2, experts.act_fn, quantization, has_bias)

    @classmethod
    def from_experts(cls, experts: nn.Module, quantization: ExpertQuantization | None = None) -> Experts4bit:
        """Quantize a full-precision experts module (fused `gate_up_proj` / `down_proj`, optional biases)."""
        module = cls.like(experts, quantization).to(experts.gate_up_proj.device)
        biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if module.has_bias else (None, None)
        module.store_(experts.gate_up_proj, experts.down_proj, *biases)
        return module

    @torch.no_grad()
    def store_(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> None:
        """Quantize full-precision `gate_up` `(E, 2I, H)` and `down` `(E, H, I)` into this module; copy the biases."""
        self.quantize_("gate_up", gate_up.detach())
        self.quantize_("down", down.detach())
        if self.has_bias:
            assert gate_up_bias is not None and down_bias is not None
            self.gate_up_bias.copy_(gate_up_bias.detach())
            self.down_bias.copy_(down_bias.detach())

    @torch.no_grad()
    def quantize_(self, name: str, weight: torch.Tensor) -> None:
        """Store `weight` `(E, out, in)` of projection `name`, one expert at a time."""
        for expert in range(self.num_experts):
            self.quantize_expert_(name, expert, weight[expert])

    @torch.no_grad()
    def quantize_expert_(self, name: str, expert: int, weight: torch.Tensor) -> None:
        """Store one expert's `weight` `(out, in)` of projection `name` (loaders store one expert at a time)."""
        q = self.quantization
        data, state = bnb_functional.quantize_4bit(
            weight.contiguous(),
            blocksize=q.blocksize,
            compress_statistics=q.double_quant,
            quant_type=q.quant_type,
        )
        getattr(self, f"{name}_packed").view(torch.uint8)[expert].copy_(data.view(-1))
        getattr(self, f"{name}_absmax")[expert].copy_(state.absmax.view(-1))
        if q.double_quant:
            getattr(self, f"{name}_nested_absmax")[expert].copy_(state.state2.absmax.view(-1))
            getattr(self, f"{name}_offset")[expert] = state.offset
            self.nested_code.copy_(state.state2.code)
        self.code.copy_(state.code)

    def absmax(self, name: str, experts: torch.Tensor | slice) -> torch.Tensor:
        """The float32 scales of `experts` (indices or a slice) for projection `name`, `(experts, blocks)`."""
        absmax = getattr(self, f"{name}_absmax")[experts]
        if not self.quantization.double_quant:
            return absmax
        nested, offset = getattr(self, f"{name}_nested_absmax"), getattr(self, f"{name}_offset")
        if absmax.shape[-1] % _NESTED_BLOCKSIZE == 0:
            # Each expert's scales fill whole nested blocks, so the experts' rows side by side are one tensor that
            # bitsandbytes dequantizes in one call; each expert's offset is added after.
            state = QuantState(
                absmax=nested[experts].reshape(-1),
                code=self.nested_code,
                blocksize=_NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            scales = bnb_functional.dequantize_blockwise(absmax.reshape(-1), state).view_as(absmax)
            return scales + offset[experts, None]
        rows = []
        ids = range(self.num_experts)[experts] if isinstance(experts, slice) else experts.tolist()
        for row, expert in zip(absmax, ids, strict=True):
            state = QuantState(
                absmax=nested[expert], code=self.nested_code, blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32
            )
            rows.append(bnb_functional.dequantize_blockwise(row, state) + offset[expert])
        return torch.stack(rows)

    def dequantize(self, name: str, experts: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        """Weights of `experts` (indices, or a slice: no gather of the packed bytes) for projection `name`,
        `(experts, out, in)`, in one bitsandbytes call."""
        out_dim, in_dim = self.shapes[name]
        packed = getattr(self, f"{name}_packed").view(torch.uint8)[experts]
        state = QuantState(
            absmax=self.absmax(name, experts).reshape(-1),
            shape=torch.Size([len(packed) * out_dim, in_dim]),
            code=self.code,
            blocksize=self.quantization.blocksize,
            quant_type=self.quantization.quant_type,
            dtype=dtype,
        )
        return bnb_functional.dequantize_4bit(packed.reshape(-1, 1), state).view(len(packed), out_dim, in_dim)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Experts4bit:
        # `model.to(dtype)`, `.half()`, `from_pretrained(dtype=...)` cast every float tensor: the packed bytes and
        # the scales must only move between devices, never be cast.
        storage = {
            name: tensors.pop(name)
            for tensors in (self._parameters, self._buffers)
            for name in [n for n in tensors if n not in self._castable]
        }
        super()._apply(fn, recurse)
        for name, tensor in storage.items():
            device = fn(torch.empty(0, device=tensor.device)).device
            tensor.data = tensor.data.to(device)
            (self._parameters if isinstance(tensor, nn.Parameter) else self._buffers)[name] = tensor
        return self

    @property
    def _castable(self) -> set[str]:
        """Tensors that follow the model's dtype: the biases."""
        return {f"{p}_bias" for p in PROJECTIONS}

    # Computation.

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora: dict[str, LoraFactors] | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(T, H)`, `top_k_index` / `top_k_weights` `(T, k)` -> weighted sum `(T, H)`.

        `lora` maps a projection (`"gate_up"`, `"down"`) to its factors, applied to the tokens of each expert.
        """
        lora = lora or {}
        spec = tuple((name, lora[name].scale, lora[name].dropout) for name in PROJECTIONS if name in lora)
        tensors = [t for name, _, _ in spec for t in (lora[name].lora_A, lora[name].lora_B)]
        return _Experts4bitFunction.apply(hidden_states, top_k_weights, top_k_index, self, spec, *tensors)

    def chunks(self, top_k_index: torch.Tensor, dtype: torch.dtype) -> Iterator[_Chunk]:
        """The routing, sorted by expert once, cut into chunks of active experts that fit the dequantization budget."""
        num_top_k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        _, order = torch.sort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        active = counts.nonzero().flatten()
        ids = active.tolist()
        per_expert = sum(o * i for o, i in self.shapes.values()) * torch.empty((), dtype=dtype).element_size()
        size = max(1, self.quantization.dequantized_budget(top_k_index.device) // per_expert)
        row = 0
        for start in range(0, len(active), size):
            experts = active[start : start + size]
            chunk_counts = counts[experts]
            rows = order[row : row + int(chunk_counts.sum())]
            row += len(rows)
            first, last = ids[start], ids[start + len(experts) - 1]
            span = slice(first, last + 1) if last - first + 1 == len(experts) else None
            yield _Chunk(experts, chunk_counts, rows, rows // num_top_k, span)

    def chunk_forward(
        self,
        chunk: _Chunk,
        hidden_states: torch.Tensor,
        flat_weights: torch.Tensor,
        lora: dict[str, LoraFactors],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's (token, expert) pairs in sorted order: their weighted outputs `(rows, H)`, and what backward
        needs besides the weights and the inputs: the gate_up output `h` `(rows, 2I)`."""
        x = hidden_states[chunk.tokens]
        h = self.projection("gate_up", x, chunk, lora)
        gate, up = h.chunk(2, dim=-1)
        y = self.projection("down", self.act_fn(gate) * up, chunk, lora)
        return y.mul_(flat_weights[chunk.rows, None].to(y.dtype)), h

    def projection(self, name: str, x: torch.Tensor, chunk: _Chunk, lora: dict[str, LoraFactors]) -> torch.Tensor:
        """`x` (the chunk's rows) through projection `name` of each row's expert, plus its LoRA."""
        weight = self.dequantize(name, chunk.selector, x.dtype)
        out = grouped_linear(x, weight, chunk.offsets)
        del weight  # never kept: backward dequantizes again
        if self.has_bias:
            out.add_(getattr(self, f"{name}_bias")[chunk.expanded].to(out.dtype))
        delta = self.lora_branch(name, x, chunk, lora)
        return out if delta is None else out.add_(delta)  # in place: the autograd function's forward records nothing

    def lora_branch(
        self,
        name: str,
        x: torch.Tensor,
        chunk: _Chunk,
        lora: dict[str, LoraFactors],
        selected: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor | None:
        """Projection `name`'s LoRA delta for the chunk's rows `x`, or None without LoRA there; `selected`: the
        chunk's experts' own factors, by projection (backward's per-chunk leaves)."""
        if name not in lora:
            return None
        own = selected[name] if selected is not None else None
        return lora_delta(x, lora[name], self.num_experts, chunk.offsets, chunk.experts, own)

    def input_grad(self, name: str, grad: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
        """The gradient of projection `name`'s input from its output's `grad`, through the frozen weights."""
        weight = self.dequantize(name, chunk.selector, grad.dtype)
        return grouped_linear(grad, weight.transpose(-2, -1), chunk.offsets)

    def extra_repr(self) -> str:
        q = self.quantization
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"{q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}"
        )


class LoraFactors(NamedTuple):
    """One projection's LoRA for every expert, in peft's `target_parameters` layout."""

    lora_A: torch.Tensor  # (E * r, in)
    lora_B: torch.Tensor  # (out, E * r)
    scale: float
    dropout: nn.Module | None = None


def lora_delta(
    x: torch.Tensor,
    lora: LoraFactors,
    num_experts: int,
    offsets: torch.Tensor,
    experts: torch.Tensor | None = None,
    selected: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each row's expert LoRA (`moeify.modeling.experts.expert_lora`) after the factors' dropout, over rows sorted by
    expert (`offsets`); `experts`: the experts the groups are (default: all, in order); `selected`: those experts'
    own factors `(n, r, in)`, `(n, out, r)` when the caller has taken them from `lora` already."""
    x = lora.dropout(x) if lora.dropout is not None else x
    a, b = selected if selected is not None else expert_factors(lora.lora_A, lora.lora_B, num_experts, experts)
    return grouped_lora(x, a, b, lora.scale, offsets)


class _Chunk:
    """Active experts of one chunk, their token counts, their rows in the flattened (token, k) routing, tokens; and
    how to select the experts' stored tensors: a slice when they are consecutive (no gather), else the indices."""

    def __init__(
        self,
        experts: torch.Tensor,
        counts: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        span: slice | None = None,
    ) -> None:
        self.experts, self.counts, self.rows, self.tokens = experts, counts, rows, tokens
        self.selector: torch.Tensor | slice = experts if span is None else span
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # grouped_linear's groups
        self.expanded = experts.repeat_interleave(counts)  # the expert of each row


class _Experts4bitFunction(torch.autograd.Function):
    """Forward without keeping dequantized weights; backward dequantizes each chunk's weights again for the input
    gradients. The activation backward needs (each chunk's gate_up output) is saved like any layer's (gradient
    checkpointing discards and recomputes it), so no GEMM with the base weights is rerun."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_states: torch.Tensor,
        top_k_weights: torch.Tensor,
        top_k_index: torch.Tensor,
        module: Experts4bit,
        spec: tuple[tuple[str, float, nn.Module | None], ...],
        *lora: torch.Tensor,
    ) -> torch.Tensor:
        ctx.module, ctx.spec, ctx.num_lora = module, spec, len(lora)
        ctx.rng = _rng_state(hidden_states.device)  # LoRA dropout masks are redrawn identically in backward
        output = torch.zeros_like(hidden_states)
        flat_weights = top_k_weights.reshape(-1)
        factors = _factors(spec, lora)
        activations = []
        for chunk in module.chunks(top_k_index, hidden_states.dtype):
            out, h = module.chunk_forward(chunk, hidden_states, flat_weights, factors)
            output.index_add_(0, chunk.tokens, out)
            activations.append(h)
        ctx.save_for_backward(hidden_states, top_k_weights, top_k_index, *lora, *activations)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden_states, top_k_weights, top_k_index, *saved = ctx.saved_tensors
        lora, activations = saved[: ctx.num_lora], saved[ctx.num_lora :]
        module: Experts4bit = ctx.module
        needs = ctx.needs_input_grad
        factors = _factors(ctx.spec, lora)
        # Each chunk's LoRA gradients are taken on that chunk's own factors (leaves of shape (n, r, in) and
        # (n, out, r)) and added into the full gradients here: through the selection from peft's layout, autograd
        # would build and add a full-size gradient per chunk.
        lora_grads = [torch.zeros_like(t) if need else None for t, need in zip(lora, needs[5:], strict=True)]
        backprop = needs[0] or any(needs[5:])  # anything besides the routing weights' gradient
        grad_hidden = torch.zeros_like(hidden_states) if needs[0] else None
        grad_weights = torch.zeros_like(top_k_weights).reshape(-1) if needs[1] else None
        flat_weights = top_k_weights.reshape(-1)
        chunks = module.chunks(top_k_index, hidden_states.dtype)
        with torch.enable_grad(), _restored_rng(hidden_states.device, ctx.rng):
            for chunk, h in zip(chunks, activations, strict=True):
                grad_rows = grad_output[chunk.tokens]  # a fresh gather: the unweighted gradient of each row's output
                # Rebuild the element-wise graph and the LoRA branches in forward order (same dropout masks).
                x = hidden_states[chunk.tokens].detach().requires_grad_(grad_hidden is not None)
                selected = _chunk_leaves(factors, module.num_experts, chunk.experts, lora_grads)
                lora_gate_up = module.lora_branch("gate_up", x, chunk, factors, selected)  # first: its mask first
                h = h.detach().requires_grad_(backprop)
                gate, up = h.chunk(2, dim=-1)
                inner = module.act_fn(gate) * up
                lora_down = module.lora_branch("down", inner, chunk, factors, selected)
                grad_inner = module.input_grad("down", grad_rows, chunk)  # unweighted, (rows, I)
                row_weights = flat_weights[chunk.rows, None].to(grad_rows.dtype)
                if grad_weights is not None:
                    # d out / d weight = the row's expert output y = W_down inner + LoRA + bias, never saved:
                    # <grad, W_down inner> = <W_down^T grad, inner>, and W_down^T grad is backward's product anyway.
                    dots = _row_dots(grad_inner, inner.detach())
                    if lora_down is not None:
                        dots += _row_dots(grad_rows, lora_down.detach())
                    if module.has_bias:
                        dots += _row_dots(grad_rows, module.down_bias[chunk.expanded].to(grad_rows.dtype))
                    grad_weights[chunk.rows] = dots.to(grad_weights.dtype)
                if not backprop:
                    continue
                grad_inner.mul_(row_weights)
                grad_y = grad_rows.mul_(row_weights)
                _backward([inner, lora_down], [grad_inner, grad_y], [h, *selected.get("down", ())])
                if lora_gate_up is not None:
                    _backward([lora_gate_up], [h.grad], [x, *selected.get("gate_up", ())])
                _add_chunk_grads(selected, factors, module.num_experts, chunk.experts, lora_grads)
                if grad_hidden is not None:
                    grad_x = module.input_grad("gate_up", h.grad, chunk)
                    grad_hidden.index_add_(0, chunk.tokens, grad_x if x.grad is None else grad_x.add_(x.grad))
        grad_weights = grad_weights.view_as(top_k_weights) if grad_weights is not None else None
        return (grad_hidden, grad_weights, None, None, None, *lora_grads)


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a * b).sum(-1)` of two `(rows, n)` tensors, without the `(rows, n)` product in between."""
    return torch.bmm(a[:, None], b[:, :, None]).view(-1)


def _chunk_leaves(
    factors: dict[str, LoraFactors], num_experts: int, experts: torch.Tensor, grads: list[torch.Tensor | None]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The chunk's experts' own factors of each projection, as fresh leaves that want a gradient where the full
    factor does (`grads`, in the order of `factors`' A, B pairs)."""
    selected = {}
    for i, (name, lora) in enumerate(factors.items()):
        a, b = expert_factors(lora.lora_A.detach(), lora.lora_B.detach(), num_experts, experts)
        selected[name] = (a.requires_grad_(grads[2 * i] is not None), b.requires_grad_(grads[2 * i + 1] is not None))
    return selected


def _add_chunk_grads(
    selected: dict[str, tuple[torch.Tensor, torch.Tensor]],
    factors: dict[str, LoraFactors],
    num_experts: int,
    experts: torch.Tensor,
    grads: list[torch.Tensor | None],
) -> None:
    """Add the chunk leaves' gradients into the full gradients, in peft's layout (the inverse of `expert_factors`)."""
    for i, name in enumerate(factors):
        (a, b), grad_a, grad_b = selected[name], grads[2 * i], grads[2 * i + 1]
        if grad_a is not None and a.grad is not None:
            grad_a.view(num_experts, a.shape[1], -1).index_add_(0, experts, a.grad)
        if grad_b is not None and b.grad is not None:
            grad_b.view(-1, b.shape[2], num_experts).permute(2, 0, 1).index_add_(0, experts, b.grad)


def _backward(outputs: list[torch.Tensor | None], grads: list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
    """`torch.autograd.backward` over the outputs that exist, into the inputs that want a gradient."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o is not None]
    wanted = [t for t in inputs if t.requires_grad]
    if pairs and wanted:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], inputs=wanted)


def _factors(spec: tuple[tuple[str, float, nn.Module | None], ...], tensors: tuple[torch.Tensor, ...]) -> dict:
    return {
        name: LoraFactors(tensors[2 * i], tensors[2 * i + 1], scale, dropout)
        for i, (name, scale, dropout) in enumerate(spec)
    }


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _restored_rng:
    """Run a block with the RNG state of `state`, restoring the current state afterwards (like checkpointing)."""

    def __init__(self, device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.device, self.state = device, state

    def __enter__(self) -> None:
        self.saved = _rng_state(self.device)
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every `*.experts` module of `model` with fused full-precision `gate_up_proj` / `down_proj`, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.rpartition(".")[2] == "experts"
        and getattr(module, "gate_up_proj", None) is not None
        and getattr(module, "down_proj", None) is not None
        and module.gate_up_proj.dim() == 3  # not lora-experts' one shared FFN
    }


def quantize_experts(model: nn.Module, quantization: ExpertQuantization | None = None) -> list[str]:
    """Replace every fused `*.experts` module of `model` by an `Experts4bit`, in place; returns their names.

    Raises `ValueError` when the model has no fused experts module (a dense model, or experts held per expert).
    """
    replaced = []
    for name, module in fused_experts(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model,
            child,
            Experts4bit.from_experts(module, quantization),
        )
        replaced.append(name)
    if not replaced:
        raise ValueError(
            f"{type(model).__name__} has no fused experts module (`*.experts` with gate_up_proj and down_proj) to "
            "quantize: is it an MoE?"
        )
    return replaced
