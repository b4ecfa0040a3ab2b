"""Settings of 4-bit experts and of their LoRA: one documented dataclass each, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

QuantType = Literal["nf4", "fp4"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
# Module names in the MoE classes moeify writes or loads. Full precision and trainable: routers (with their MLP /
# noise / residual layers), gates, MoE++ constant experts. Then shared experts and attention projections.
ROUTER_MODULES = ("gate", "router", "shared_expert_gate", "constant_experts")
SHARED_MODULES = ("shared_expert", "shared_experts", "shared_mlp")  # Qwen2-MoE, moeify, GraniteMoeShared
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The blocksizes bitsandbytes' 4-bit kernels accept.
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Default budgets of dequantized expert weights. On the CPU, glibc serves blocks under 32 MiB from its heap once one
# has been freed, while larger ones are mapped afresh and page-faulted in on every call: a chunk whose gate_up part
# (2/3 of it) stays under 32 MiB is recycled. Measured (BENCHMARKS.md): 4-bit + LoRA
# fwd+bwd 1.3-1.4x faster than with 1 GiB chunks, and the chunk is the largest temporary of a 4-bit training step.
# On accelerators the caching allocator recycles any size, and fewer, larger grouped GEMMs launch less.
CPU_DEQUANTIZED_BYTES = 48 << 20
ACCELERATOR_DEQUANTIZED_BYTES = 1 << 30
# bitsandbytes' fused 4-bit CPU kernel took 0.19x-0.31x of the time of dequantizing an expert and multiplying for one
# of its rows, 0.83x-0.92x for 16 and 1.04x-1.11x for 24 (`benchmarks/fused_4bit_rows.py`): up to 16 rows.
CPU_FUSED_ROWS = 16
# The fused kernel reads its own copy of the packed experts (`Experts4bit.fused_projection`), as large as the stored
# ones: built for every layer, evaluation and generation would hold the experts twice. The layouts of all
# `Experts4bit` in a process together stay under this many bytes; past it a layer runs the dequantizing path
# (training's), so evaluating a model never needs more memory than training it did.
CPU_FUSED_LAYOUT_BYTES = 256 << 20


@dataclass(frozen=True)
class ExpertQuantization:
    """How expert weights are stored.

    Args:
        quant_type: `"nf4"` (default, normal-float 4-bit) or `"fp4"`.
        blocksize: weights sharing one absmax scale; must divide the hidden and intermediate sizes, so no block
            crosses a row of one expert (and so none crosses an expert).
        double_quant: quantize the absmax scales too (8-bit, blocks of 256), as bitsandbytes' `compress_statistics`.
        storage_dtype: dtype the packed bytes are viewed as. A float dtype (default bfloat16) lets FSDP shard them,
            like bitsandbytes' `quant_storage`.
        max_dequantized_bytes: at most this many bytes of dequantized expert weights exist at once (but always one
            expert's); more active experts are processed in chunks. Default (None): 48 MiB on the CPU, 1 GiB on an
            accelerator (`dequantized_budget`). A runtime setting: not part of what a 4-bit checkpoint stores.
        cpu_fused_rows: without autograd (generation) on a CPU with AVX512-BF16, bfloat16 inputs, experts that get
            at most this many rows each are multiplied by bitsandbytes' fused 4-bit kernel, never dequantized
            (default 16; 0 turns it off). That kernel reads its own layout of the packed weights, built on first use
            and kept until the weights change or the module goes back to training mode: the experts' 4-bit bytes
            once more (a quarter of their bfloat16 size). A runtime setting.
    """

    quant_type: QuantType = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    storage_dtype: torch.dtype = torch.bfloat16
    max_dequantized_bytes: int | None = None
    cpu_fused_rows: int = CPU_FUSED_ROWS

    def dequantized_budget(self, device: torch.device) -> int:
        """`max_dequantized_bytes`, or the default for `device`'s kind."""
        if self.max_dequantized_bytes is not None:
            return self.max_dequantized_bytes
        return CPU_DEQUANTIZED_BYTES if device.type == "cpu" else ACCELERATOR_DEQUANTIZED_BYTES

    @property
    def storage(self) -> ExpertQuantization:
        """These settings without the runtime ones (`max_dequantized_bytes`, `cpu_fused_rows`): how the experts are
        stored."""
        return replace(self, max_dequantized_bytes=None, cpu_fused_rows=CPU_FUSED_ROWS)

    def validate(self, *sizes: int) -> None:
        """Raise `ValueError` with what to change when these settings cannot store matrices of `sizes`."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type '{self.quant_type}' is not one of {', '.join(QUANT_TYPES)}.")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize {self.blocksize} is not one of {', '.join(map(str, BLOCKSIZES))}.")
        bad = [size for size in sizes if size % self.blocksize]
        if bad:
            raise ValueError(
                f"blocksize {self.blocksize} does not divide the expert sizes {bad}: pick a blocksize that divides "
                f"{', '.join(map(str, sizes))}."
            )
        if torch.empty((), dtype=self.storage_dtype).element_size() > 4:
            raise ValueError(f"storage_dtype {self.storage_dtype} is wider than 4 bytes.")
        if self.max_dequantized_bytes is not None and self.max_dequantized_bytes < 1:
            raise ValueError(
                f"max_dequantized_bytes must be >= 1 (or None for the default), got {self.max_dequantized_bytes}."
            )
        if self.cpu_fused_rows < 0:
            raise ValueError(
                f"cpu_fused_rows must be >= 0 (0 turns the fused CPU kernel off), got {self.cpu_fused_rows}."
            )


@dataclass(frozen=True)
class ExpertLoraConfig:
    """LoRA on every routed expert: `W_e x + scale * B_e A_e x`, only for the tokens routed to expert e.

    Args:
        r: rank per expert.
        alpha: scale numerator: `scale = alpha / r` (`alpha / sqrt(r)` with `use_rslora`).
        dropout: dropout on the LoRA input (training only).
        use_rslora: rank-stabilised scaling.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
