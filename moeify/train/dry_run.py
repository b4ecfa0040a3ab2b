"""`moeify train --dry-run`: the resolved recipe, trainable / total parameters and a peak-memory estimate, from the
model's config alone (the model is built on the meta device: no weight is read)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import init_empty_weights
from torch import nn
from transformers import PretrainedConfig

from ..quant.config import ATTENTION_PROJECTIONS, CPU_FUSED_LAYOUT_BYTES, ROUTER_MODULES, SHARED_MODULES
from .recipe import Recipe, wants_checkpointing

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PROCESS_BYTES = 400 << 20  # the Python process with torch, transformers, peft and bitsandbytes imported (CPU)


@dataclass
class Estimate:
    """Parameter counts and memory of a training run, before anything is loaded."""

    total_params: int
    trainable_params: int
    weights_bytes: int
    training_state_bytes: int  # trainable weights, gradients, AdamW moments
    activation_bytes: int
    fused_layout_bytes: int = 0  # at most CPU_FUSED_LAYOUT_BYTES, in CPU evaluation and generation only
    runtime_bytes: int = PROCESS_BYTES

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.training_state_bytes + self.activation_bytes + self.runtime_bytes


def estimate(recipe: Recipe) -> Estimate:
    """Count parameters of the recipe's model (meta device) and estimate the peak memory of one training step."""
    from transformers import AutoModelForCausalLM

    from ..errors import MoeifyError

    try:
        if recipe.model.path is not None:
            config = _config(recipe.model.path)
        else:  # the MoE `model.convert` would make of the dense model, from its config alone
            from transformers import AutoConfig

            from ..convert.options import ConvertOptions
            from ..convert.plan import planned_config

            if str(recipe.model.source).endswith(".gguf"):
                raise MoeifyError(
                    "--dry-run with a .gguf model.source: run `moeify convert` first, then use model.path."
                )
            config = planned_config(
                AutoConfig.from_pretrained(recipe.model.source), ConvertOptions(**recipe.model.convert)
            )
    except OSError as err:
        raise MoeifyError(f"cannot read the config of {recipe.model.path or recipe.model.source}: {err}") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # as loading does: a tied LM head is the embedding matrix
    from ..quant.loading import freeze_unreachable

    freeze_unreachable(model)  # as loading does: the first MoE layer's gating residual never trains
    q, lora = recipe.quantization, recipe.lora
    # What trains is kept in float32 (master weights): with `lora: null` that is every weight.
    compute = 4 if lora is None else _DTYPE_BYTES[q.compute_dtype]
    total = trainable = weights = fused_layouts = 0
    seen: set[int] = set()  # a tied LM head is the embedding matrix: count it once
    dense = not any(name.rpartition(".")[2] == "experts" for name, _ in model.named_modules())
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        parent = name.rpartition(".")[0].rpartition(".")[2]
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in params)
        own = sum(p.numel() for p in params)
        total += own
        if leaf == "deltas" and parent == "experts":  # lora-experts: each expert's LoRA delta, trained as it is
            weights += own * compute
            if lora is None or "experts" in lora.targets:
                trainable += own
        elif leaf == "experts" and getattr(module, "gate_up_proj", None) is not None and module.gate_up_proj.dim() == 3:
            weights += own * compute if q.experts == "none" else _four_bit_bytes(own, q.blocksize, q.double_quant)
            if q.experts != "none":  # the fused CPU kernel's copy of the packed bytes, while evaluating on a CPU
                fused_layouts = min(CPU_FUSED_LAYOUT_BYTES, fused_layouts + own // 2 + own // q.blocksize * 2)
            if lora is not None and "experts" in lora.targets:
                experts, two_i, hidden = module.gate_up_proj.shape
                rank = lora.expert_r or lora.r
                trainable += experts * rank * ((hidden + two_i) + (two_i // 2 + hidden))
            elif lora is None:
                trainable += own
        elif (
            leaf in ROUTER_MODULES or parent in ROUTER_MODULES
        ):  # a router / gate, or a layer of one (an MLP router): full precision
            reachable = sum(p.numel() for p in params if p.requires_grad)
            if lora is None or lora.train_router:
                trainable += reachable
                weights += reachable * 4 + (own - reachable) * compute
            else:
                weights += own * compute
        elif isinstance(module, nn.Linear) and leaf != "lm_head":
            weights += _four_bit_bytes(own, 64, q.double_quant) if q.linear != "none" else own * compute
            if lora is None:
                trainable += own
            elif ("attention" in lora.targets and leaf in ATTENTION_PROJECTIONS) or (
                "shared_experts" in lora.targets and parent in SHARED_MODULES
            ):
                trainable += lora.r * (module.in_features + module.out_features)
            elif dense and "experts" in lora.targets and parent == "mlp":  # a dense FFN: `load_model`'s LoRA
                trainable += (lora.expert_r or lora.r) * (module.in_features + module.out_features)
        else:
            weights += own * compute
            if lora is None:
                trainable += own
    state = trainable * (4 + 4 + 8)  # float32 master weight + gradient + two float32 AdamW moments
    return Estimate(total, trainable, weights, state, _activations(recipe, config), fused_layouts)


def _config(path: str) -> PretrainedConfig:
    """A local folder's config (a `save_4bit` checkpoint's included), or a Hub id's (config.json only)."""
    from transformers import AutoConfig

    if Path(path).is_dir():
        from ..quant.loading import read_config

        return read_config(Path(path))[0]
    return AutoConfig.from_pretrained(path)


def _four_bit_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    blocks = math.ceil(numel / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return numel // 2 + scales


def _activations(recipe: Recipe, config: PretrainedConfig) -> int:
    """Rough: with gradient checkpointing, each layer keeps its input; one layer is recomputed at a time (about 16
    hidden-sized tensors), and the loss holds one chunk of float32 logits (`causal_lm_loss`)."""
    text = config.get_text_config()
    tokens = int(recipe.training.get("per_device_train_batch_size", 8)) * recipe.data.max_length
    hidden = tokens * text.hidden_size * _DTYPE_BYTES[recipe.quantization.compute_dtype]
    checkpointing = wants_checkpointing(recipe)
    layers = text.num_hidden_layers
    return hidden * (layers + 16 if checkpointing else 16 * layers) + (32 << 20)


def describe(recipe: Recipe) -> str:
    """What `--dry-run` prints."""
    result = estimate(recipe)
    gib = 2**30
    share = result.trainable_params / max(result.total_params, 1)
    return (
        "# resolved recipe\n"
        + yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        + f"\ntrainable parameters  {result.trainable_params:,} of {result.total_params:,} ({share:.2%})\n"
        f"peak memory estimate  {result.peak_bytes / gib:.2f} GiB per device = weights {result.weights_bytes / gib:.2f}"
        f" + trainable state (weights, gradients, AdamW) {result.training_state_bytes / gib:.2f}"
        f" + activations ~{result.activation_bytes / gib:.2f} + the process ~{result.runtime_bytes / gib:.2f} GiB"
        " (training steps)\n"
        + (
            f"evaluation on a CPU  may add the fused 4-bit kernel's layouts: at most "
            f"{result.fused_layout_bytes / gib:.2f} GiB (moeify.quant.config.CPU_FUSED_LAYOUT_BYTES)\n"
            if result.fused_layout_bytes
            else ""
        )
    )
