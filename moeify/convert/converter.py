"""`moeify convert`: plan -> per-layer upcycling transforms -> streaming writer, into OUT atomically.

The converter knows no architecture (adapters do) and no output naming (formats do). It reads source
tensors lazily, builds one MoE layer at a time, writes each shard header first and tensors as produced,
in a temporary folder beside OUT that is renamed into place only when everything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedConfig
from transformers.dynamic_module_utils import custom_object_save

from ..architectures import ArchitectureAdapter, get_adapter, supported_model_types
from ..errors import MoeifyError
from ..formats import MoESpec, MoETensorNames, OutputFormat, choose_format
from ..formats.base import RouterTensor, shared_gate_epsilon
from ..inspect.model_card import render_model_card, source_license
from ..inspect.params import ParamSummary, summarize
from ..io.atomic import atomic_output, check_output_folder
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.source import TOKENIZER_FILES, is_hub_id, load_config, resolve_source
from ..io.writer import TensorSpec, parse_max_shard_size, write_safetensors
from .methods import EXACT_METHODS, apply_transforms, get_method
from .methods.base import ExpertFFN, LayerContext, LazyExperts, MoELayerWeights, layer_seed
from .methods.lora_seeds import LoraExpertSeeds
from .options import ConvertOptions, parse_layers


@dataclass
class ConversionResult:
    """What `convert` wrote."""

    output: Path
    format: str
    output_class: str
    reason: str
    layout: str
    architecture: str
    params: ParamSummary
    exact: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The one-paragraph report printed at the end of a conversion."""
        p = self.params
        layers = f"{len(p.moe_layers)} MoE layers" if p.moe_layers else "no MoE layers"
        shared = f", {p.shared_experts} shared" if p.shared_experts else ""
        exact = "outputs equal the dense model's at step 0" if self.exact else "outputs differ from the dense model's"
        return (
            f"Wrote {self.output} in {self.seconds:.1f}s: {self.architecture} -> {self.output_class} "
            f"({self.format} format, {self.layout} layout; {self.reason}). {layers}, {p.num_experts} experts, "
            f"top-{p.top_k}{shared}; {p.total:,} parameters in total, {p.active:,} active per token; {exact}. "
            f"Check with: moeify verify DENSE {self.output}"
        )


def _dense_text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder config to upcycle; refuse multimodal wrappers with a clear message."""
    if config.model_type in supported_model_types():
        return config
    raise MoeifyError(
        f"architecture '{config.model_type}' is not supported; supported: {', '.join(supported_model_types())}."
    )


# Router init of the near-uniform form (`MoESpec.renormalize` False), per 1/sqrt(hidden): logits of about 1e-6
# break every token's top-k tie, while the top-k weights stay K / E to about 1e-6.
NEAR_UNIFORM_STD = 2.0**-20


class _LayerBuilder:
    """Builds MoE layers on demand, keeping only the current one (tensors are requested in layer order)."""

    def __init__(
        self,
        reader: Checkpoint,
        adapter: ArchitectureAdapter,
        dense_config: PreTrainedConfig,
        options: ConvertOptions,
        out_dtype: Callable[[torch.dtype], torch.dtype],
        gated_shared: bool = True,
        expert_readers: Sequence[Checkpoint] = (),
        router_rows: dict[int, torch.Tensor] | None = None,
        renormalize: bool = True,
    ) -> None:
        self.router_rows = router_rows or {}  # `--router-init kmeans`: one row per group of experts, per layer
        self.renormalize = renormalize  # False: a near-uniform router and routed experts scaled by E / K
        self.lora_seeds: LoraExpertSeeds | None = None  # `--lora-expert`: adapters that seed the experts' deltas
        self.reader = reader
        self.expert_readers = list(expert_readers)  # `--expert`: one checkpoint per expert
        self.gated_shared = gated_shared
        self.adapter = adapter
        self.dense_config = dense_config
        self.options = options
        self.out_dtype = out_dtype
        self.method = get_method(
            "split" if options.split else "fine-grained" if options.granularity > 1 else options.method
        )
        self._layer: int | None = None
        self._weights: MoELayerWeights | None = None

    def dense_ffn(self, layer: int, reader: Checkpoint | None = None) -> ExpertFFN:
        names = self.adapter.ffn_tensor_names(layer, self.dense_config)
        get = (reader or self.reader).get
        if "gate_up" in names:
            gate, up = get(names["gate_up"]).chunk(2, dim=0)
            gate_bias, up_bias = get(names["gate_up_bias"]).chunk(2) if "gate_up_bias" in names else (None, None)
        else:
            gate, up = get(names["gate"]), get(names["up"])
            gate_bias = get(names["gate_bias"]) if "gate_bias" in names else None
            up_bias = get(names["up_bias"]) if "up_bias" in names else None
        down_bias = get(names["down_bias"]) if "down_bias" in names else None
        return ExpertFFN(gate, up, get(names["down"]), gate_bias, up_bias, down_bias)

    def get(self, layer: int) -> MoELayerWeights:
        if self._layer != layer:
            self._weights = None  # free the previous layer before building the next
            dense = self.dense_ffn(layer)
            dtype = self.out_dtype(dense.gate.dtype)
            ctx = LayerContext(
                layer,
                self.options.num_experts,
                self.options.top_k,
                self.options.shared_experts,
                self.options.router_init,
                self.options.router_init_std if self.renormalize else NEAR_UNIFORM_STD / math.sqrt(dense.gate.shape[1]),
                self.options.seed,
                self.options.expert_transforms(),
                self.options.granularity,
                self.options.split,
                self.options.shared_expert_size or 0,
            )
            # Methods run in the output dtype, so no float32 copy of the layer is held: the copy method only
            # scales by exact factors, and torch computes bf16/fp16 element-wise ops in float32 internally.
            weights = apply_transforms(self.method(_to(dense, dtype), ctx), ctx)
            del dense
            if layer in self.router_rows:
                rows = self.router_rows[layer].repeat_interleave(self.options.granularity, dim=0)
                weights = MoELayerWeights(rows, weights.experts, weights.shared, weights.shared_gate)
            if self.expert_readers:  # Branch-Train-MiX: expert e is the FFN of source e, read when written
                weights = MoELayerWeights(
                    weights.router,
                    LazyExperts(len(self.expert_readers), partial(self._source_expert, layer, dtype)),
                    weights.shared,
                    weights.shared_gate,
                )
            # Without renormalisation the top-k weights sum to K / E: the routed experts' outputs carry E / K.
            scale = 1.0 if self.renormalize else self.options.num_experts / self.options.top_k

            def finish(expert: ExpertFFN) -> ExpertFFN:
                expert = _to(expert, dtype)
                return expert if scale == 1.0 else expert.scaled_output(scale)

            experts: Sequence[ExpertFFN]
            if isinstance(weights.experts, LazyExperts):  # distinct experts, built one at a time as written
                lazy = weights.experts
                experts = LazyExperts(len(lazy), lambda e: finish(lazy[e]))
            else:  # convert each distinct expert once, however many experts share it
                converted: dict[int, ExpertFFN] = {}
                for expert in weights.experts:
                    if id(expert) not in converted:
                        converted[id(expert)] = finish(expert)
                experts = [converted[id(e)] for e in weights.experts]
            shared = weights.shared
            if shared is not None and weights.shared_gate is not None and not self.gated_shared:
                # The format adds shared experts ungated: fold the method's gate in, exact while it is zero
                # (sigmoid(0) = 1/2 for every token).
                if torch.count_nonzero(weights.shared_gate):
                    raise MoeifyError(f"upcycling method '{self.options.method}' needs a shared-expert gate")
                shared = shared.scaled_output(0.5)
            self._weights = MoELayerWeights(
                router=weights.router.to(dtype),
                experts=experts,
                shared=_to(shared, dtype) if shared is not None else None,
                shared_gate=weights.shared_gate.to(dtype) if weights.shared_gate is not None else None,
            )
            self._layer = layer
        assert self._weights is not None
        return self._weights

    def _source_expert(self, layer: int, dtype: torch.dtype, expert: int) -> ExpertFFN:
        """Expert `expert` of `layer` with `--expert`: that source's FFN (halved beside shared experts, as the copy
        method does)."""
        ffn = _to(self.dense_ffn(layer, self.expert_readers[expert]), dtype)
        return ffn.scaled_output(0.5) if self.options.shared_experts else ffn


def _to(ffn: ExpertFFN, dtype: torch.dtype) -> ExpertFFN:
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    return ExpertFFN(
        cast(ffn.gate), cast(ffn.up), cast(ffn.down), cast(ffn.gate_bias), cast(ffn.up_bias), cast(ffn.down_bias)
    )  # type: ignore[arg-type]


def _moe_layer_specs(
    layer: int,
    prefix: str,
    names: MoETensorNames,
    layout: str,
    spec: MoESpec,
    hidden: int,
    dtype: torch.dtype,
    builder: _LayerBuilder | None,
    extra_tensors: dict[str, RouterTensor],
) -> list[TensorSpec]:
    """Output tensors of one MoE layer in `layout`; producers pull the layer from `builder`. The router's rows of
    null experts, an MLP router and `extra_tensors` (the format's `router_tensors`) start random or zero."""
    E, I, H = spec.num_experts, spec.intermediate_size, hidden  # noqa: E741 (the papers' names)

    def produce(pick: Callable[[MoELayerWeights], list[torch.Tensor]]) -> Callable[[], Iterator[torch.Tensor]]:
        def run() -> Iterator[torch.Tensor]:
            assert builder is not None
            yield from pick(builder.get(layer))

        return run

    router = spec.router or {"network": "linear", "null_experts": {}}
    choices = E + spec.num_null_experts
    inner = router["mlp_hidden_size"] if router["network"] == "mlp" else H
    seed = builder.options.seed if builder is not None else 0
    std = builder.options.router_init_std if builder is not None else 0.0
    zeros = builder is not None and builder.options.router_init == "zeros"

    def random(shape: tuple[int, ...], salt: int) -> torch.Tensor:
        """N(0, router_init_std) from a generator seeded by (seed, layer, tensor); zeros with --router-init zeros."""
        if zeros:
            return torch.zeros(shape, dtype=dtype)
        generator = torch.Generator().manual_seed(layer_seed(seed, layer) * 17 + salt)
        return (torch.randn(shape, generator=generator) * std).to(dtype)

    def router_weight(weights: MoELayerWeights) -> list[torch.Tensor]:
        if inner != H:  # an MLP router: the method's (E, H) rows do not fit its output layer
            return [random((choices, inner), 1)]
        if choices == E:
            return [weights.router]
        return [torch.cat([weights.router, random((choices - E, H), 2)])]  # rows of the null experts

    out = [TensorSpec(prefix + names.router_name(layout), dtype, (choices, inner), produce(router_weight))]
    for salt, (name, extra) in enumerate(extra_tensors.items(), start=3):
        if extra.init == "random":
            make = lambda shape=extra.shape, salt=salt: iter([random(shape, salt)])  # noqa: E731
            out.append(TensorSpec(prefix + name, dtype, extra.shape, make))
        else:
            out.append(zeros_spec(prefix + name, dtype, extra.shape))
    fused_names = names.saved_fused if layout == "per-expert" and names.saved_fused else names.fused
    if spec.expert_lora_rank:
        seeds = builder.lora_seeds if builder is not None else None
        out += _lora_experts_specs(prefix, names, spec, hidden, dtype, produce, layer_seed(seed, layer), layer, seeds)
    elif layout == "fused" or names.saved_fused:
        out.append(
            TensorSpec(
                prefix + fused_names["gate_up"], dtype, (E, 2 * I, H), produce(lambda w: _fused_gate_up(w.experts))
            )
        )
        out.append(
            TensorSpec(prefix + fused_names["down"], dtype, (E, H, I), produce(lambda w: (e.down for e in w.experts)))
        )
        if spec.mlp_bias:
            out.append(
                TensorSpec(
                    prefix + names.fused["gate_up_bias"],
                    dtype,
                    (E, 2 * I),
                    produce(lambda w: _fused_gate_up_bias(w.experts)),
                )
            )
            out.append(
                TensorSpec(
                    prefix + names.fused["down_bias"],
                    dtype,
                    (E, H),
                    produce(lambda w: (e.down_bias for e in w.experts)),
                )
            )
    else:
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        for e in range(E):
            for role, template in names.per_expert.items():
                out.append(
                    TensorSpec(
                        prefix + template.format(e=e),
                        dtype,
                        shapes[role],
                        produce(lambda w, e=e, role=role: [getattr(w.experts[e], role)]),
                    )
                )
    epsilon = shared_gate_epsilon(dtype) if names.nonzero_shared_gate else 0.0  # what a zero gate is written as
    if spec.shared_experts:
        SI = spec.shared_experts * spec.shared_intermediate_size
        shared_shapes = {
            "gate_up": (2 * SI, H),
            "gate": (SI, H),
            "up": (SI, H),
            "down": (H, SI),
            "gate_bias": (SI,),
            "up_bias": (SI,),
            "down_bias": (H,),
        }
        for role, name in names.shared.items():
            out.append(
                TensorSpec(prefix + name, dtype, shared_shapes[role], produce(lambda w, role=role: [_shared(w, role)]))
            )
        if names.shared_gate:
            gate = produce(lambda w: [_shared_gate(w.shared_gate, epsilon)])
            out.append(TensorSpec(prefix + names.shared_gate, dtype, (1, H), gate))
    elif names.neutral_shared_size and names.shared_gate:
        n = names.neutral_shared_size
        neutral = {names.shared["gate"]: (n, H), names.shared["up"]: (n, H), names.shared["down"]: (H, n)}
        out += [zeros_spec(prefix + name, dtype, shape) for name, shape in neutral.items()]
        out.append(
            TensorSpec(
                prefix + names.shared_gate, dtype, (1, H), lambda: iter([torch.full((1, H), epsilon, dtype=dtype)])
            )
        )
    return out


def _lora_experts_specs(
    prefix: str,
    names: MoETensorNames,
    spec: MoESpec,
    hidden: int,
    dtype: torch.dtype,
    produce: Callable[[Callable[[MoELayerWeights], Any]], Callable[[], Iterator[torch.Tensor]]],
    seed: int,
    layer: int,
    seeds: LoraExpertSeeds | None,
) -> list[TensorSpec]:
    """lora-experts (MixLoRA): the experts' one FFN, written once (every expert is the same copy), and each expert's
    LoRA delta: A ~ U(+-1/sqrt(in)) as peft initialises LoRA (seeded by seed and layer), B = 0 (exact at step 0);
    with `--lora-expert` adapters, the first experts' factors come from them (`moeify.convert.methods.lora_seeds`)."""
    E, I, H, r = spec.num_experts, spec.intermediate_size, hidden, spec.expert_lora_rank  # noqa: E741

    def base(weights: MoELayerWeights) -> Any:
        return weights.experts[0]

    out = [
        TensorSpec(prefix + names.fused["gate_up"], dtype, (2 * I, H), produce(lambda w: _fused_gate_up([base(w)]))),
        TensorSpec(prefix + names.fused["down"], dtype, (H, I), produce(lambda w: [base(w).down])),
    ]
    if spec.mlp_bias:
        out.append(
            TensorSpec(
                prefix + names.fused["gate_up_bias"], dtype, (2 * I,), produce(lambda w: _fused_gate_up_bias([base(w)]))
            )
        )
        out.append(TensorSpec(prefix + names.fused["down_bias"], dtype, (H,), produce(lambda w: [base(w).down_bias])))
    for salt, (projection, inputs, outputs) in enumerate((("gate_up", H, 2 * I), ("down", I, H))):

        def factors(
            projection: str = projection, inputs: int = inputs, outputs: int = outputs, salt: int = salt
        ) -> tuple[torch.Tensor, torch.Tensor]:
            generator = torch.Generator().manual_seed(seed * 31 + salt)
            lora_a = (torch.rand((E * r, inputs), generator=generator) * 2 - 1) * inputs**-0.5
            lora_b = torch.zeros(outputs, E * r)
            if seeds is not None:
                seeds.seed(layer, projection, lora_a, lora_b)
            return lora_a.to(dtype), lora_b.to(dtype)

        a_name, b_name = (prefix + names.expert_deltas[f"{projection}_{f}"] for f in "AB")
        out.append(TensorSpec(a_name, dtype, (E * r, inputs), lambda factors=factors: iter([factors()[0]])))
        if seeds is None:
            out.append(zeros_spec(b_name, dtype, (outputs, E * r)))
        else:
            out.append(TensorSpec(b_name, dtype, (outputs, E * r), lambda factors=factors: iter([factors()[1]])))
    return out


def zeros_spec(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> TensorSpec:
    """An output tensor of zeros (tensors a format needs that the dense model has no counterpart for)."""
    return TensorSpec(name, dtype, shape, lambda: iter([torch.zeros(shape, dtype=dtype)]))


def _shared_gate(gate: torch.Tensor | None, epsilon: float) -> torch.Tensor:
    """The shared-expert gate as written: a gate the method left at zero becomes `epsilon` where the format needs
    a non-zero one (`MoETensorNames.nonzero_shared_gate`)."""
    assert gate is not None
    return torch.full_like(gate, epsilon) if epsilon and not gate.any() else gate


def _shared(weights: MoELayerWeights, role: str) -> torch.Tensor:
    shared = weights.shared
    assert shared is not None
    return torch.cat([shared.gate, shared.up], dim=0) if role == "gate_up" else getattr(shared, role)


def _fused_gate_up(experts: Sequence[ExpertFFN]) -> Iterator[torch.Tensor]:
    last: tuple[ExpertFFN, torch.Tensor] | None = None  # holds the expert too: a freed object's id can come back
    for e in experts:
        if last is None or last[0] is not e:  # copies of one expert (the same object) are concatenated once
            last = (e, torch.cat([e.gate, e.up], dim=0))
        yield last[1]


def _fused_gate_up_bias(experts: Sequence[ExpertFFN]) -> Iterator[torch.Tensor]:
    for e in experts:
        yield torch.cat([e.gate_bias, e.up_bias])  # type: ignore[list-item]


def _expected_state(fmt: OutputFormat, config: PreTrainedConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes the output class expects, from an instance on the meta device (no memory)."""
    with torch.device("meta"):
        model = fmt.model_class(config)(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


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
    deviation = _not_exact(options)
    if deviation is not None:  # saved in config.json: `moeify verify` reads why the MoE differs from its source
        out_config.moeify_deviation = deviation
    names = fmt.tensor_names(adapter, spec)
    builder = _LayerBuilder(
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
            tensors += _moe_layer_specs(layer, prefix, names, layout, spec, hidden, ffn_dtype, builder, extra)
            in_memory += _moe_layer_specs(layer, prefix, names, "fused", spec, hidden, ffn_dtype, None, extra)

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


def convert(
    source: str,
    out: str | os.PathLike,
    options: ConvertOptions | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Upcycle the dense causal LM at `source` into an MoE written to `out`.

    Args:
        source: a checkpoint folder, a Hub id (`org/name[@revision]`) or a `.gguf` file.
        out: output folder; created atomically (a temporary folder beside it is renamed at the end).
        options: the conversion settings (`ConvertOptions`, the CLI flags).
        progress: show progress bars.
        log: where to report decisions (defaults to stderr).

    Returns:
        a `ConversionResult` with the chosen format, parameter counts and a printable `summary()`.

    Raises:
        MoeifyError: bad input (nothing is written).
    """
    started = time.perf_counter()
    options = options or ConvertOptions()
    say = log or (lambda message: print(message, file=sys.stderr))
    max_shard = parse_max_shard_size(options.max_shard_size)
    out_path = Path(out).expanduser().absolute()
    check_output_folder(out_path, options.overwrite)
    plan = plan_conversion(source, options, progress)
    say(f"moeify: {plan.adapter.display_name} -> {plan.fmt.class_name}: {plan.reason}.")
    with atomic_output(out_path) as tmp:
        write_safetensors(plan.tensors, tmp, max_shard, progress)
        _write_metadata(plan, tmp)
    return ConversionResult(
        output=out_path,
        format=plan.fmt.name,
        output_class=plan.fmt.class_name,
        reason=plan.reason,
        layout=plan.layout,
        architecture=plan.adapter.display_name,
        params=plan.params,
        exact=_not_exact(options) is None,
        seconds=time.perf_counter() - started,
        notes=plan.notes,
    )


def _write_metadata(plan: ConversionPlan, folder: Path) -> None:
    """Config (+ modeling code for the moeify format), generation config, tokenizer files, model card."""
    if plan.fmt.name == "moeify":
        with torch.device("meta"):
            meta_model = plan.fmt.model_class(plan.out_config)(plan.out_config)
        custom_object_save(meta_model, folder, config=plan.out_config)  # modeling files + auto_map
        plan.out_config.auto_map["AutoModel"] = "modeling_moeify.MoeifyModel"  # the decoder alone (vLLM)
    plan.out_config.save_pretrained(folder)
    if (plan.local / "generation_config.json").exists():
        shutil.copy2(plan.local / "generation_config.json", folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(plan.dense_config).save_pretrained(folder)
    for file_name in TOKENIZER_FILES:
        if (plan.local / file_name).exists():
            shutil.copy2(plan.local / file_name, folder / file_name)
    options, spec = plan.options, plan.spec
    settings = {
        "experts": options.num_experts,
        "top-k": options.top_k,
        "shared experts": f"{options.shared_experts}"
        + (f" of {options.shared_expert_size} neurons (the FFN's first)" if options.shared_expert_size else ""),
        "MoE layers": f"{len(spec.moe_layers)} of {spec.num_layers} ({options.layers})",
        "upcycling": " + ".join(
            [
                options.method
                + (
                    f" (one shared FFN per layer, per-expert LoRA rank {spec.expert_lora_rank}, alpha "
                    f"{spec.expert_lora_alpha or 2 * spec.expert_lora_rank:g}, B = 0)"
                    if spec.expert_lora_rank
                    else ""
                ),
                *([f"fine-grained, granularity {options.granularity}"] if options.granularity > 1 else []),
                *([f"neuron split ({options.split})"] if options.split else []),
                *([f"experts from {', '.join(options.expert_sources)}"] if options.expert_sources else []),
                *(
                    [f"expert deltas seeded from {', '.join(options.lora_expert_sources)}"]
                    if options.lora_expert_sources
                    else []
                ),
                *(["non-FFN weights averaged"] if options.merge_non_ffn == "average" else []),
                *(f"{name.replace('_', '-')} {settings}" for name, settings in options.expert_transforms().items()),
            ]
        ),
        "router init": f"{options.router_init} (seed {options.seed})"
        + (f", on {options.calibration_tokens} tokens of {options.calibration}" if options.calibration else "")
        + (f", from {Path(options.expert_prompts).name}" if options.expert_prompts else ""),
        **({"router": _router_summary(options)} if options.custom_router() else {}),
        "dtype": str(plan.out_config.dtype).replace("torch.", ""),
        "layout": plan.layout,
    }
    card = render_model_card(
        base_model=plan.source.partition("@")[0] if is_hub_id(plan.source) else Path(plan.source).stem,
        license=source_license(plan.local),
        architecture=plan.adapter.display_name,
        output_class=plan.fmt.class_name,
        format_name=plan.fmt.name,
        reason=plan.reason,
        settings=settings,
        params=plan.params,
        not_exact=_not_exact(options),
    )
    card.save(folder / "README.md")


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


def _not_exact(options: ConvertOptions) -> str | None:
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


def _router_summary(options: ConvertOptions) -> str:
    """The router settings that differ from the defaults, for the model card."""
    return ", ".join(f"{key}={value}" for key, value in options.custom_router().items())
