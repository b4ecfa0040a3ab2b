"""One MoE layer's tensors as the output format names them, produced lazily for the streaming writer: routed
experts (per expert or fused), shared experts and their gate, routers, and the lora-experts deltas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedConfig

from ..architectures import ArchitectureAdapter
from ..errors import MoeifyError
from ..formats import MoESpec, MoETensorNames
from ..formats.base import RouterTensor, shared_gate_epsilon
from ..io.checkpoint import Checkpoint
from ..io.writer import TensorSpec
from .methods import apply_transforms, get_method
from .methods.base import ExpertFFN, LayerContext, LazyExperts, MoELayerWeights, layer_seed
from .methods.lora_seeds import LoraExpertSeeds
from .options import ConvertOptions

# Router init of the near-uniform form (`MoESpec.renormalize` False), per 1/sqrt(hidden): logits of about 1e-6
# break every token's top-k tie, while the top-k weights stay K / E to about 1e-6.
NEAR_UNIFORM_STD = 2.0**-20


class LayerBuilder:
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


def moe_layer_specs(
    layer: int,
    prefix: str,
    names: MoETensorNames,
    layout: str,
    spec: MoESpec,
    hidden: int,
    dtype: torch.dtype,
    builder: LayerBuilder | None,
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
