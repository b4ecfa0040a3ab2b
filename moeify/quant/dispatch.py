"""The grouped dispatch of routed experts whose base weights do not train, with per-expert LoRA.

`ExpertDispatch` is what `Experts4bit` (weights dequantized from 4-bit) and `ExpertsFrozen` (full-precision weights
used in place) compute with; they differ only in where a chunk's weights come from (`weight`) and how the sorted
rows are cut into chunks (`chunks`). The call contract is transformers' experts contract
`(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`, plus the LoRA factors at call time.

Forward: tokens are sorted by expert once and run chunk by chunk as grouped GEMMs
(`torch.nn.functional.grouped_mm`), each expert's LoRA as two more grouped GEMMs on its own rows (never
`W + delta`). A chunk's weights are not kept: the autograd function saves the inputs, the routing, the RNG state
and each chunk's gate_up output (like any layer; gradient checkpointing discards and recomputes it), and backward
takes the chunk's weights again for the input gradient, redoing only the element-wise part and the LoRA branches
(same dropout masks), never a GEMM with the base weights. The expert output is not saved: the routing weights'
gradient `<grad, W_down a + lora + bias>` is computed as `<W_down^T grad, a> + <grad, lora + bias>`, from the
product backward forms anyway. Each chunk's LoRA gradients are taken on that chunk's own factors and added into
peft's layout once per chunk.

LoRA factors (held by `moeify.quant.lora.ExpertsLoraLayer`) use peft's `target_parameters` layout: `lora_A` is
`(E * r, in)` (expert-major rows) and `lora_B` is `(out, E * r)` (expert index fastest in the columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ..kernels.cpu_experts import accepts_unrouted
from ..modeling.experts import expert_counts, expert_factors, grouped_linear, grouped_lora

PROJECTIONS = ("gate_up", "down")


class LoraFactors(NamedTuple):
    """One projection's LoRA for every expert, in peft's `target_parameters` layout."""

    lora_A: torch.Tensor  # (E * r, in)
    lora_B: torch.Tensor  # (out, E * r)
    scale: float
    dropout: nn.Module | None = None


class ExpertChunk:
    """Experts of one chunk, their token counts, their rows in the flattened (token, k) routing, their tokens; how
    to select the experts' stored tensors: a slice when they are consecutive (no gather), else the indices;
    `workspace`, scratch memory shared by the chunks of one call (see `Experts4bit.weight`); and `ids`, the experts
    as host integers where they are known without a device read."""

    def __init__(
        self,
        experts: torch.Tensor,
        counts: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        span: slice | None = None,
        workspace: dict[str, torch.Tensor] | None = None,
        ids: list[int] | None = None,
    ) -> None:
        self.experts, self.counts, self.rows, self.tokens = experts, counts, rows, tokens
        self.ids = ids  # `experts` on the host, where the chunking read them already
        self.selector: torch.Tensor | slice = experts if span is None else span
        self.workspace = workspace if workspace is not None else {}
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # grouped_linear's groups

    @property
    def expanded(self) -> torch.Tensor:
        """The expert of each row (the output size is given, so no device sync)."""
        return self.experts.repeat_interleave(self.counts, output_size=len(self.rows))


class ExpertDispatch(nn.Module):
    """Routed experts with frozen base weights, run in chunks of sorted rows; subclasses set `num_experts`,
    `shapes` (`{"gate_up": (2I, H), "down": (H, I)}`), `act_fn`, `has_bias` and say where weights come from.

    On the CPU an index >= `num_experts` (a MoE++ null expert, an assignment dropped for capacity) is left out: it
    sorts after every expert's rows and no chunk takes it (`accepts_unrouted`, read by moeify's MoE block)."""

    num_experts: int
    shapes: dict[str, tuple[int, int]]
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    has_bias: bool

    def accepts_unrouted(self, hidden_states: torch.Tensor) -> bool:
        return accepts_unrouted(hidden_states)

    def chunk_weight(self, name: str, chunk: ExpertChunk, dtype: torch.dtype) -> torch.Tensor:
        """Projection `name`'s weights of the chunk's experts in `dtype`, `(experts, out, in)`; valid until the next
        call (it may live in the chunk's workspace)."""
        raise NotImplementedError

    def expert_bias(self, name: str) -> torch.Tensor:
        """Projection `name`'s biases of every expert, `(E, out)` (only when `has_bias`)."""
        raise NotImplementedError

    def chunks(self, top_k_index: torch.Tensor, dtype: torch.dtype) -> Iterator[ExpertChunk]:
        """The routing, sorted by expert once, cut into the chunks that run one after the other."""
        raise NotImplementedError

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
        inference = not torch.is_grad_enabled()  # inside the autograd function grad mode is always off
        return _DispatchFunction.apply(hidden_states, top_k_weights, top_k_index, self, spec, inference, *tensors)

    def sorted_routing(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flattened (token, k) rows sorted by expert (stable), and each expert's row count (an index >= E
        sorts last and counts for none)."""
        _, order = torch.sort(top_k_index.reshape(-1), stable=True)
        return order, expert_counts(top_k_index, self.num_experts)

    def chunk_forward(
        self,
        chunk: ExpertChunk,
        hidden_states: torch.Tensor,
        flat_weights: torch.Tensor,
        lora: dict[str, LoraFactors],
        inference: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's (token, expert) pairs in sorted order: their weighted outputs `(rows, H)`, and what backward
        needs besides the weights and the inputs: the gate_up output `h` `(rows, 2I)`. `inference`: no backward
        follows (`fused_projection` may run)."""
        x = hidden_states[chunk.tokens]
        h = self.projection("gate_up", x, chunk, lora, inference)
        gate, up = h.chunk(2, dim=-1)
        y = self.projection("down", self.act_fn(gate) * up, chunk, lora, inference)
        return y.mul_(flat_weights[chunk.rows, None].to(y.dtype)), h

    def projection(
        self, name: str, x: torch.Tensor, chunk: ExpertChunk, lora: dict[str, LoraFactors], inference: bool = False
    ) -> torch.Tensor:
        """`x` (the chunk's rows) through projection `name` of each row's expert, plus its LoRA."""
        out = self.fused_projection(name, x, chunk) if inference else None
        if out is None:
            weight = self.chunk_weight(name, chunk, x.dtype)
            out = grouped_linear(x, weight, chunk.offsets)
            del weight  # never kept: backward takes it again
        if self.has_bias:
            out.add_(self.expert_bias(name)[chunk.expanded].to(out.dtype))
        delta = self.lora_branch(name, x, chunk, lora)
        return out if delta is None else out.add_(delta)  # in place: the autograd function's forward records nothing

    def lora_branch(
        self,
        name: str,
        x: torch.Tensor,
        chunk: ExpertChunk,
        lora: dict[str, LoraFactors],
        selected: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor | None:
        """Projection `name`'s LoRA delta for the chunk's rows `x`, or None without LoRA there; `selected`: the
        chunk's experts' own factors, by projection (backward's per-chunk leaves)."""
        if name not in lora:
            return None
        own = selected[name] if selected is not None else None
        return lora_delta(x, lora[name], self.num_experts, chunk.offsets, chunk.experts, own)

    def fused_projection(self, name: str, x: torch.Tensor, chunk: ExpertChunk) -> torch.Tensor | None:
        """Without autograd, projection `name` of the chunk's rows `x` `(rows, out)` by a kernel that reads the
        stored (packed) weights without dequantizing them, or None where `weight` and a grouped GEMM should run (the
        default)."""
        return None

    def input_grad(self, name: str, grad: torch.Tensor, chunk: ExpertChunk) -> torch.Tensor:
        """The gradient of projection `name`'s input from its output's `grad`, through the frozen weights."""
        weight = self.chunk_weight(name, chunk, grad.dtype)
        return grouped_linear(grad, weight.transpose(-2, -1), chunk.offsets)


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


class _DispatchFunction(torch.autograd.Function):
    """Forward without keeping any chunk's weights; backward takes each chunk's weights again for the input
    gradients. The activation backward needs (each chunk's gate_up output) is saved like any layer's (gradient
    checkpointing discards and recomputes it), so no GEMM with the base weights is rerun."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_states: torch.Tensor,
        top_k_weights: torch.Tensor,
        top_k_index: torch.Tensor,
        module: ExpertDispatch,
        spec: tuple[tuple[str, float, nn.Module | None], ...],
        inference: bool,
        *lora: torch.Tensor,
    ) -> torch.Tensor:
        ctx.module, ctx.spec, ctx.num_lora = module, spec, len(lora)
        ctx.rng = _rng_state(hidden_states.device)  # LoRA dropout masks are redrawn identically in backward
        output = torch.zeros_like(hidden_states)
        flat_weights = top_k_weights.reshape(-1)
        factors = _factors(spec, lora)
        activations = []
        for chunk in module.chunks(top_k_index, hidden_states.dtype):
            out, h = module.chunk_forward(chunk, hidden_states, flat_weights, factors, inference)
            output.index_add_(0, chunk.tokens, out)
            activations.append(h)
        ctx.save_for_backward(hidden_states, top_k_weights, top_k_index, *lora, *activations)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden_states, top_k_weights, top_k_index, *saved = ctx.saved_tensors
        lora, activations = saved[: ctx.num_lora], saved[ctx.num_lora :]
        module: ExpertDispatch = ctx.module
        needs = ctx.needs_input_grad
        factors = _factors(ctx.spec, lora)
        # Each chunk's LoRA gradients are taken on that chunk's own factors (leaves of shape (n, r, in) and
        # (n, out, r)) and added into expert-major full gradients here (through the selection from peft's layout,
        # autograd would build and add a full-size gradient per chunk); peft's layout is restored once at the end.
        lora_grads = [
            _expert_major_zeros(t, module.num_experts, is_b=i % 2 == 1) if need else None
            for i, (t, need) in enumerate(zip(lora, needs[6:], strict=True))
        ]
        backprop = needs[0] or any(needs[6:])  # anything besides the routing weights' gradient
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
                        dots += _row_dots(grad_rows, module.expert_bias("down")[chunk.expanded].to(grad_rows.dtype))
                    grad_weights[chunk.rows] = dots.to(grad_weights.dtype)
                if not backprop:
                    continue
                grad_inner.mul_(row_weights)
                grad_y = grad_rows.mul_(row_weights)
                _backward([inner, lora_down], [grad_inner, grad_y], [h, *selected.get("down", ())])
                if lora_gate_up is not None:
                    _backward([lora_gate_up], [h.grad], [x, *selected.get("gate_up", ())])
                _add_chunk_grads(selected, factors, chunk.experts, lora_grads)
                if grad_hidden is not None:
                    grad_x = module.input_grad("gate_up", h.grad, chunk)
                    grad_hidden.index_add_(0, chunk.tokens, grad_x if x.grad is None else grad_x.add_(x.grad))
        grad_weights = grad_weights.view_as(top_k_weights) if grad_weights is not None else None
        lora_grads = [
            _peft_layout(grad, is_b=i % 2 == 1) if grad is not None else None for i, grad in enumerate(lora_grads)
        ]
        return (grad_hidden, grad_weights, None, None, None, None, *lora_grads)


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a * b).sum(-1)` of two `(rows, n)` tensors. (`vecdot` rather than a batch of `(1, n) @ (n, 1)` products:
    on the CPU that `bmm` ran 2-7x slower in bfloat16 and up to 3x in float32 at a chunk's sizes.)"""
    return torch.linalg.vecdot(a, b)


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
    experts: torch.Tensor,
    grads: list[torch.Tensor | None],
) -> None:
    """Add the chunk leaves' gradients `(n, r, in)` / `(n, out, r)` into the expert-major full gradients."""
    for i, name in enumerate(factors):
        (a, b), grad_a, grad_b = selected[name], grads[2 * i], grads[2 * i + 1]
        if grad_a is not None and a.grad is not None:
            grad_a.index_add_(0, experts, a.grad)
        if grad_b is not None and b.grad is not None:
            grad_b.index_add_(0, experts, b.grad)


def _expert_major_zeros(factor: torch.Tensor, num_experts: int, is_b: bool) -> torch.Tensor:
    """A zero gradient for a LoRA factor in peft's layout, held expert-major while backward adds each chunk's
    experts into it: `(E, r, in)` for A, `(E, out, r)` for B. (B's peft layout has the expert index fastest in its
    columns, so adding into a permuted view of it copies the whole factor in and out on every chunk.)"""
    if is_b:
        out_dim, columns = factor.shape
        return factor.new_zeros(num_experts, out_dim, columns // num_experts)
    return factor.new_zeros(num_experts, factor.shape[0] // num_experts, factor.shape[1])


def _peft_layout(grad: torch.Tensor, is_b: bool) -> torch.Tensor:
    """The inverse of `_expert_major_zeros`: A `(E * r, in)`, B `(out, E * r)` with column `j * E + e`."""
    if is_b:
        return grad.permute(1, 2, 0).reshape(grad.shape[1], -1)
    return grad.view(-1, grad.shape[-1])


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


__all__ = ["PROJECTIONS", "ExpertChunk", "ExpertDispatch", "LoraFactors", "fused_experts", "lora_delta"]
