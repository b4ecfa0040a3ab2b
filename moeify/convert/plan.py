"""Planning a conversion before anything is written: read the source's config, choose the MoE layers, the output
format and its config, and list every tensor the output will hold (`ConversionPlan`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from ..architectures import ArchitectureAdapter, get_adapter, supported_model_types
from ..errors import MoeifyError
from ..formats import MoESpec, OutputFormat, choose_format
from ..inspect.params import ParamSummary, summarize
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.source import load_config, resolve_source
from ..io.writer import TensorSpec
from .layers import LayerBuilder, moe_layer_specs, zeros_spec
from .methods import EXACT_METHODS
from .methods.base import layer_seed
from .methods.lora_seeds import LoraExpertSeeds
from .options import ConvertOptions, parse_layers


@dataclass
class ConversionPlan:
    """Everything a conversion will write, decided and checked before the first byte is written."""

    source: str
    local: Path
    options: ConvertOptions
    adapter: ArchitectureAdapter
    dense_config: PreTrainedConfig
    spec: MoESpec
    fmt: OutputFormat
    reason: str
    layout: str
    out_config: PreTrainedConfig
    tensors: list[TensorSpec]
    params: ParamSummary
    notes: list[str]


def _dense_text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder config to upcycle; refuse multimodal wrappers with a clear message."""
    if config.model_type in supported_model_types():
        return config
    raise MoeifyError(
        f"architecture '{config.model_type}' is not supported; supported: {', '.join(supported_model_types())}."
    )


def _moe_spec(
    adapter: ArchitectureAdapter,
    dense_config: PreTrainedConfig,
    options: ConvertOptions,
    moe_layers: list[int],
    intermediate: int,
) -> MoESpec:
    """The MoE to write; `intermediate` is the dense FFN's size (a fine-grained expert gets 1/granularity of it)."""
    parts, flag = (options.num_experts, "--split") if options.split else (options.granularity, "--granularity")
    shared = options.shared_expert_size or 0  # neurons the shared experts take out of the routed ones
    if shared >= intermediate:
        raise MoeifyError(
            f"--shared-expert-size {shared} leaves no neurons for the routed experts: the FFN has {intermediate}."
        )
    if (intermediate - shared) % parts:
        what = f"--num-experts {parts}" if options.split else f"--granularity {parts}"
        rest = f"the {intermediate - shared} neurons left after --shared-expert-size" if shared else "the FFN's"
        raise MoeifyError(
            f"{flag}: {what} must divide {rest} {'' if shared else f'{intermediate} '}neurons; choose a divisor."
        )
    return MoESpec(
        num_experts=options.num_experts,
        top_k=options.top_k,
        shared_experts=options.shared_experts,
        moe_layers=moe_layers,
        num_layers=dense_config.num_hidden_layers,
        intermediate_size=(intermediate - shared) // parts,
        shared_intermediate_size=shared or intermediate,
        mlp_bias=adapter.mlp_bias(dense_config),
        activation=adapter.activation(dense_config),
        router=options.router_settings(),
        expert_lora_rank=options.expert_lora_rank if options.method == "lora-experts" else 0,
        expert_lora_alpha=options.expert_lora_alpha,
    )


def planned_config(dense_config: PreTrainedConfig, options: ConvertOptions) -> PreTrainedConfig:
    """The config `convert` would write for a dense model with `dense_config`, from the config alone (no weights:
    the expert size is the config's `intermediate_size`)."""
    options.validate()
    dense_config = _dense_text_config(dense_config)
    adapter = get_adapter(dense_config.model_type)
    moe_layers = parse_layers(options.layers, dense_config.num_hidden_layers)
    spec = _moe_spec(adapter, dense_config, options, moe_layers, dense_config.intermediate_size)
    fmt, _ = choose_format(adapter, dense_config, spec, options.format, options.custom_router())
    return fmt.build_config(adapter, dense_config, spec)


def plan_conversion(source: str, options: ConvertOptions, progress: bool = True) -> ConversionPlan:
    """Resolve `source`, pick the output format and list every output tensor (name, dtype, shape, producer).

    Raises `MoeifyError` for bad input. Reads configs and safetensors headers only, no weights.
    """
    options.validate()
    local = resolve_source(source, options.revision, options.trust_remote_code, progress)
    dense_config = _dense_text_config(load_config(local, options.trust_remote_code))
    adapter = get_adapter(dense_config.model_type)
    num_layers = dense_config.num_hidden_layers
    moe_layers = parse_layers(options.layers, num_layers)
    if not moe_layers:
        raise MoeifyError(f"--layers '{options.layers}' selects no layer; the model has {num_layers} layers.")

    reader = open_checkpoint(local, options.allow_pickle)
    first = adapter.ffn_tensor_names(moe_layers[0], dense_config)
    missing = [name for name in first.values() if name not in reader]
    if missing:
        raise MoeifyError(
            f"{local} lacks the {adapter.display_name} MLP tensors {missing}; "
            f"is it a {adapter.display_name} checkpoint?"
        )
    hidden, intermediate = reader.shape(first["down"])
    expert_readers = _open_expert_sources(options, dense_config, reader, progress)
    router_rows = None
    if options.calibration:
        router_rows = _calibrated_router_rows(local, adapter, moe_layers, options)
    elif options.expert_prompts:
        from .calibration import prompt_router, read_expert_prompts

        prompts = read_expert_prompts(Path(options.expert_prompts), options.num_experts)
        router_rows = prompt_router(local, prompts, moe_layers, adapter.mlp_module, options.router_init_std)
    spec = _moe_spec(adapter, dense_config, options, moe_layers, intermediate)
    fmt, reason = choose_format(adapter, dense_config, spec, options.format, options.custom_router())
    layout = options.layout if options.layout in fmt.layouts else fmt.layouts[0]
    notes = []
    if fmt.unrenormalised_in:
        needs = _renormalisation_needed(options)
        if needs is None:
            spec = dataclasses.replace(spec, renormalize=False)
        else:
            notes.append(
                f"{fmt.unrenormalised_in} computes {fmt.class_name} without renormalising the top-k weights, and "
                f"{needs}: it will not compute this output as transformers and vLLM do"
            )
    if fmt.no_dense_layers_in and not spec.all_layers:
        notes.append(
            f"{fmt.no_dense_layers_in} builds {fmt.class_name} with an MoE block in every layer, so this output (dense "
            f"layers besides MoE ones) does not convert there: upcycle every layer for it"
        )
    if options.layout and layout != options.layout:
        notes.append(f"the {fmt.name} format is always written {layout}")

    def out_dtype(source_dtype: torch.dtype) -> torch.dtype:
        if not source_dtype.is_floating_point:
            return source_dtype
        return options.torch_dtype or source_dtype

    ffn_dtype = out_dtype(reader.dtype(first["down"]))
    out_config = fmt.build_config(adapter, dense_config, spec)
    out_config.dtype = ffn_dtype
    deviation = not_exact(options)
    if deviation is not None:  # saved in config.json: `moeify verify` reads why the MoE differs from its source
        out_config.moeify_deviation = deviation
    names = fmt.tensor_names(adapter, spec)
    builder = LayerBuilder(
        reader,
        adapter,
        dense_config,
        options,
        out_dtype,
        gated_shared=names.shared_gate is not None,
        expert_readers=expert_readers,
        router_rows=router_rows,
        renormalize=spec.renormalize,
    )
    if options.lora_expert_sources:
        from ..io.peft_adapter import adapter_folder

        builder.lora_seeds = LoraExpertSeeds(
            [adapter_folder(source) for source in options.lora_expert_sources],
            lambda layer: adapter.ffn_tensor_names(layer, dense_config),
            spec.expert_lora_rank,
            spec.expert_lora_alpha or 2.0 * spec.expert_lora_rank,
            0.5 if options.shared_experts else 1.0,
            lambda message: print(message, file=sys.stderr),
        )

    # Every output tensor in layer order (so the builder holds one layer at a time), plus the same list in
    # the fused layout, which is how the output class names its parameters in memory.
    ffn_names = {layer: set(adapter.ffn_tensor_names(layer, dense_config).values()) for layer in moe_layers}
    layer_of = re.compile("^" + re.escape(adapter.layer_prefix).replace(r"\{layer\}", r"(\d+)"))
    by_layer: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in reader:
        match = layer_of.match(name)
        (by_layer.setdefault(int(match.group(1)), []) if match else outside).append(name)

    def passthrough(name: str) -> TensorSpec:
        dtype = out_dtype(reader.dtype(name))
        if options.merge_non_ffn == "average" and dtype.is_floating_point:  # the mean over the expert sources
            return TensorSpec(name, dtype, reader.shape(name), lambda: iter([_mean(expert_readers, name)]))
        return TensorSpec(name, dtype, reader.shape(name), lambda: iter([reader.get(name)]))

    zero_tensors = fmt.zero_tensors(adapter, dense_config, spec)
    extra = fmt.router_tensors(adapter, spec, hidden)
    tensors = [passthrough(n) for n in outside]
    in_memory = list(tensors)
    for layer in range(num_layers):
        prefix = adapter.layer_prefix.format(layer=layer)
        for name in by_layer.get(layer, []):
            if name not in ffn_names.get(layer, ()):
                tensors.append(passthrough(name))
                in_memory.append(tensors[-1])
        for name, shape in zero_tensors.items():
            tensors.append(zeros_spec(prefix + name, ffn_dtype, shape))
            in_memory.append(tensors[-1])
        if layer in ffn_names:
            tensors += moe_layer_specs(layer, prefix, names, layout, spec, hidden, ffn_dtype, builder, extra)
            in_memory += moe_layer_specs(layer, prefix, names, "fused", spec, hidden, ffn_dtype, None, extra)

    unused = _check_against_output_class(fmt, out_config, in_memory, reader)
    if unused:
        notes.append(f"dropped {len(unused)} source tensors the output class does not use ({unused[0]}, ...)")
    tensors = [t for t in tensors if t.name not in unused]
    params = summarize({t.name: t.shape for t in in_memory if t.name not in unused}, out_config)
    return ConversionPlan(
        source, local, options, adapter, dense_config, spec, fmt, reason, layout, out_config, tensors, params, notes
    )


def _renormalisation_needed(options: ConvertOptions) -> str | None:
    """Why this MoE is exact only with renormalised top-k weights (None: the near-uniform form is exact too).

    Without renormalisation the top-k weights sum to K / E only while the router is uniform, and the routed
    experts then carry E / K, which scales exactly only by a power of two.
    """
    if options.router_init not in ("random", "zeros"):
        return f"--router-init {options.router_init} starts the router far from uniform"
    ratio = options.num_experts / options.top_k
    if not math.log2(ratio).is_integer():
        return f"E / K = {options.num_experts} / {options.top_k} is not a power of two"
    return None


def _check_against_output_class(
    fmt: OutputFormat, config: PreTrainedConfig, in_memory: list[TensorSpec], reader: Checkpoint
) -> list[str]:
    """Compare the planned tensors with the output class's parameters; return source tensors it does not use.

    A mismatch here is a bug in an adapter or format, caught before anything is written.
    """
    expected = _expected_state(fmt, config)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    unexpected = [t.name for t in in_memory if t.name not in expected]
    unused = [n for n in unexpected if n in reader]  # e.g. old `rotary_emb.inv_freq` buffers
    wrong = [
        f"{t.name} {t.shape} != {expected[t.name]}"
        for t in in_memory
        if t.name in expected and tuple(t.shape) != expected[t.name]
    ]
    absent = sorted(set(expected) - {t.name for t in in_memory} - ({"lm_head.weight"} if tied else set()))
    invented = sorted(set(unexpected) - set(unused))
    if wrong or absent or invented:
        raise RuntimeError(
            f"internal error: output tensors do not match {fmt.class_name}: shapes {wrong[:3]}, missing "
            f"{absent[:3]}, unexpected {invented[:3]}. Please report this."
        )
    return unused


def _expected_state(fmt: OutputFormat, config: PreTrainedConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes the output class expects, from an instance on the meta device (no memory)."""
    with torch.device("meta"):
        model = fmt.model_class(config)(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _open_expert_sources(
    options: ConvertOptions, dense_config: PreTrainedConfig, base: Checkpoint, progress: bool
) -> list[Checkpoint]:
    """The checkpoints of `--expert` sources, checked against the base: same architecture, every tensor of the
    base present with the same shape (fine-tunes of one base)."""
    readers = []
    for source in options.expert_sources:
        local = resolve_source(source, None, options.trust_remote_code, progress)
        config = _dense_text_config(load_config(local, options.trust_remote_code))
        if config.model_type != dense_config.model_type:
            raise MoeifyError(
                f"--expert {source} is a {config.model_type} model and the base is {dense_config.model_type}: "
                "experts must be fine-tunes of the base architecture."
            )
        reader = open_checkpoint(local, options.allow_pickle)
        for name in base:
            if name not in reader:
                raise MoeifyError(f"--expert {source} lacks the base's tensor {name}: is it a fine-tune of the base?")
            if tuple(reader.shape(name)) != tuple(base.shape(name)):
                raise MoeifyError(
                    f"--expert {source}: {name} has shape {tuple(reader.shape(name))}, the base's is "
                    f"{tuple(base.shape(name))}; experts must have the base's shapes."
                )
        readers.append(reader)
    return readers


def _calibrated_router_rows(
    local: Path, adapter: ArchitectureAdapter, layers: list[int], options: ConvertOptions
) -> dict[int, torch.Tensor]:
    """`--router-init kmeans`: per MoE layer, router rows from balanced k-means of its real inputs on the calibration
    text (one row per group of `--granularity` experts), the dense model run with its weights on disk."""
    from .calibration import calibration_texts, kmeans_router, router_inputs

    assert options.calibration is not None
    texts = calibration_texts(options.calibration)
    inputs = router_inputs(local, texts, layers, adapter.mlp_module, max_tokens=options.calibration_tokens)
    rows = options.num_experts // options.granularity
    return {
        layer: kmeans_router(x, rows, options.router_init_std, layer_seed(options.seed, layer))
        for layer, x in inputs.items()
    }


def _mean(readers: Sequence[Checkpoint], name: str) -> torch.Tensor:
    """`name` averaged over `readers` (in float32, back to the first one's dtype)."""
    total = sum(reader.get(name).float() for reader in readers)
    return (total / len(readers)).to(readers[0].dtype(name))


def not_exact(options: ConvertOptions) -> str | None:
    """Why the output does not reproduce the dense model at step 0, or `None` where it does."""
    why = [] if options.method in EXACT_METHODS else [f"the {options.method} method changes the experts"]
    if options.expert_sources:
        why.append(f"the experts are the FFNs of {len(options.expert_sources)} other models (--expert)")
        if options.merge_non_ffn == "average":
            why.append("the other weights are their average")
    if options.lora_expert_sources:
        n = len(options.lora_expert_sources)
        why.append(f"the first {n} experts' LoRA deltas come from trained adapters (--lora-expert)")
    if options.split:
        why.append(f"the FFN's neurons were split ({options.split}) into {options.num_experts} disjoint experts")
    transforms = options.expert_transforms()
    if "drop_upcycling" in transforms:
        settings = transforms["drop_upcycling"]
        sets = "independently in gate, up and down" if settings["independent"] else "the same neurons in gate, up, down"
        why.append(f"Drop-Upcycling re-initialised {settings['rate']:.0%} of each expert's neurons ({sets})")
    if "expert_noise" in transforms:
        why.append(f"each expert got relative Gaussian noise (std {transforms['expert_noise']['std']:g})")
    deviation = options.router_deviation()
    return "; ".join([*why, *([deviation] if deviation else [])]) or None


def router_summary(options: ConvertOptions) -> str:
    """The router settings that differ from the defaults, for the model card."""
    return ", ".join(f"{key}={value}" for key, value in options.custom_router().items())
