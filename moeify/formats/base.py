"""The interface every output format implements: can it represent this MoE exactly, its config, its names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedConfig

from ..architectures import ArchitectureAdapter

# Neurons of the all-zero shared expert Qwen2-MoE gets when none is asked for (see `formats.base.MoETensorNames`):
# small, a multiple of every usual tensor-parallel size, and below any real expert size; counted as no shared expert.
NEUTRAL_SHARED_SIZE = 16


@dataclass(frozen=True)
class MoETensorNames:
    """Names of one MoE layer's tensors, relative to the decoder layer prefix (`model.layers.{i}.`).

    `per_expert` templates contain `{e}`; keys are roles: gate, up, down (+ `*_bias`). `fused` keys are
    gate_up, down (+ `*_bias`). `shared` keys are gate, up, down (+ `*_bias`), or gate_up and down for a shared
    MLP stored as one `[gate; up]` matrix. `saved_fused` names the fused tensors in the default layout of a class
    whose released checkpoints are fused under other names (GraniteMoe's `input_linear` / `output_linear`).
    A format without `shared_gate` adds its shared experts ungated.
    """

    router: str
    fused: dict[str, str]
    per_expert: dict[str, str] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    shared_gate: str | None = None
    per_expert_router: str | None = None
    saved_fused: dict[str, str] = field(default_factory=dict)
    # Qwen2-MoE always builds a shared expert in transformers, and vLLM refuses the zero-size tensors
    # `save_pretrained` writes for `shared_expert_intermediate_size=0`: with none asked for, such a format writes a
    # neutral shared expert of this many all-zero neurons behind a zero gate. Its output is exactly 0 and, with
    # every weight zero, so are its gradients: it stays neutral through training.
    neutral_shared_size: int = 0
    # The shared-expert gate must not be all zeros (llama.cpp computes sigmoid(y) as silu(y) / y, NaN at y = 0):
    # a gate that starts at zero is written as a tiny constant (`shared_gate_epsilon`), still sigmoid = 1/2.
    nonzero_shared_gate: bool = False
    # lora-experts: `fused` names the one shared FFN (`gate_up` `(2I, H)`, `down` `(H, I)`), these each expert's
    # LoRA delta in peft's `target_parameters` layout (`gate_up_A` `(E r, H)`, `gate_up_B` `(2I, E r)`, ...).
    expert_deltas: dict[str, str] = field(default_factory=dict)

    def router_name(self, layout: str) -> str:
        """The router's name in `layout` (Mixtral's per-expert files keep the legacy `block_sparse_moe`)."""
        return self.per_expert_router if layout == "per-expert" and self.per_expert_router else self.router


@dataclass(frozen=True)
class MoESpec:
    """The MoE being written, as formats need it."""

    num_experts: int
    top_k: int
    shared_experts: int
    moe_layers: list[int]
    num_layers: int
    intermediate_size: int
    mlp_bias: bool
    activation: str
    router: dict = field(default_factory=dict)  # the whole router section (`RouterConfig.to_dict()`)
    shared_intermediate_size: int = 0  # one shared expert's neurons (0: `intermediate_size`; the dense FFN's)
    expert_lora_rank: int = 0  # > 0: lora-experts (one shared FFN + a rank-r LoRA delta per expert)
    expert_lora_alpha: float | None = None
    # False: the top-k softmax weights are used as they are (Qwen1.5-MoE's `norm_topk_prob: false`); the router
    # starts near-uniform and the routed experts' outputs carry E / K, so the MoE is exact at step 0 in engines
    # that never renormalise (see `OutputFormat.unrenormalised_in`).
    renormalize: bool = True

    def __post_init__(self) -> None:
        if not self.shared_intermediate_size:
            object.__setattr__(self, "shared_intermediate_size", self.intermediate_size)

    @property
    def num_null_experts(self) -> int:
        return sum(self.router.get("null_experts", {}).values())

    @property
    def all_layers(self) -> bool:
        return len(self.moe_layers) == self.num_layers

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in set(self.moe_layers)]


@dataclass(frozen=True)
class RouterTensor:
    """A tensor the router section adds: its shape, and `zeros` (inactive until trained) or `random` (N(0, std),
    seeded like the router)."""

    shape: tuple[int, ...]
    init: str = "zeros"


class OutputFormat:
    """An output format: subclasses set `name`, `layouts` and implement the three methods."""

    name: str = ""
    class_name: str = ""  # the causal-LM class that loads the output
    # Why `--format auto` does not pick this format even where it is exact (e.g. serving engines compute it
    # wrongly); `--format native` still may.
    not_automatic: str | None = None
    layouts: tuple[str, ...] = ("fused",)
    # Engines that compute this class's top-k weights without renormalising whatever the config says: the
    # converter then writes the near-uniform form (`MoESpec.renormalize` False) where the router allows it.
    unrenormalised_in: str | None = None
    # Engines whose version of this class has an MoE block in every layer: an output with dense layers (a layer
    # subset) does not convert there, which the converter says.
    no_dense_layers_in: str | None = None

    def explain_unsupported(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> str | None:
        """`None` if this format represents the MoE exactly, else a one-line reason."""
        raise NotImplementedError

    def build_config(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> PreTrainedConfig:
        """The output model's configuration."""
        raise NotImplementedError

    def tensor_names(self, adapter: ArchitectureAdapter, spec: MoESpec) -> MoETensorNames:
        """Names of an MoE layer's tensors."""
        raise NotImplementedError

    def model_class(self, config: PreTrainedConfig) -> type:
        """The transformers class that loads the output (used to check names and shapes on the meta device)."""
        raise NotImplementedError

    def router_tensors(self, adapter: ArchitectureAdapter, spec: MoESpec, hidden: int) -> dict[str, RouterTensor]:
        """An MoE layer's tensors beyond router, experts and shared experts (name inside the layer -> how to make
        it): what the router section adds (MLP router, noise, gating residual, bias, constant experts)."""
        return {}

    def zero_tensors(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> dict[str, tuple[int, ...]]:
        """Tensors every decoder layer gets as zeros (name inside the layer -> shape), beyond the dense model's."""
        return {}


def dense_config_dict(dense_config: PreTrainedConfig) -> dict:
    """The dense config's fields, without the keys that identify its class."""
    values = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        values.pop(key, None)
    return values


def shared_gate_epsilon(dtype: torch.dtype) -> float:
    """The constant a "zero" shared-expert gate is written as: small enough that sigmoid(eps * sum(x)) rounds to
    1/2 in `dtype` for any hidden state, large enough not to underflow there (float16: its smallest subnormal)."""
    return 2.0**-24 if dtype == torch.float16 else 2.0**-64
