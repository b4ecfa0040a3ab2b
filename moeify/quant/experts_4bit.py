"""Routed experts stored in 4-bit (bitsandbytes NF4 / FP4), with optional per-expert LoRA, for training.

`Experts4bit` replaces a model's `*.experts` module (moeify's, Mixtral's, Qwen-MoE's: fused `gate_up_proj`
`(E, 2I, H)` and `down_proj` `(E, H, I)`) and keeps its call contract
`(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`.

Storage: each expert is quantized on its own (its blocks never cross into another expert), so the experts a
batch uses are sliced out of the packed bytes and dequantized in one bitsandbytes call. The packed bytes are a
frozen parameter viewed as a float dtype (FSDP shards float parameters); scales are small buffers.

Computation (`moeify.quant.dispatch.ExpertDispatch`): tokens are sorted by expert once; only experts that received
tokens are dequantized, in chunks of at most `max_dequantized_bytes` (default: 48 MiB on the CPU, 1 GiB on
accelerators, see `moeify.quant.config`), each chunk as grouped GEMMs with its experts' LoRA on their own rows. The
dequantized weights are never kept: backward dequantizes each chunk again for the input gradient. The 4-bit base is
frozen.

Generation on a CPU with AVX512-BF16 (no autograd, bfloat16, a few rows per expert: `cpu_fused_rows`) skips the
dequantization: bitsandbytes' fused 4-bit kernel (`gemv_4bit`, what its own `Linear4bit` runs there in eval mode)
multiplies each expert's rows by its packed weights directly, 3-6x faster than dequantizing an expert for one row.
It reads its own layout of the packed weights, converted by bitsandbytes on first use and kept beside the stored one
until the weights change or the module goes back to training mode (`train()`).
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from collections.abc import Callable, Iterator

import bitsandbytes.functional as bnb_functional
import torch
from bitsandbytes.cextension import BNBNativeLibrary
from bitsandbytes.cextension import lib as bnb_lib
from bitsandbytes.functional import QuantState
from torch import nn

from .config import CPU_FUSED_LAYOUT_BYTES, ExpertQuantization
from .dispatch import PROJECTIONS, ExpertChunk, ExpertDispatch, fused_experts

_NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the scales of double quantization


class Experts4bit(ExpertDispatch):
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
        # Projection -> (packed (E, out, in / 2) uint8, scales (E, in / blocksize, out) bf16) in the layout of
        # bitsandbytes' fused CPU kernel (`fused_projection`); built on first use, dropped when the weights change.
        self._cpu_fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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
        self._drop_fused_layout()
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

    def absmax(self, name: str, experts: torch.Tensor | slice, ids: list[int] | None = None) -> torch.Tensor:
        """The float32 scales of `experts` (indices or a slice; `ids`: the same indices on the host, if known) for
        projection `name`, `(experts, blocks)`."""
        absmax = _select(getattr(self, f"{name}_absmax"), experts)
        if not self.quantization.double_quant:
            return absmax
        nested, offset = getattr(self, f"{name}_nested_absmax"), getattr(self, f"{name}_offset")
        if absmax.shape[-1] % _NESTED_BLOCKSIZE == 0:
            # Each expert's scales fill whole nested blocks, so the experts' rows side by side are one tensor that
            # bitsandbytes dequantizes in one call; each expert's offset is added after.
            state = QuantState(
                absmax=_select(nested, experts).reshape(-1),
                code=self.nested_code,
                blocksize=_NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            scales = bnb_functional.dequantize_blockwise(absmax.reshape(-1), state).view_as(absmax)
            return scales + _select(offset, experts)[:, None]
        rows = []
        if ids is None:
            ids = list(range(self.num_experts)[experts]) if isinstance(experts, slice) else experts.tolist()
        for row, expert in zip(absmax, ids, strict=True):
            state = QuantState(
                absmax=nested[expert], code=self.nested_code, blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32
            )
            rows.append(bnb_functional.dequantize_blockwise(row, state) + offset[expert])
        return torch.stack(rows)

    def dequantize(
        self,
        name: str,
        experts: torch.Tensor | slice,
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
        ids: list[int] | None = None,
    ) -> torch.Tensor:
        """Weights of `experts` (indices, or a slice: no gather of the packed bytes) for projection `name`,
        `(experts, out, in)`, in one bitsandbytes call; written into `out` (a CPU tensor of `dtype` with at least
        that many elements) where bitsandbytes' CPU kernel can take it, else a new tensor."""
        out_dim, in_dim = self.shapes[name]
        # Selected in the storage dtype, then seen as bytes (bitsandbytes reads uint8).
        packed = _select(getattr(self, f"{name}_packed"), experts).view(torch.uint8)
        absmax = self.absmax(name, experts, ids).reshape(-1)
        shape = (len(packed), out_dim, in_dim)
        if out is not None:
            out = out[: len(packed) * out_dim * in_dim]
            if out.dtype == dtype and _dequantize_4bit_cpu_into(packed, absmax, self.quantization, out, in_dim):
                return out.view(shape)
        state = QuantState(
            absmax=absmax,
            shape=torch.Size([len(packed) * out_dim, in_dim]),
            code=self.code,
            blocksize=self.quantization.blocksize,
            quant_type=self.quantization.quant_type,
            dtype=dtype,
        )
        return bnb_functional.dequantize_4bit(packed.reshape(-1, 1), state).view(shape)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Experts4bit:
        # `model.to(dtype)`, `.half()`, `from_pretrained(dtype=...)` cast every float tensor: the packed bytes and
        # the scales must only move between devices, never be cast.
        storage = {
            name: tensors.pop(name)
            for tensors in (self._parameters, self._buffers)
            for name in [n for n in tensors if n not in self._castable]
        }
        super()._apply(fn, recurse)
        self._drop_fused_layout()  # rebuilt from the moved storage if needed
        for name, tensor in storage.items():
            device = fn(torch.empty(0, device=tensor.device)).device
            tensor.data = tensor.data.to(device)
            (self._parameters if isinstance(tensor, nn.Parameter) else self._buffers)[name] = tensor
        return self

    @property
    def _castable(self) -> set[str]:
        """Tensors that follow the model's dtype: the biases."""
        return {f"{p}_bias" for p in PROJECTIONS}

    # Computation (the rest is `ExpertDispatch`'s).

    def chunk_weight(self, name: str, chunk: ExpertChunk, dtype: torch.dtype) -> torch.Tensor:
        """The chunk's experts dequantized; on the CPU into the call's workspace, one buffer that every chunk and both
        projections reuse (each product is done before the next weights are taken, so the dequantized weights never
        exceed one chunk's gate_up part). A fresh block of this size is often mapped anew by the C allocator and
        faulted in page by page: in place, that nearly doubled bitsandbytes' dequantization time at E 8 / I 3584 /
        256 tokens (BENCHMARKS.md)."""
        if chunk.experts.device.type != "cpu":
            return self.dequantize(name, chunk.selector, dtype, ids=chunk.ids)  # the caching allocator reuses blocks
        numel = len(chunk.experts) * max(out_dim * in_dim for out_dim, in_dim in self.shapes.values())
        buffer = chunk.workspace.get("weights")
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = chunk.workspace["weights"] = torch.empty(numel, dtype=dtype)
        return self.dequantize(name, chunk.selector, dtype, out=buffer, ids=chunk.ids)

    def expert_bias(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_bias")

    def fused_projection(self, name: str, x: torch.Tensor, chunk: ExpertChunk) -> torch.Tensor | None:
        """Projection `name` of the chunk's rows by bitsandbytes' fused 4-bit CPU kernel, expert by expert, where it
        is faster than dequantizing: bfloat16 rows on a CPU with AVX512-BF16 (the only case bitsandbytes registers
        it for), at most `cpu_fused_rows` of them per expert; else None. Called without autograd only."""
        limit = self.quantization.cpu_fused_rows
        if not limit or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not _cpu_fused_kernel():
            return None
        counts = chunk.counts.tolist()
        if max(counts) > limit:
            return None
        layout = self._cpu_fused_layout(name)
        if layout is None:
            return None
        packed, scales = layout
        out = x.new_empty(len(x), self.shapes[name][0])
        start = 0
        for expert, count in zip(chunk.ids or chunk.experts.tolist(), counts, strict=True):
            state = self._cpu_fused_state(name, scales[expert])
            out[start : start + count] = bnb_functional.gemv_4bit(x[start : start + count], packed[expert], state=state)
            start += count
        return out

    def _cpu_fused_layout(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Projection `name`'s experts in the fused CPU kernel's layout, built once; None where bitsandbytes cannot
        convert them (its converter takes output sizes in multiples of 32 and is private API: absent, no fusing).

        bitsandbytes' own converter, expert by expert, rather than ours: the layout is its kernel's, and whatever a
        new release changes in one it changes in the other."""
        layout = self._cpu_fused.get(name)
        convert = getattr(bnb_functional, "_convert_weight_packed_for_cpu", None)
        if layout is not None or convert is None or self.shapes[name][0] % 32:
            return layout
        packed = getattr(self, f"{name}_packed").view(torch.uint8)
        scales_bytes = (
            self.num_experts * (self.shapes[name][0] * self.shapes[name][1] // self.quantization.blocksize) * 2
        )
        if fused_layout_bytes() + packed.numel() + scales_bytes > CPU_FUSED_LAYOUT_BYTES:
            return None  # over the process's budget: this layer dequantizes instead
        _LAYOUT_HOLDERS.add(self)
        scales = self.absmax(name, slice(None))  # float32 (E, blocks), double quantization undone
        experts = []
        for expert in range(self.num_experts):
            weight, state = convert(packed[expert], self._cpu_fused_state(name, scales[expert]))
            experts.append((weight, state.absmax))
        layout = self._cpu_fused[name] = (
            torch.stack([weight for weight, _ in experts]),
            torch.stack([absmax for _, absmax in experts]),
        )
        return layout

    def _drop_fused_layout(self) -> None:
        self._cpu_fused.clear()
        _LAYOUT_HOLDERS.discard(self)

    def _fused_layout_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self._cpu_fused.values() for t in pair)

    def _cpu_fused_state(self, name: str, absmax: torch.Tensor) -> QuantState:
        """bitsandbytes' description of one expert's matrix of projection `name` with scales `absmax`, computing in
        bfloat16 (the fused CPU kernel's only dtype)."""
        return QuantState(
            absmax=absmax,
            shape=torch.Size(self.shapes[name]),
            code=self.code,
            blocksize=self.quantization.blocksize,
            quant_type=self.quantization.quant_type,
            dtype=torch.bfloat16,
        )

    def train(self, mode: bool = True) -> Experts4bit:
        """Training mode drops the fused kernel's layout: training never reads it (it runs with autograd), and it takes
        as much memory as the stored experts. (Trainer puts the model in training mode at every step, so a
        generation-based evaluation's layout is freed on the next step and rebuilt on the next evaluation: about 2 s for
        Gemma 3 270M's 18 layers of 8 experts.)"""
        if mode:
            self._drop_fused_layout()
        return super().train(mode)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._drop_fused_layout()  # the stored weights are about to change
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def chunks(self, top_k_index: torch.Tensor, dtype: torch.dtype) -> Iterator[ExpertChunk]:
        """The routing, sorted by expert once, cut into chunks of active experts that fit the dequantization budget.

        The chunks follow the experts' row counts, read on the host once per call. On an accelerator where every
        expert fits the budget there is one chunk of all experts and no read at all: an expert without rows is
        dequantized for nothing, which costs less than the device waiting for the host."""
        num_top_k, device = top_k_index.shape[-1], top_k_index.device
        order, counts = self.sorted_routing(top_k_index)
        per_expert = sum(o * i for o, i in self.shapes.values()) * torch.empty((), dtype=dtype).element_size()
        size = max(1, self.quantization.dequantized_budget(device) // per_expert)
        if not _counts_read_on_host(device) and size >= self.num_experts:  # off the CPU every index is routed
            experts = torch.arange(self.num_experts, device=device)
            yield ExpertChunk(experts, counts, order, order // num_top_k, slice(None), ids=list(range(len(experts))))
            return
        host_counts = counts.tolist()
        ids = [expert for expert, count in enumerate(host_counts) if count]
        active = torch.tensor(ids, dtype=torch.long, device=device)
        row, workspace = 0, {}
        for start in range(0, len(ids), size):
            chunk_ids = ids[start : start + size]
            experts = active[start : start + size]
            rows = order[row : row + sum(host_counts[e] for e in chunk_ids)]
            row += len(rows)
            first, last = chunk_ids[0], chunk_ids[-1]
            span = slice(first, last + 1) if last - first + 1 == len(chunk_ids) else None
            yield ExpertChunk(
                experts, counts.index_select(0, experts), rows, rows // num_top_k, span, workspace, chunk_ids
            )

    def extra_repr(self) -> str:
        q = self.quantization
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"{q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}"
        )


def _counts_read_on_host(device: torch.device) -> bool:
    """Whether `chunks` reads the expert counts even when every expert fits the budget: on the CPU, where reading
    costs nothing and skipping experts without rows saves their dequantization."""
    return device.type == "cpu"


def _select(tensor: torch.Tensor, experts: torch.Tensor | slice) -> torch.Tensor:
    """The rows of `experts`: a view for a slice, else `index_select`, which copies each row whole (indexing with a
    tensor copies element by element: 5.5 ms against 0.9 ms for two experts' packed gate_up bytes at H 1024 / I 3584
    on the CPU)."""
    return tensor[experts] if isinstance(experts, slice) else tensor.index_select(0, experts)


def _dequantize_4bit_cpu_into(
    packed: torch.Tensor, absmax: torch.Tensor, quantization: ExpertQuantization, out: torch.Tensor, in_dim: int
) -> bool:
    """Dequantize `packed` (uint8, two weights a byte, rows of `in_dim` weights) with float32 `absmax` into `out`
    (CPU, float32 / bfloat16 / float16, one element per weight) with bitsandbytes' own CPU kernel; False where that
    kernel cannot take it (another device or build, bitsandbytes' own fallbacks: blocksize >= 2048, an odd row
    length) and the caller lets bitsandbytes allocate. bitsandbytes registers no CPU kernel for
    `dequantize_4bit.out`, so this calls the native function its CPU `dequantize_4bit` calls, with the same arguments;
    `tests/test_quant_experts.py` checks it against bitsandbytes' own call."""
    # The ctypes library itself: bitsandbytes' wrapper answers a missing symbol with a function that raises.
    native = bnb_lib._lib if isinstance(bnb_lib, BNBNativeLibrary) else None
    suffix = _KERNEL_DTYPES.get(out.dtype)
    function = (
        getattr(native, f"cdequantize_blockwise_cpu_{quantization.quant_type}_{suffix}", None) if suffix else None
    )
    if (
        function is None
        or packed.device.type != "cpu"
        or quantization.blocksize >= 2048
        or in_dim % 2
        or out.numel() != 2 * packed.numel()
        or absmax.dtype != torch.float32
        or not (packed.is_contiguous() and absmax.is_contiguous() and out.is_contiguous())
    ):
        return False
    function(
        bnb_functional.get_ptr(packed),
        bnb_functional.get_ptr(absmax),
        bnb_functional.get_ptr(out),
        ctypes.c_longlong(quantization.blocksize),
        ctypes.c_longlong(out.numel() // in_dim),
        ctypes.c_longlong(in_dim),
    )
    return True


_KERNEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache
def _cpu_fused_kernel() -> bool:
    """Whether bitsandbytes registered its fused 4-bit CPU kernel (`gemv_4bit` on packed-for-CPU weights): it does
    on CPUs with AVX512-BF16 only; elsewhere its `gemv_4bit` expects the stored layout."""
    check = getattr(bnb_functional, "has_avx512bf16", None)
    return bool(check is not None and check())


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


# The `Experts4bit` that hold a fused-kernel layout (weakly: a model that is gone frees its layouts).
_LAYOUT_HOLDERS: weakref.WeakSet[Experts4bit] = weakref.WeakSet()


def fused_layout_bytes() -> int:
    """Bytes the fused CPU kernel's layouts take in this process, over every `Experts4bit` (at most
    `CPU_FUSED_LAYOUT_BYTES`)."""
    return sum(module._fused_layout_bytes() for module in _LAYOUT_HOLDERS)
