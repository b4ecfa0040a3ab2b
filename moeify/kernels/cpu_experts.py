"""moeify's experts implementation, `experts_implementation="moeify"` in transformers' experts interface.

On the CPU, a block whose `(rows, 2I)` gate_up output would exceed `CPU_CHUNK_BYTES` (32 MiB), that has
`CPU_PIECEWISE_ROWS` (4096) rows or more, that trains experts of `CPU_PIECEWISE_EXPERT_BYTES` (8 MiB) each or more,
or whose H or I rows are not a multiple of 16 bytes (torch's `grouped_mm` refuses them), runs its tokens, sorted
by expert once, in pieces of one expert's rows, each piece's gate_up output under 32 MiB, as plain GEMMs inside one
autograd function:

- forward keeps each piece's gate_up output for backward and nothing else (transformers' grouped_mm path keeps the
  gathered input, the gate_up output, the activation and its product as separate block-sized tensors);
- backward writes each expert's weight gradient straight into its slice of the `(E, out, in)` gradient (later pieces
  of the same expert add to it) and forms the routing weights' gradient as `<W_down^T grad, act(gate) * up>`,
  recomputing the activation from the kept output;
- the weight gradients, the only block-sized allocations left, are asked for on transparent huge pages (Linux,
  `madvise`): they are new memory every step, written in full, and first-touch faults of 4 KiB pages cost up to a
  third of a step at 64 experts;
- a bfloat16 weight gradient over a few hundred rows gets its left operand copied row-major first: oneDNN's AMX
  matmul ran such products on the transposed view up to 2x slower (`_write_or_add`).

The reason is the CPU allocator rather than the FLOPs (the GEMMs are the same): glibc serves blocks under 32 MiB
from its heap, recycled call after call, while the block-sized temporaries of one grouped call (235 MB at H 1024,
I 3584, 8192 rows) are mapped and page-faulted in afresh on every call. torch's CPU grouped_mm is itself one GEMM
per group, so the Python loop over pieces adds only its call overhead (BENCHMARKS.md). From 4096 rows on,
pieces win even under 32 MiB (reduced precision: bf16 at I 896 / K 2 / 4096 tokens, 29 MB): the grouped path's
gathers are undone in backward by an accumulating `index_put_`, a serial scatter on the CPU. With fewer rows,
pieces still win when the expert weights train and are large (bf16 I 3584, float32 I 896 at H 1024): their fresh
gradients on huge pages save more than the loop over experts costs.

Everything else runs transformers' `grouped_mm` forward, unchanged: smaller blocks (their temporaries are recycled
anyway, and at a few hundred rows one grouped call beats a loop), accelerators (their caching allocators recycle any
size, and the loop would need the counts on the host), `torch.compile`, and layouts this function does not cover
(transposed or interleaved weights, no gate, a custom gate, post-expert norms, expert parallelism). Off the CPU or
under `torch.compile`, sizes `grouped_mm` refuses run the experts class's own (eager) forward instead. Registered on
import; the default of moeify's own models.

`experts_implementation="moeify_grouped"` (opt-in) runs every covered block, on any device, as one autograd function
of grouped GEMMs (`_GroupedExperts`): transformers' grouped_mm forward, but only the `(rows, 2I)` gate_up output kept
for backward, the weight gradients as one K-grouped `grouped_mm` each, and each token's rows summed by gathering
(deterministic) off the CPU. It is the candidate for accelerators, where "moeify" hands over to transformers; on this
CPU it measured about as fast as transformers' grouped_mm, with a lower peak (BENCHMARKS.md).

"""

from __future__ import annotations

import ctypes
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate, grouped_mm_experts_forward

from ..modeling import experts as moe_experts

# Bound as a module and read at call time: `import moeify` registers these kernels as soon as transformers loads its
# MoE integration, which can happen while moeify's modeling files are themselves still importing.

IMPLEMENTATION = "moeify"
GROUPED_IMPLEMENTATION = "moeify_grouped"
CPU_CHUNK_BYTES = 32 << 20  # glibc's largest heap-served block: the most one piece's (rows, 2I) output may take
CPU_PIECEWISE_ROWS = 4096  # from this many (token, expert) rows on, pieces whatever the bytes
CPU_PIECEWISE_EXPERT_BYTES = 8 << 20  # training experts this large (gate_up + down, each): pieces whatever the rows
CPU_ROW_MAJOR_ROWS = 256  # bf16 weight gradients over at most this many rows, with at least
CPU_ROW_MAJOR_COLUMNS = 1024  # this many columns, take their left operand row-major (`_write_or_add`)


def moeify_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts-forward contract: `hidden_states` `(T, H)`, `top_k_index` / `top_k_weights` `(T, k)`
    -> the routing-weighted sum of each token's experts `(T, H)`.

    On the CPU, an index >= E (a MoE++ null expert, an assignment dropped for capacity) is an assignment to no routed
    expert: it adds nothing and costs no GEMM, so the block hands over its whole routing (no compacted copy of the
    routed assignments to gather and scatter back). Elsewhere every index must be < E, as for transformers."""
    routed = _routed_rows(self, hidden_states, top_k_index)
    if routed is None and _covers(self) and not _grouped_mm_aligned(self):
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    if routed is None or not _runs_in_pieces(self, routed):
        if routed is not None and routed < top_k_index.numel():
            grouped = functools.partial(grouped_mm_experts_forward, self)  # it takes every index for an expert
            return moe_experts.routed_only(
                grouped, hidden_states, top_k_index, top_k_weights, self.num_experts, self.parameters()
            )
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    order, offsets, tokens = moe_experts.sort_by_expert(top_k_index, self.num_experts)
    bias_gate_up, bias_down = (self.gate_up_proj_bias, self.down_proj_bias) if self.has_bias else (None, None)
    row_bytes = self.gate_up_proj.shape[1] * self.gate_up_proj.element_size()
    return _PiecewiseExperts.apply(
        hidden_states,
        top_k_weights.reshape(-1)[order],
        tokens,
        _pieces(offsets, row_bytes),
        self.act_fn,
        self.gate_up_proj,
        self.down_proj,
        bias_gate_up,
        bias_down,
        torch.is_grad_enabled(),  # inside `forward` grad mode is always off, and needs_input_grad ignores it
    )


def accepts_unrouted(hidden_states: torch.Tensor) -> bool:
    """Whether this implementation takes an index >= E (an assignment to no routed expert) for `hidden_states`: on
    the CPU outside `torch.compile`, where counting the routed assignments costs no host sync."""
    return hidden_states.device.type == "cpu" and not torch.compiler.is_compiling()


def _routed_rows(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> int | None:
    """Where `accepts_unrouted`, the number of assignments to a routed expert (index < E; the others are MoE++ null
    experts or dropped for capacity); None elsewhere, where every index must be a routed expert."""
    if not accepts_unrouted(hidden_states):
        return None
    return int((top_k_index < experts.num_experts).sum())


def _runs_in_pieces(experts: nn.Module, rows: int) -> bool:
    """Whether `experts` on the CPU (outside `torch.compile`) is a case this function runs itself: fused
    `[gate; up]` `(E, 2I, H)` and `(E, H, I)` floating-point weights with the default gate, and, for its `rows`
    routed assignments, a `(rows, 2I)` gate_up output over `CPU_CHUNK_BYTES`, `CPU_PIECEWISE_ROWS` rows or more, or
    weights that get gradients here and take `CPU_PIECEWISE_EXPERT_BYTES` or more per expert (a smaller block's
    temporaries are recycled from the heap anyway, and one grouped call beats a loop over few rows unless large
    weight gradients are at stake), or sizes `grouped_mm` does not take (`_grouped_mm_aligned`)."""
    if not _covers(experts):
        return False
    weight = experts.gate_up_proj
    return (
        not _grouped_mm_aligned(experts)
        or rows >= CPU_PIECEWISE_ROWS
        or rows * weight.shape[1] * weight.element_size() > CPU_CHUNK_BYTES
        or (
            torch.is_grad_enabled()
            and weight.requires_grad
            and (weight[0].numel() + experts.down_proj[0].numel()) * weight.element_size() >= CPU_PIECEWISE_EXPERT_BYTES
        )
    )


def _grouped_mm_aligned(experts: nn.Module) -> bool:
    """Whether torch's `grouped_mm` takes `experts`' sizes: rows of its operands (H and I elements) a multiple of 16
    bytes. transformers' grouped_mm path fails on others (e.g. I 12 in bfloat16); the pieces' plain GEMMs take any."""
    sizes = experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1]
    return moe_experts.grouped_mm_takes(sizes, experts.gate_up_proj.element_size())


def _eager_forward(experts: nn.Module) -> Callable[..., torch.Tensor]:
    """The experts class's own forward (its `"eager"` implementation): where the pieces do not run (accelerators,
    `torch.compile`) and torch's `grouped_mm` refuses the sizes (`_grouped_mm_aligned`), which transformers' path
    would hand to it. transformers' `use_experts_implementation` wraps the original forward with `functools.wraps`,
    so unwrapping (through every such wrapper, for a subclass decorated again) gives it; a class without one keeps
    transformers' grouped_mm path."""
    forward = type(experts).forward
    return inspect.unwrap(forward) if hasattr(forward, "__wrapped__") else grouped_mm_experts_forward


def _covers(experts: nn.Module) -> bool:
    """Whether moeify's own dispatches cover `experts`' layout: fused `[gate; up]` `(E, 2I, H)` and `(E, H, I)`
    floating-point weights with the default gate, no post-expert norm, no expert parallelism."""
    weight = getattr(experts, "gate_up_proj", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype.is_floating_point
        and weight.ndim == 3
        and getattr(experts, "has_gate", True)
        and getattr(experts, "is_concatenated", True)
        and not getattr(experts, "is_transposed", False)
        and not getattr(experts, "has_post_expert_norm", False)
        and not getattr(experts, "_is_expert_parallel", False)
        and getattr(type(experts), "_apply_gate", _default_apply_gate) is _default_apply_gate
    )


def _pieces(offsets: torch.Tensor, row_bytes: int) -> list[tuple[int, int, int]]:
    """`(expert, first row, end row)`: each expert's sorted rows, split into as few near-equal pieces as keep every
    piece's gate_up output under `CPU_CHUNK_BYTES` (one row at least); experts without rows have none."""
    most = max(1, CPU_CHUNK_BYTES // row_bytes)
    pieces, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        count = -(-(end - start) // most)
        if not count:
            continue
        bounds = [start + (end - start) * i // count for i in range(count + 1)]
        pieces += [(expert, first, last) for first, last in zip(bounds[:-1], bounds[1:], strict=True)]
        start = end
    return pieces


class _PiecewiseExperts(torch.autograd.Function):
    """The experts on rows sorted by expert (`tokens[j]`: the token of row j, `weights[j]`: its routing weight), one
    piece of one expert's rows at a time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_states: torch.Tensor,
        weights: torch.Tensor,
        tokens: torch.Tensor,
        pieces: list[tuple[int, int, int]],
        act_fn: nn.Module,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        bias_gate_up: torch.Tensor | None,
        bias_down: torch.Tensor | None,
        recording: bool,
    ) -> torch.Tensor:
        dtype, inner = gate_up.dtype, down.shape[-1]
        # Reduced precision sums each token's k expert outputs in float32, rounding once (as transformers does).
        output = torch.zeros(hidden_states.shape, dtype=_accumulation_dtype(hidden_states.dtype))
        keep = recording and any(ctx.needs_input_grad)  # under no_grad (generation, a checkpoint's first pass): none
        gate_up_outputs = []
        for expert, start, end in pieces:
            rows = tokens[start:end]
            projected = hidden_states[rows].to(dtype) @ gate_up[expert].T
            if bias_gate_up is not None:
                projected += bias_gate_up[expert]
            out = (act_fn(projected[:, :inner]) * projected[:, inner:]) @ down[expert].T
            if bias_down is not None:
                out += bias_down[expert]
            output.index_add_(0, rows, out.mul_(weights[start:end, None].to(dtype)).to(output.dtype))
            if keep:
                gate_up_outputs.append(projected)
        ctx.pieces, ctx.act_fn = pieces, act_fn
        ctx.save_for_backward(hidden_states, weights, tokens, gate_up, down, bias_gate_up, bias_down, *gate_up_outputs)
        return output.to(hidden_states.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_states, weights, tokens, gate_up, down, bias_gate_up, bias_down, *gate_up_outputs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dtype, inner = gate_up.dtype, down.shape[-1]
        grad_input = (
            torch.zeros(hidden_states.shape, dtype=_accumulation_dtype(hidden_states.dtype)) if needs[0] else None
        )
        grad_weights = torch.zeros_like(weights) if needs[1] else None
        # An expert's first piece writes its weight-gradient slice, later pieces add to it; experts without rows
        # are zeroed at the end (no zero-fill of the whole gradient first).
        grad_gate_up = _empty_on_huge_pages(gate_up) if needs[5] else None
        grad_down = _empty_on_huge_pages(down) if needs[6] else None
        grad_bias_gate_up = torch.zeros_like(bias_gate_up) if bias_gate_up is not None and needs[7] else None
        grad_bias_down = torch.zeros_like(bias_down) if bias_down is not None and needs[8] else None
        written: set[int] = set()
        for (expert, start, end), projected in zip(ctx.pieces, gate_up_outputs, strict=True):
            rows, weight = tokens[start:end], weights[start:end, None].to(dtype)
            gate_leaf, activated, up = _recomputed_activation(ctx.act_fn, projected, inner)
            grad_out = grad_output[rows].to(dtype)  # the gradient of the weighted output, before the weight
            grad_inner = grad_out @ down[expert]  # W_down^T grad: the unweighted gradient of act(gate) * up
            inner_out = activated.detach() * up
            if grad_weights is not None:  # <grad, W_down a + b>, without keeping the (rows, H) expert output
                dots = (grad_inner * inner_out).sum(-1)
                if bias_down is not None:
                    dots += grad_out @ bias_down[expert]
                grad_weights[start:end] = dots.to(weights.dtype)
            weighted_grad_out = grad_out.mul_(weight)
            first = expert not in written
            written.add(expert)
            if grad_down is not None:
                _write_or_add(grad_down[expert], weighted_grad_out.T, inner_out, first)
            if grad_bias_down is not None:
                grad_bias_down[expert] += weighted_grad_out.sum(0)
            grad_projected = _gate_up_grad(grad_inner.mul_(weight), gate_leaf, activated, up)
            if grad_gate_up is not None:
                _write_or_add(grad_gate_up[expert], grad_projected.T, hidden_states[rows].to(dtype), first)
            if grad_bias_gate_up is not None:
                grad_bias_gate_up[expert] += grad_projected.sum(0)
            if grad_input is not None:
                grad_input.index_add_(0, rows, (grad_projected @ gate_up[expert]).to(grad_input.dtype))
        for grad in (grad_gate_up, grad_down):
            if grad is not None:
                for expert in set(range(grad.shape[0])) - written:
                    grad[expert].zero_()
        grad_hidden = grad_input.to(hidden_states.dtype) if grad_input is not None else None
        grads = grad_gate_up, grad_down, grad_bias_gate_up, grad_bias_down
        return grad_hidden, grad_weights, None, None, None, *grads, None


def moeify_grouped_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`experts_implementation="moeify_grouped"`: every routed row in grouped GEMMs inside one autograd function
    (`_GroupedExperts`), on any device. Where that does not apply it is `"moeify"` (`moeify_experts_forward`): layouts
    it does not cover (`_covers`), sizes torch's `grouped_mm` refuses (`_grouped_mm_aligned`), and where it does not
    run (`grouped_mm_runs`). Same contract as `moeify_experts_forward`, including indices >= E on the CPU."""
    if not _covers(self) or not _grouped_mm_aligned(self) or not moe_experts.grouped_mm_runs(hidden_states.device):
        return moeify_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _grouped(self, hidden_states, top_k_index, top_k_weights, _routed_rows(self, hidden_states, top_k_index))


def _grouped(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    routed: int | None,
) -> torch.Tensor:
    """`_GroupedExperts` on `experts`; `routed`: the number of assignments to a routed expert where known (the
    CPU), None where every index is one."""
    order, offsets, tokens = moe_experts.sort_by_expert(top_k_index, experts.num_experts)
    inverse = None  # where each token's rows are gathered back together (see `_sum_per_token`)
    if routed is not None and routed < order.numel():  # the rest (index >= E) sort last and add nothing
        order, tokens = order[:routed], tokens[:routed]
    elif _sums_by_gathering(hidden_states.device):
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
    bias_gate_up, bias_down = (experts.gate_up_proj_bias, experts.down_proj_bias) if experts.has_bias else (None, None)
    return _GroupedExperts.apply(
        hidden_states,
        top_k_weights.reshape(-1)[order],
        tokens,
        offsets,
        top_k_index.reshape(-1)[order] if experts.has_bias else None,
        inverse,
        experts.act_fn,
        experts.gate_up_proj,
        experts.down_proj,
        bias_gate_up,
        bias_down,
    )


class _GroupedExperts(torch.autograd.Function):
    """All experts at once on rows sorted by expert (`tokens[j]`: the token of row j, `weights[j]`: its routing
    weight, `offsets`: cumulative rows per expert), as grouped GEMMs: `grouped_mm` forward and for the input
    gradient, and K-grouped `grouped_mm(grad.T, rows)` for the `(E, out, in)` weight gradients, one call each.

    Against transformers' `grouped_mm` forward under autograd it keeps only the `(rows, 2I)` gate_up output for
    backward (transformers' path keeps the gathered input, the activation, its product and the expert output too;
    the input is gathered again and the activation recomputed here), multiplies the routing weights into the
    gradients instead of keeping the unweighted output, and forms their gradient from backward's own products.
    Sums of each token's rows: `index_add_` into a float32 sum on the CPU (a parallel scatter there); elsewhere,
    where `index_add_` of floats uses atomics (not deterministic), each token's `k` rows are gathered back and
    summed (`inverse`), as transformers does."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_states: torch.Tensor,
        weights: torch.Tensor,
        tokens: torch.Tensor,
        offsets: torch.Tensor,
        expert_ids: torch.Tensor | None,
        inverse: torch.Tensor | None,
        act_fn: nn.Module,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        bias_gate_up: torch.Tensor | None,
        bias_down: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype, inner = gate_up.dtype, down.shape[-1]
        rows = hidden_states[tokens].to(dtype)
        projected = F.grouped_mm(rows, gate_up.transpose(-2, -1), offs=offsets)
        if bias_gate_up is not None:
            projected += bias_gate_up[expert_ids]
        out = F.grouped_mm(act_fn(projected[:, :inner]) * projected[:, inner:], down.transpose(-2, -1), offs=offsets)
        if bias_down is not None:
            out += bias_down[expert_ids]
        out.mul_(weights[:, None].to(dtype))
        ctx.act_fn = act_fn
        saved = hidden_states, weights, tokens, offsets, expert_ids, inverse, gate_up, down, bias_down, projected
        ctx.save_for_backward(*saved)
        return _sum_per_token(out, tokens, inverse, hidden_states)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_states, weights, tokens, offsets, expert_ids, inverse, gate_up, down, bias_down, projected = (
            ctx.saved_tensors
        )
        needs = ctx.needs_input_grad
        dtype, inner = gate_up.dtype, down.shape[-1]
        weight = weights[:, None].to(dtype)
        gate_leaf, activated, up = _recomputed_activation(ctx.act_fn, projected, inner)
        grad_out = grad_output[tokens].to(dtype)  # the gradient of the weighted output, before the weight
        grad_inner = F.grouped_mm(grad_out, down, offs=offsets)  # W_down^T grad: unweighted, of act(gate) * up
        inner_out = activated.detach() * up
        grad_weights = None
        if needs[1]:  # <grad, W_down a + b>, without keeping the (rows, H) expert output
            dots = torch.linalg.vecdot(grad_inner, inner_out)
            if bias_down is not None:
                dots += torch.linalg.vecdot(grad_out, bias_down[expert_ids])
            grad_weights = dots.to(weights.dtype)
        weighted_grad_out = grad_out.mul_(weight)
        grad_down = F.grouped_mm(weighted_grad_out.T, inner_out, offs=offsets) if needs[8] else None
        grad_bias_down = _sum_per_expert(weighted_grad_out, expert_ids, len(down)) if needs[10] else None
        del grad_out, weighted_grad_out, inner_out  # each (rows, H) or (rows, I): freed as soon as done with
        grad_projected = _gate_up_grad(grad_inner.mul_(weight), gate_leaf, activated, up)
        del grad_inner, activated, gate_leaf
        grad_hidden = None
        if needs[0]:  # before the gate_up gradient: its (rows, H) products are freed first
            grad_hidden = _sum_per_token(
                F.grouped_mm(grad_projected, gate_up, offs=offsets), tokens, inverse, hidden_states
            )
        grad_gate_up = None
        if needs[7]:
            grad_gate_up = F.grouped_mm(grad_projected.T, hidden_states[tokens].to(dtype), offs=offsets)
        grad_bias_gate_up = _sum_per_expert(grad_projected, expert_ids, len(gate_up)) if needs[9] else None
        grads = grad_gate_up, grad_down, grad_bias_gate_up, grad_bias_down
        return grad_hidden, grad_weights, None, None, None, None, None, *grads


def _sums_by_gathering(device: torch.device) -> bool:
    """Whether each token's rows are summed by gathering them together (deterministic) rather than `index_add_`:
    off the CPU, where `index_add_` of floats uses atomics."""
    return device.type != "cpu"


def _sum_per_token(
    rows: torch.Tensor, tokens: torch.Tensor, inverse: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """Each token's sum of its `rows` (sorted by expert, `tokens[j]` the token of row j), in float32 for reduced
    precision, as `like`'s dtype and shape: `index_add_` where `inverse` is None; otherwise `inverse` (the position
    in the sorted rows of each flattened `(token, k)` assignment) gathers each token's k rows together."""
    accumulation = _accumulation_dtype(like.dtype)
    if inverse is None:
        total = torch.zeros(like.shape, dtype=accumulation, device=like.device)
        return total.index_add_(0, tokens, rows.to(accumulation)).to(like.dtype)
    gathered = rows.index_select(0, inverse).view(like.shape[0], -1, like.shape[-1])
    return gathered.sum(1, dtype=accumulation).to(like.dtype)


def _sum_per_expert(rows: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A bias gradient `(E, out)`: the sum of each expert's `rows` (`expert_ids[j]`: the expert of row j)."""
    total = torch.zeros(num_experts, rows.shape[-1], dtype=_accumulation_dtype(rows.dtype), device=rows.device)
    return total.index_add_(0, expert_ids, rows.to(total.dtype)).to(rows.dtype)


def _recomputed_activation(
    act_fn: nn.Module, projected: torch.Tensor, inner: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a kept gate_up output `[gate; up]` `(rows, 2I)`: the gate as a fresh leaf, `act(gate)` recorded on it
    (any activation gets its own backward), and `up`."""
    with torch.enable_grad():
        gate_leaf = projected[:, :inner].detach().requires_grad_()
        activated = act_fn(gate_leaf)
    return gate_leaf, activated, projected[:, inner:]


def _gate_up_grad(
    grad_inner: torch.Tensor, gate_leaf: torch.Tensor, activated: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    """The gradient `(rows, 2I)` of the gate_up output from the gradient of `act(gate) * up` (`grad_inner`, which
    is overwritten), written into one tensor: `[grad * up * act'(gate); grad * act(gate)]`."""
    inner = up.shape[-1]
    grad_projected = grad_inner.new_empty(len(grad_inner), 2 * inner)
    torch.mul(grad_inner, activated.detach(), out=grad_projected[:, inner:])
    (grad_projected[:, :inner],) = torch.autograd.grad(activated, gate_leaf, grad_inner.mul_(up))
    return grad_projected


def _write_or_add(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, first: bool) -> None:
    """`target = left @ right` for an expert's first piece, `target += left @ right` after (no temporary).

    `left` is the transpose of a `(rows, out)` tensor. In bfloat16, over at most `CPU_ROW_MAJOR_ROWS` rows and into
    at least `CPU_ROW_MAJOR_COLUMNS` columns, it is first copied into row-major `(out, rows)` memory: oneDNN's AMX
    matmul on a transposed source ran these short inner-dimension products (a weight gradient over a few hundred
    rows) up to 2x slower than on a row-major one, more than the copy costs (`benchmarks/weight_grad_layout.py`).
    Written by hand because torch picks no layout for its callers; float32, more rows and fewer columns (where the
    copy weighs more against the product) measured no gain."""
    if left.stride(0) == 1 and _row_major_pays(left.dtype, left.shape[1], right.shape[1]):
        row_major = torch.empty(left.shape, dtype=left.dtype, device=left.device)
        row_major.T.copy_(left.T)  # written through its transpose: a faster copy than `left.contiguous()` here
        left = row_major
    if first:
        torch.mm(left, right, out=target)
    else:
        target.addmm_(left, right)


def _row_major_pays(dtype: torch.dtype, rows: int, columns: int) -> bool:
    """Whether a weight gradient `(out, rows) @ (rows, columns)` gets its left operand copied row-major
    (`_write_or_add`; `benchmarks/weight_grad_layout.py` measures the rule)."""
    return dtype == torch.bfloat16 and rows <= CPU_ROW_MAJOR_ROWS and columns >= CPU_ROW_MAJOR_COLUMNS


def _empty_on_huge_pages(like: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like(like)` with its memory advised for transparent huge pages (`MADV_HUGEPAGE`) before anything
    touches it, where Linux offers them; otherwise, or if the kernel refuses, plain `torch.empty_like`.

    Written by hand because torch offers it only process-wide (`THP_MEM_ALLOC_ENABLE=1`, every allocation): here it
    is one tensor we know is fresh (glibc maps blocks over 32 MiB anew per call) and written in full, so 2 MiB pages
    cost no extra memory and replace 512 page faults each."""
    tensor = torch.empty_like(like)
    madvise = _madvise()
    if madvise is not None:
        start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (tensor.data_ptr() + tensor.untyped_storage().nbytes()) // _HUGE_PAGE * _HUGE_PAGE
        if end - start >= _HUGE_PAGE:
            madvise(start, end - start, _MADV_HUGEPAGE)  # a refusal (no THP in this kernel) leaves 4 KiB pages
    return tensor


_HUGE_PAGE = 2 << 20  # a PMD page on x86-64 and arm64 with 4 KiB pages; elsewhere the advice applies to fewer bytes
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's `madvise` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# The MoE block of moeify's models hands such an implementation the whole routing, null experts included.
moeify_experts_forward.accepts_unrouted = accepts_unrouted  # type: ignore[attr-defined]
moeify_grouped_experts_forward.accepts_unrouted = accepts_unrouted  # type: ignore[attr-defined]


def register() -> None:
    """`experts_implementation="moeify"` and `"moeify_grouped"` in transformers' experts interface (`import moeify`
    calls this once transformers' MoE integration is loaded)."""
    ExpertsInterface.register(IMPLEMENTATION, moeify_experts_forward)
    ExpertsInterface.register(GROUPED_IMPLEMENTATION, moeify_grouped_experts_forward)
