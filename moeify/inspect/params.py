"""Parameter counts of an MoE (total, active per token) from tensor shapes, without loading weights."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..formats.base import NEUTRAL_SHARED_SIZE

_EXPERT = re.compile(r"(?:^|\.)experts\.")
# lora-experts (MixLoRA): the experts' one shared FFN runs for every token; only the per-expert deltas are routed.
_SHARED_BY_EXPERTS = re.compile(r"(?:^|\.)experts\.(?:gate_up_proj|down_proj)(?:_bias)?$")
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class ParamSummary:
    """Totals for a model; `active` counts every non-expert parameter plus `top_k / num_experts` of the experts."""

    total: int
    active: int
    routed_expert_params: int
    num_experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    moe_layers: list[int] = field(default_factory=list)


def moe_settings(config) -> tuple[int, int, int]:
    """(num_experts, top_k, shared experts) from any MoE config (moeify, Mixtral, Qwen-MoE); zeros if dense."""
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    top_k = getattr(config, "num_experts_per_tok", 0) if num_experts else 0
    shared = getattr(config, "num_shared_experts", None)
    if shared is None:  # Qwen-MoE: shared_expert_intermediate_size; GraniteMoeShared: shared_intermediate_size
        shared_size = getattr(config, "shared_expert_intermediate_size", 0) or getattr(
            config, "shared_intermediate_size", 0
        )
        moe_size = getattr(config, "moe_intermediate_size", 0) or getattr(config, "intermediate_size", 0)
        # In routed-expert units where the size is a multiple of an expert's, else one shared MLP of that size
        # (`--shared-expert-size`), except moeify's neutral one.
        if not shared_size or not moe_size or shared_size <= NEUTRAL_SHARED_SIZE:
            shared = 0
        else:
            shared = shared_size // moe_size if shared_size % moe_size == 0 else 1
    return int(num_experts), int(top_k), int(shared)


def counted_shapes(shapes: dict[str, tuple[int, ...]], config) -> dict[str, tuple[int, ...]]:
    """`shapes` without a tied `lm_head` (it is the embedding matrix, counted once as `model.parameters()` does)."""
    tied = bool(
        getattr(config.get_text_config(), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    )
    if tied and "lm_head.weight" in shapes and any(k.endswith("embed_tokens.weight") for k in shapes):
        return {name: shape for name, shape in shapes.items() if name != "lm_head.weight"}
    return shapes


def summarize(shapes: dict[str, tuple[int, ...]], config) -> ParamSummary:
    """Count parameters from `name -> shape`, as `sum(p.numel() for p in model.parameters())` would."""
    num_experts, top_k, shared = moe_settings(config)
    total = 0
    routed = 0
    moe_layers: set[int] = set()
    for name, shape in counted_shapes(shapes, config).items():
        count = math.prod(shape)
        total += count
        lora_base = getattr(config, "expert_lora_rank", 0) and _SHARED_BY_EXPERTS.search(name)
        if num_experts and _EXPERT.search(name) and not lora_base:
            routed += count
            layer = _LAYER.search(name)
            if layer:
                moe_layers.add(int(layer.group(1)))
    active = total - (routed - routed * top_k // num_experts) if num_experts else total
    return ParamSummary(total, active, routed, num_experts, top_k, shared, sorted(moe_layers))


def human(count: int) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}" if unit == "B" else f"{count / scale:.1f}{unit}"
    return str(count)
