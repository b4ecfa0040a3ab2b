"""`moeify info`: what a model is (dense or MoE) and what it costs, read from config and tensor headers only."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ..io.checkpoint import open_checkpoint
from ..io.source import load_config, resolve_source
from .params import counted_shapes, human, summarize

# bitsandbytes NF4 with blocksize 64 stores 4 bits per weight plus one fp32 absmax per 64 weights.
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64


def model_info(source: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Architecture, MoE settings and parameter counts of `source` (folder, Hub id or `.gguf`).

    Keys: architecture, model_type, num_layers, num_experts (0 if dense), top_k, shared_experts, moe_layers,
    total_params, active_params, routed_expert_params, size_bf16_bytes, size_4bit_bytes (NF4 for every
    matrix except embeddings and LM head, which stay bf16), stored_bytes (the checkpoint's tensors as stored) and
    quantization (how a `save_4bit` checkpoint stores its experts, else None).
    """

    folder = resolve_source(source, trust_remote_code=trust_remote_code)
    quantization = None
    if json.loads((folder / "config.json").read_text()).get("model_type") == "moeify_4bit_experts":
        from ..quant.loading import read_config

        config, q = read_config(folder)  # a save_4bit checkpoint: its experts are stored packed
        assert q is not None
        quantization = f"experts {q.quant_type} 4-bit, blocksize {q.blocksize}" + (", double quant" * q.double_quant)
    else:
        config = load_config(folder, trust_remote_code)
    checkpoint = open_checkpoint(folder)  # reads headers only
    stored = sum(
        math.prod(checkpoint.shape(name)) * torch.empty((), dtype=checkpoint.dtype(name)).element_size()
        for name in checkpoint
    )
    shapes = {name: checkpoint.shape(name) for name in checkpoint}
    if quantization is not None:  # count the parameters the packed experts stand for
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
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
        "stored_bytes": stored,
        "quantization": quantization,
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
    lines.append(f"size bf16        {_size(info['size_bf16_bytes'])}")
    lines.append(f"size 4-bit       {_size(info['size_4bit_bytes'])} (NF4 matrices, bf16 embeddings)")
    stored = f" ({info['quantization']})" if info["quantization"] else ""
    lines.append(f"size stored      {_size(info['stored_bytes'])}{stored}")
    return "\n".join(lines)


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
