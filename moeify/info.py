"""`moeify info`: what a model is (dense or MoE) and what it costs, read from config and tensor headers only."""

from __future__ import annotations

import math
from typing import Any

from .checkpoint import open_checkpoint
from .converter import load_config
from .params import counted_shapes, human, summarize
from .source import resolve_source

# bitsandbytes NF4 with blocksize 64 stores 4 bits per weight plus one fp32 absmax per 64 weights.
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64


def model_info(source: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Architecture, MoE settings and parameter counts of `source` (folder, Hub id or `.gguf`).

    Keys: architecture, model_type, num_layers, num_experts (0 if dense), top_k, shared_experts, moe_layers,
    total_params, active_params, routed_expert_params, size_bf16_bytes, size_4bit_bytes (NF4 for every
    matrix except embeddings and LM head, which stay bf16).
    """
    import moeify  # noqa: F401  (registers the moeify config)

    folder = resolve_source(source, trust_remote_code=trust_remote_code)
    config = load_config(folder, trust_remote_code)
    checkpoint = open_checkpoint(folder)  # reads headers only
    shapes = {name: checkpoint.shape(name) for name in checkpoint}
    params = summarize(shapes, config)
    quantizable = sum(
        math.prod(shape)
        for name, shape in counted_shapes(shapes, config).items()
        if len(shape) >= 2 and "embed" not in name and "lm_head" not in name
    )
    text_config = getattr(config, "text_config", None) or config.get_text_config()
    return {
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_type": config.model_type,
        "base_model_type": text_config.model_type,
        "num_layers": text_config.num_hidden_layers,
        "num_experts": params.num_experts,
        "top_k": params.top_k,
        "shared_experts": params.shared_experts,
        "moe_layers": params.moe_layers,
        "total_params": params.total,
        "active_params": params.active,
        "routed_expert_params": params.routed_expert_params,
        "size_bf16_bytes": params.total * 2,
        "size_4bit_bytes": int(quantizable * NF4_BYTES_PER_PARAM + (params.total - quantizable) * 2),
    }


def format_info(info: dict[str, Any]) -> str:
    """A short human-readable summary of `model_info`'s result."""
    lines = [f"architecture     {info['architecture']} ({info['model_type']}, {info['num_layers']} layers)"]
    if info["num_experts"]:
        layers = info["moe_layers"]
        lines.append(f"MoE layers       {len(layers)} of {info['num_layers']}")
        lines.append(
            f"experts          {info['num_experts']} routed, top-{info['top_k']}, {info['shared_experts']} shared"
        )
    else:
        lines.append("experts          none (dense model)")
    lines.append(f"total params     {info['total_params']:,} ({human(info['total_params'])})")
    lines.append(f"active params    {info['active_params']:,} ({human(info['active_params'])}) per token")
    lines.append(f"size bf16        {info['size_bf16_bytes'] / 2**30:.2f} GiB")
    lines.append(f"size 4-bit       {info['size_4bit_bytes'] / 2**30:.2f} GiB (NF4 matrices, bf16 embeddings)")
    return "\n".join(lines)
