"""What a merge will do, decided before anything is written: the base's and the adapter's configs, every LoRA
factor matched to the base tensor it changes, the output dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import MoeifyError
from ..formats.layouts import (
    EXPERT_PARAMS,
    expert_pieces,
)
from ..io.checkpoint import open_checkpoint
from ..io.peft_adapter import lora_adapter_tensors
from ..io.writer import TensorSpec
from .specs import Lora, expert_spec, linear_targets, lora_experts_spec, module_spec, output_dtype, specs_from_4bit


@dataclass
class Plan:
    config: dict
    model_type: str
    loras: dict[str, Lora]  # module parameter -> its LoRA
    replaced: dict[str, torch.Tensor]  # module parameter -> trained value (modules_to_save)
    specs: list[TensorSpec]
    from_4bit: str | None
    adapter_config: dict
    config_updates: dict = field(default_factory=dict)  # written over the base's config.json


def plan_merge(base: Path, adapter: Path, dtype: torch.dtype | None) -> Plan:
    """Check the adapter against the base (on the meta device) and list every output tensor with its producer."""
    from ..quant.loading import read_config

    config, quantization = read_config(base)
    from_4bit = f"{quantization.quant_type}, blocksize {quantization.blocksize}" if quantization else None
    if getattr(config, "quantization_config", None) is not None:
        method = _quant_method(config.quantization_config)
        raise MoeifyError(f"{base} is quantized ({method}); merge into a full-precision base.")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    # lora-experts (MixLoRA): one FFN shared by the experts plus their LoRA deltas, merged into full experts.
    lora_experts = {
        name for name, module in model.named_modules() if name.endswith(".experts") and hasattr(module, "deltas")
    }
    experts = {
        name: module
        for name, module in model.named_modules()
        if name.endswith(".experts")
        and name not in lora_experts
        and all(isinstance(getattr(module, p, None), nn.Parameter) for p in EXPERT_PARAMS)
    }
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    loras, replaced = _read_adapter(adapter, adapter_config, params, experts)

    reader = open_checkpoint(base)
    names = set(reader)
    model_type = config.model_type
    specs: list[TensorSpec] = []
    if quantization is None:
        pieces = {
            piece.name: piece
            for module in experts
            for piece in expert_pieces(module, params[f"{module}.gate_up_proj"].shape[0], names, model_type)
        }
        owners = {
            piece.name: module
            for module in experts
            for piece in expert_pieces(module, params[f"{module}.gate_up_proj"].shape[0], names, model_type)
        }
        targets = linear_targets(loras, replaced, names, model_type, base)
        for name in reader:
            out_dtype = output_dtype(reader.dtype(name), dtype)
            owner = next((m for m in lora_experts if name.startswith(f"{m}.")), None)
            if owner is not None:
                if ".deltas." not in name:  # the deltas are folded into the experts
                    specs.append(lora_experts_spec(name, out_dtype, reader, owner, replaced, config))
            elif name in pieces:
                lora = loras.get(f"{owners[name]}.{pieces[name].param}")
                specs.append(expert_spec(name, out_dtype, reader, pieces[name], lora))
            else:
                specs.append(module_spec(name, out_dtype, reader, *targets.get(name, (None, None))))
    else:
        specs = specs_from_4bit(reader, model, experts, loras, replaced, quantization, dtype, base)
    updates = {"expert_lora_rank": 0, "expert_lora_alpha": None} if lora_experts else {}
    return Plan(config.to_dict(), model_type, loras, replaced, specs, from_4bit, adapter_config, updates)


def _quant_method(quantization: object) -> str:
    if isinstance(quantization, dict):
        return str(quantization.get("quant_method", "unknown"))
    return str(getattr(quantization, "quant_method", "unknown"))


def _read_adapter(
    adapter: Path, config: dict, params: dict[str, nn.Parameter], experts: dict[str, nn.Module]
) -> tuple[dict[str, Lora], dict[str, torch.Tensor]]:
    """The adapter's LoRA targets and trained modules, checked against the base's parameter shapes."""
    unsupported = ("use_dora", "lora_bias", "fan_in_fan_out", "layer_replication", "trainable_token_indices")
    tensors = lora_adapter_tensors(adapter, config, "moeify merge", unsupported)
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets_of = {
        module: [
            p
            for target in config.get("target_parameters") or []
            for p in EXPERT_PARAMS
            if _ends(f"{module}.{p}", target)
        ]
        for module in experts
    }
    loras: dict[str, Lora] = {}
    replaced: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        depth = 0
        while module.endswith(".base_layer"):  # peft nests one wrapper per target parameter of a module
            module, depth = module.removesuffix(".base_layer"), depth + 1
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise MoeifyError(f"{adapter} has {key} without its lora_B.")
        lora_a, lora_b = tensors[key], tensors[b_key]
        used |= {key, b_key}
        if module in experts:
            order = targets_of[module]
            if depth >= len(order):
                raise MoeifyError(f"{adapter}: {key} does not match the adapter's target_parameters {order}.")
            param = f"{module}.{order[len(order) - 1 - depth]}"
            shape = params[param].shape
            num_experts, out_dim, in_dim = shape
            if lora_a.shape[0] % num_experts or lora_a.shape[1] != in_dim or lora_b.shape != (out_dim, lora_a.shape[0]):
                _mismatch(adapter, key, lora_a, lora_b, param, shape)
            rank, current = lora_a.shape[0] // num_experts, param
        elif f"{module}.weight" in params and depth == 0:
            param = f"{module}.weight"
            shape = params[param].shape
            if len(shape) != 2 or lora_a.shape[1] != shape[1] or lora_b.shape != (shape[0], lora_a.shape[0]):
                _mismatch(adapter, key, lora_a, lora_b, param, shape)
            rank, current, num_experts = lora_a.shape[0], module, 0
        else:
            raise MoeifyError(
                f"the adapter does not fit this base: it has LoRA for {module}, which the base does not have "
                "(was it trained on another model?)."
            )
        expected = rank_pattern.get(get_pattern_key(rank_pattern.keys(), current), config["r"])
        if expected != rank:
            experts_note = f" for the base's {num_experts} experts" if num_experts else ""
            raise MoeifyError(
                f"the adapter does not fit this base: {key} has {lora_a.shape[0]} rows, rank {rank}{experts_note}, "
                f"but the adapter was saved with rank {expected} (was {adapter} trained on another model?)."
            )
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), current), config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        loras[param] = Lora(lora_a, lora_b, scale, num_experts)
    for key, value in tensors.items():  # modules_to_save: the trained copy of a whole module
        if key in used:
            continue
        saved = (
            config.get("modules_to_save") or []
        )  # a saved module's parameters, e.g. `...shared_expert.up_proj.weight`
        if key not in params or not any(f".{m}." in f".{key}" for m in saved):
            raise MoeifyError(
                f"{adapter} holds {key}, which moeify merge cannot place (not LoRA, not a module to save)."
            )
        if value.shape != params[key].shape:
            _mismatch(adapter, key, value, None, key, params[key].shape)
        replaced[key] = value
    if not loras and not replaced:
        raise MoeifyError(f"{adapter} holds no LoRA weights.")
    return loras, replaced


def _ends(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith(f".{suffix}")


def _mismatch(
    adapter: Path, key: str, a: torch.Tensor, b: torch.Tensor | None, param: str, shape: tuple[int, ...]
) -> None:
    got = f"{tuple(a.shape)}" + (f" / lora_B {tuple(b.shape)}" if b is not None else "")
    raise MoeifyError(
        f"the adapter does not fit this base: {key} is {got}, but the base's {param} is {tuple(shape)} "
        f"(was {adapter} trained on another model?)."
    )
