"""`load_for_training`: an MoE ready for k-bit LoRA training, its experts quantized layer by layer while loading.

`from_pretrained` then `quantize_experts` holds every expert in bf16 at once (an 8B Llama upcycled to 8 experts:
about 90 GB). Here the model is built with its parameters on the meta device, its experts modules become empty
`Experts4bit`s, and the checkpoint is read tensor by tensor: the experts of one layer are assembled (fused
from per-expert tensors when the checkpoint holds those), quantized and dropped before the next layer is read,
so the peak is about the 4-bit model plus one layer's experts.

`save_4bit` writes such a model's base (experts in 4-bit, the rest in its dtype) with a `quantization_config` that
names moeify, so `load_for_training` reloads it without quantizing again, a mismatched setting is refused, and
plain `from_pretrained` fails with transformers' "unknown quantization type" instead of loading garbage.

Why not transformers' loader: it fuses per-expert checkpoints into full-precision 3-D tensors for the whole
model before any quantizer sees them, and its conversion / quantizer interfaces differ across the transformers
releases moeify supports (5.16-5.23). The few checkpoint names that differ from module names are the legacy
MoE names stock `save_pretrained` writes (the same ones moeify's native formats write): see `moeify.formats.layouts`.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import MoeifyError
from ..formats.layouts import EXPERT_PARAMS, checkpoint_name, expert_pieces, read_expert
from ..io.checkpoint import open_checkpoint
from ..io.source import resolve_source
from .config import ATTENTION_PROJECTIONS, ROUTER_MODULES, SHARED_MODULES, ExpertLoraConfig, ExpertQuantization
from .dispatch import fused_experts
from .experts_4bit import Experts4bit
from .lora import add_expert_lora

# Full precision and trainable: routers (with their MLP / noise / residual layers), gates, MoE++ constant experts.
QUANT_METHOD = "moeify_experts_4bit"  # `quant_method` of a saved 4-bit checkpoint's `quantization_config`
CHECKPOINT_MODEL_TYPE = "moeify_4bit_experts"  # the `model_type` in its config.json (see `read_config`)


def load_for_training(
    source: str | Path,
    quantization: ExpertQuantization | None = None,
    lora: ExpertLoraConfig | None = None,
    attention_lora: LoraConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = True,
    train_router: bool = True,
    linear_quantization: BitsAndBytesConfig | None = None,
    shared_experts: Literal["lora", "full", "frozen"] = "lora",
    router: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> PeftModel:
    """Load an MoE (moeify format or a native class) for LoRA training with 4-bit experts.

    Args:
        source: a converted MoE folder or Hub id.
        quantization: how experts are stored (NF4, blocksize 64, double quant by default).
        lora: per-expert LoRA (r 16, alpha 32 by default).
        attention_lora: peft `LoraConfig` for the other modules (default: r 16, alpha 32); without
            `target_modules`, on the q/k/v/o projections and, with `shared_experts="lora"`, the shared experts'.
        dtype: storage dtype of the frozen weights that are not 4-bit experts; what trains (LoRA factors, routers,
            shared experts in full) is float32, so with bfloat16 run the forward under autocast (Trainer's
            `bf16=True`).
        gradient_checkpointing: enable it (non-reentrant) and input gradients, without peft's
            `prepare_model_for_kbit_training` (which upcasts every other parameter to float32).
        train_router: routers (and Qwen2-MoE's shared-expert gate) train in full precision and are saved with the
            adapter (peft's `modules_to_save`).
        linear_quantization: a `BitsAndBytesConfig(load_in_4bit=True, ...)` for the other linear modules
            (attention, shared experts), applied by transformers' `replace_with_bnb_linear`; each weight is quantized
            as it is read (accelerate's `set_module_tensor_to_device`). Routers and the LM head stay in `dtype`.
        shared_experts: `"lora"` (LoRA on their projections, in the default `attention_lora`), `"full"` (trained in
            full and saved with the adapter, peft's `modules_to_save`) or `"frozen"`.
        router: settings of moeify's `config.router` section to apply over the saved ones (losses, jitter, capacity,
            bias balancing; see `moeify.RouterConfig`); moeify format only.
        device: where the model is built (default: `"cpu"`). Each weight is read onto it and the experts are
            quantized there, one expert matrix at a time: on a GPU (`"cuda"`, `"cuda:1"`, under DDP each process's
            own) the quantization is fast and the GPU never holds a layer in full precision.

    Returns a `PeftModel` whose `save_pretrained` writes an adapter stock peft loads onto the full-precision MoE.
    """
    lora = lora or ExpertLoraConfig()

    device = _device(device)

    folder = resolve_source(str(source))
    config, saved = read_config(folder)
    if saved is not None and quantization is not None and quantization.storage != saved:
        raise MoeifyError(
            f"{folder} holds experts saved as {saved}; they cannot be loaded as {quantization}. Pass quantization=None "
            "(or the saved settings), or load the full-precision model to quantize it another way."
        )
    # A 4-bit checkpoint fixes how the experts are stored; the dequantization budget stays the caller's choice.
    quantization = quantization or saved or ExpertQuantization()
    if router:
        apply_router_settings(config, router)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary, scales) computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    experts = fused_experts(model)
    if not experts:
        raise MoeifyError(
            f"{folder} is not an MoE with fused experts ({type(model).__name__}): nothing to quantize. Load it with "
            "full-precision weights (`quantization.experts: none` in a `moeify train` recipe, `moeify eval "
            "--experts none`)."
        )
    if shared_experts not in ("lora", "full", "frozen"):
        raise MoeifyError(f"shared_experts must be 'lora', 'full' or 'frozen', not {shared_experts!r}.")
    if attention_lora is None:
        attention_lora = LoraConfig(r=16, lora_alpha=32)
    if attention_lora.target_modules is None:
        attention_lora.target_modules = _default_targets(model, shared_experts)
    _check_settings(model, experts, quantization, lora, attention_lora)  # before the (slow) loading
    if linear_quantization is not None:
        _quantize_linears(model, linear_quantization, trained=SHARED_MODULES if shared_experts == "full" else ())
    _load_weights(model, folder, experts, quantization, dtype, device, prequantized=saved is not None)
    model.tie_weights()
    model.eval()

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    saved = [*(ROUTER_MODULES if train_router else ()), *(SHARED_MODULES if shared_experts == "full" else ())]
    if saved:
        attention_lora.modules_to_save = [*(attention_lora.modules_to_save or []), *(m for m in saved if m in present)]
    if gradient_checkpointing:
        enable_checkpointing(model)
    peft_model = get_peft_model(model, attention_lora)
    add_expert_lora(peft_model, lora)
    freeze_unreachable(peft_model)
    upcast_trainable(peft_model)
    return peft_model


def linear_quantization_config(quant_type: str, dtype: torch.dtype, double_quant: bool = True) -> BitsAndBytesConfig:
    """bitsandbytes' 4-bit settings for the linear modules other than the experts, as `moeify train` stores them:
    routers and the LM head stay in `dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=["lm_head", *ROUTER_MODULES],
    )


def load_with_adapter(
    source: str | Path,
    adapter: str | Path | None = None,
    quantization: ExpertQuantization | None = None,
    linear_quantization: BitsAndBytesConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> PeftModel:
    """An MoE with 4-bit experts and a trained LoRA adapter, in eval mode, frozen: the model `moeify train`
    evaluated, for evaluation and for checking a merge, at the memory training needed.

    Args:
        source: the MoE the adapter was trained on (full precision or a `save_4bit` checkpoint), folder or Hub id.
        adapter: a peft adapter folder written by `load_for_training`'s model (LoRA on linear modules, per-expert
            LoRA in `target_parameters`, `modules_to_save`); None: the 4-bit model alone (its LoRA is zero).
        quantization, linear_quantization, dtype, device: as for `load_for_training`.

    The LoRA ranks and scales, targets and saved modules come from the adapter's config; every tensor of the adapter
    must find its place, and an expert LoRA the config names must be in the file.
    """
    from peft import set_peft_model_state_dict

    from ..io.peft_adapter import adapter_folder, read_lora_adapter

    config: dict[str, Any] = {}
    state: dict[str, torch.Tensor] = {}
    if adapter is not None:
        folder = adapter_folder(adapter)
        config = json.loads((folder / "adapter_config.json").read_text())
        state = read_lora_adapter(folder, config, "loading an adapter onto 4-bit experts")
    experts = list(config.get("target_parameters") or [])
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r, alpha = config.get("r", 16), config.get("lora_alpha", 32.0)
    expert_lora = ExpertLoraConfig(
        r=ranks.get(experts[0], r) if experts else r,
        alpha=alphas.get(experts[0], alpha) if experts else alpha,
        use_rslora=bool(config.get("use_rslora")),
    )
    others = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=config.get("target_modules"),
        modules_to_save=config.get("modules_to_save"),
        use_rslora=bool(config.get("use_rslora")),
        rank_pattern={k: v for k, v in ranks.items() if k not in experts},
        alpha_pattern={k: v for k, v in alphas.items() if k not in experts},
    )
    trained_in_full = any(m in SHARED_MODULES for m in config.get("modules_to_save") or [])
    model = load_for_training(
        source,
        quantization=quantization,
        lora=expert_lora,
        attention_lora=others,
        dtype=dtype,
        gradient_checkpointing=False,
        train_router=False,  # the adapter's own `modules_to_save` name what it holds
        linear_quantization=linear_quantization,
        shared_experts="full" if trained_in_full else "lora",
        device=device,
    )
    if state:
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise MoeifyError(
                f"{len(result.unexpected_keys)} tensors of {adapter} have no place in the model built from {source} "
                f"(e.g. {sorted(result.unexpected_keys)[0]}): was it trained on another model?"
            )
        if experts:
            missing = [k for k in result.missing_keys if ".lora_" in k and ".experts" in k]
            if missing:
                raise MoeifyError(f"{adapter} names expert LoRA in its config but lacks {missing[0]}.")
    model.requires_grad_(False)
    return model.eval()


def _device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch device (default CPU), refused clearly when this machine does not have it."""
    try:
        resolved = torch.device(device if device is not None else "cpu")
    except RuntimeError as err:
        raise MoeifyError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...): {err}") from None
    if resolved.type == "meta":
        raise MoeifyError("device 'meta' holds no weights: load onto 'cpu' or an accelerator.")
    if resolved.type != "cpu":
        backend = getattr(torch, resolved.type, None)
        count = backend.device_count() if backend is not None and backend.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise MoeifyError(
                f"device {str(resolved)!r} is not available here ({count} {resolved.type} device(s) found); "
                "pass device='cpu' or one this machine has."
            )
    return resolved


def apply_router_settings(config: PretrainedConfig, settings: dict[str, Any]) -> None:
    """Update moeify's `config.router` with `settings` (validated); other formats have no such section, so any
    setting that differs from what their router does already is refused."""
    router = getattr(config, "router", None)
    if not isinstance(router, dict):
        from ..modeling import RouterConfig

        defaults = RouterConfig().to_dict()
        losses = ("aux_loss_coef", "z_loss_coef")
        other = {k: v for k, v in settings.items() if k not in losses and v != defaults[k]}
        if other:
            raise MoeifyError(
                f"{', '.join(sorted(other))}: {type(config).__name__} routers cannot do this; convert with "
                "`--format moeify` to train with it."
            )
        return
    from ..modeling import RouterConfig

    rate = settings.get("bias_update_rate")
    if rate is not None and (rate > 0) != (router["bias_update_rate"] > 0):
        raise MoeifyError(
            "moe.bias_update_rate: the selection bias is part of the model (saved with it and with the adapter), so "
            "it is switched on at conversion (`moeify convert --bias-update-rate U`); a recipe can change the rate "
            f"of a model that has one, not add or remove it (this model's rate: {router['bias_update_rate']})."
        )
    try:
        config.router = RouterConfig.from_dict({**router, **settings}).to_dict()
    except ValueError as error:
        raise MoeifyError(str(error)) from error


def _default_targets(model: nn.Module, shared_experts: str) -> list[str] | str:
    """q/k/v/o, plus the shared experts' linear modules (a regular expression peft matches) with `"lora"`."""
    if shared_experts != "lora":
        return list(ATTENTION_PROJECTIONS)
    shared = sorted(
        {
            name.rpartition(".")[2]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[0].rpartition(".")[2] in SHARED_MODULES
        }
    )
    if not shared:
        return list(ATTENTION_PROJECTIONS)
    return (
        rf".*\.({'|'.join(ATTENTION_PROJECTIONS)})"
        rf"|.*\.({'|'.join(SHARED_MODULES)})\.({'|'.join(shared)})"
    )


def _quantize_linears(model: PreTrainedModel, config: BitsAndBytesConfig, trained: tuple[str, ...] = ()) -> None:
    """Swap the (meta) linear modules for bitsandbytes' `Linear4bit`, as transformers' bitsandbytes quantizer does."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    if not config.load_in_4bit:
        raise MoeifyError("linear_quantization must be a 4-bit BitsAndBytesConfig (load_in_4bit=True).")
    # transformers matches these as suffixes (or regular expressions from the start): the layers inside a router
    # module (an MLP router's, the noise and residual maps) need the pattern of their own.
    inside = rf".*\.({'|'.join(ROUTER_MODULES)})\..*"
    skip = ["lm_head", *ROUTER_MODULES, inside, *trained, *(config.llm_int8_skip_modules or [])]
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    model.is_loaded_in_4bit = True  # peft wraps `Linear4bit` with its 4-bit LoRA layer only when this is set
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs, bitsandbytes (0.50) repacks a `Linear4bit` for its fused kernel on the first
            # forward in eval mode without autograd, and keeps it repacked: training forwards after an evaluation
            # then run that kernel, which has no backward (no gradient reaches the layer's input; with a bias, an
            # error). A model loaded for training evaluates between steps, so its layers never repack.
            module.support_avx512bf16_for_cpu = False


def _check_settings(
    model: nn.Module,
    experts: dict[str, nn.Module],
    quantization: ExpertQuantization,
    lora: ExpertLoraConfig,
    attention_lora: LoraConfig,
) -> None:
    """Bad settings fail here, with what to change, before any weight is read."""
    try:
        lora.validate()
        for module in experts.values():
            quantization.validate(module.gate_up_proj.shape[-1], module.down_proj.shape[-1])
    except ValueError as err:
        raise MoeifyError(str(err)) from None
    targets = attention_lora.target_modules
    if isinstance(targets, str) or not targets:
        return  # a regular expression: peft matches it
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name in names} - {"lm_head"})
        raise MoeifyError(
            f"LoRA target {', '.join(map(repr, sorted(missing)))} matches no linear module of {type(model).__name__}; "
            f"its linear modules are: {', '.join(linear)} (experts get LoRA through `lora`)."
        )


def _load_weights(
    model: PreTrainedModel,
    folder: Path,
    experts: dict[str, nn.Module],
    quantization: ExpertQuantization,
    dtype: torch.dtype,
    device: torch.device,
    prequantized: bool = False,
) -> None:
    reader = open_checkpoint(folder)
    names = set(reader)
    expert_params = {f"{name}.{p}" for name in experts for p in ("gate_up_proj", "down_proj")}
    expert_params |= {f"{name}.{p}_bias" for name in experts for p in ("gate_up_proj", "down_proj")}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in expert_params or not tensor.is_meta:
            continue
        source = checkpoint_name(name, names, model.config.model_type)
        if source is None:
            if name == "lm_head.weight" and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
                continue
            raise MoeifyError(f"{folder} lacks {name}: is it the checkpoint of a {type(model).__name__}?")
        value = reader.get(source)
        set_module_tensor_to_device(model, name, device, value=value.to(dtype) if value.is_floating_point() else value)
    for name, buffer in list(model.named_buffers()):  # computed at build time (rotary frequencies), on the CPU
        if buffer.device != device and name not in expert_params:
            set_module_tensor_to_device(model, name, device)
    for name, module in experts.items():  # one layer's experts at a time
        quantized = Experts4bit.like(module, quantization).to(device)
        if prequantized:  # the stored bytes and scales, as saved by `save_4bit`
            with torch.no_grad():
                for key, tensor in quantized.state_dict().items():
                    tensor.copy_(reader.get(f"{name}.{key}").view(tensor.dtype).view(tensor.shape))
        else:
            # One expert's matrix at a time, read straight into one buffer: a layer's experts never exist in full
            # precision at once (an 8B Llama upcycled to 8 experts: 2.6 GB per layer in bf16).
            pieces = expert_pieces(name, quantized.num_experts, names, model.config.model_type)
            for expert in range(quantized.num_experts):
                for param in EXPERT_PARAMS:
                    projection = param.removesuffix("_proj")
                    shape = quantized.shapes[projection]
                    dtype = reader.dtype(next(p.name for p in pieces if p.param == param))
                    weight = read_expert(pieces, param, expert, shape, dtype, reader).to(device)
                    quantized.quantize_expert_(projection, expert, weight)
                    del weight
            if quantized.has_bias:
                with torch.no_grad():
                    quantized.gate_up_bias.copy_(reader.get(f"{name}.gate_up_proj_bias"))
                    quantized.down_bias.copy_(reader.get(f"{name}.down_proj_bias"))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)


def read_config(folder: Path) -> tuple[PretrainedConfig, ExpertQuantization | None]:
    """The model config of `folder` and, for a `save_4bit` checkpoint, the quantization its experts were saved with.

    A 4-bit checkpoint's config.json names the model type `CHECKPOINT_MODEL_TYPE` (the real one is kept beside it),
    so plain transformers refuses it ("does not recognize this architecture") instead of loading random experts.
    """
    raw = json.loads((Path(folder) / "config.json").read_text())
    if raw.get("model_type") != CHECKPOINT_MODEL_TYPE:
        return AutoConfig.from_pretrained(folder), None
    raw["model_type"] = raw.pop("moeify_model_type")
    if "moeify_auto_map" in raw:
        raw["auto_map"] = raw.pop("moeify_auto_map")
    saved = raw.pop("quantization_config")
    if saved.get("quant_method") != QUANT_METHOD:
        raise MoeifyError(f"{folder}: unknown 4-bit checkpoint quant_method {saved.get('quant_method')!r}.")
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    quantization = ExpertQuantization(
        quant_type=saved["quant_type"],
        blocksize=saved["blocksize"],
        double_quant=saved["double_quant"],
        storage_dtype=getattr(torch, saved["storage_dtype"]),
    )
    return config, quantization


def save_4bit(model: nn.Module, out: str | Path) -> Path:
    """Save the base of a model with `Experts4bit` experts: experts as their 4-bit bytes and scales, the rest as is.

    LoRA and peft wrappers are left out (save the adapter with the PeftModel's own `save_pretrained`). Reload with
    `load_for_training(out)`: no quantization runs again.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    quantized = [m for m in base.modules() if isinstance(m, Experts4bit)]
    if not quantized:
        raise MoeifyError(f"{type(base).__name__} has no 4-bit experts to save: call quantize_experts first.")
    if getattr(base, "is_loaded_in_4bit", False):
        raise MoeifyError(
            "save_4bit stores 4-bit experts with full-precision linears; this model's linears are bitsandbytes 4-bit "
            "(linear_quantization): load it without linear_quantization to save its base."
        )
    settings = {m.quantization.storage for m in quantized}
    if len(settings) != 1:
        raise MoeifyError(f"experts quantized with different settings ({settings}) cannot share one checkpoint.")
    (q,) = settings
    state = {}
    for key, tensor in base.state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue  # adapter parameters
        # peft wrappers: `x.base_layer.y` holds `x.y`; `x.original_module.y` is the untrained copy of `x.y`
        state[re.sub(r"\.(base_layer|original_module)(?=\.)", "", key)] = tensor
    config = copy.deepcopy(base.config)
    config.quantization_config = {
        "quant_method": QUANT_METHOD,
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "double_quant": q.double_quant,
        "storage_dtype": str(q.storage_dtype).removeprefix("torch."),
    }
    out = Path(out)
    original = base.config
    base.config = config  # `save_pretrained` writes `self.config`
    try:
        base.save_pretrained(out, state_dict=state, save_original_format=False)
    finally:
        base.config = original
    raw = json.loads((out / "config.json").read_text())
    raw["moeify_model_type"], raw["model_type"] = raw["model_type"], CHECKPOINT_MODEL_TYPE
    if "auto_map" in raw:  # remote code would load it as the full-precision class, random experts and all
        raw["moeify_auto_map"] = raw.pop("auto_map")
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(
        _CHECKPOINT_README.format(model_type=raw["moeify_model_type"], **config.quantization_config)
    )
    return out


_CHECKPOINT_README = """# 4-bit training checkpoint (moeify)

The base of a {model_type} model with its routed experts stored as bitsandbytes {quant_type} 4-bit bytes and
scales (blocksize {blocksize}, double quant {double_quant}), written by `moeify.quant.save_4bit`. It is not a model
transformers loads on its own (config.json's model_type says so). Use it with moeify:

```python
from moeify.quant import load_for_training

model = load_for_training("THIS_FOLDER")  # no quantization runs again
```

or merge a LoRA adapter trained on it into full-precision weights: `moeify merge THIS_FOLDER ADAPTER -o OUT`.
"""


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing and input gradients (what peft's k-bit preparation would enable, without
    its float32 upcast), under the installed transformers' name: 5.25 renamed `gradient_checkpointing_enable` to
    `activation_checkpointing_enable` and the old one warns."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def upcast_trainable(model: nn.Module) -> int:
    """Store every trainable floating-point parameter in float32 (master weights), leaving frozen ones in their
    dtype; returns how many were cast.

    peft upcasts its LoRA factors (`autocast_adapter_dtype`), but not `modules_to_save` copies (routers, gates,
    shared experts trained in full): in bfloat16 AdamW's small updates round away, and float16 gradients cannot be
    unscaled. The forward then runs under autocast (Trainer's `bf16=True`). diffusers has this helper
    (`cast_training_params`); peft and transformers do not.
    """
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def freeze_unreachable(model: nn.Module) -> None:
    """Freeze parameters that no forward uses, so they never train: the gating-residual map of the first MoE layer
    (moeify's router), which has no earlier layer's logits to map. DDP stops with "parameters that were not used
    in producing loss" on such a parameter unless `find_unused_parameters` searches the graph every step."""
    for module in model.modules():
        residual = getattr(module, "residual", None)
        if isinstance(residual, nn.Module) and hasattr(module, "previous_layer") and module.previous_layer is None:
            residual.requires_grad_(False)
