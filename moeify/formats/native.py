"""Stock transformers MoE classes (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoeShared), served by engines' own code.

vLLM 0.32 serves every one of them as transformers computes it except GraniteMoeShared with attention biases
(tests/serving), which is why `--format auto` does not pick that one.

Each target says which dense architectures and options it represents exactly (see the table in the design
notes), builds its config from the dense one, and names its tensors as stock `save_pretrained` does:
per-expert by default (what released checkpoints and serving engines read), fused 3-D with `--layout fused`.
"""

from __future__ import annotations

from transformers import GraniteMoeSharedConfig, MixtralConfig, PreTrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..architectures import ArchitectureAdapter
from .base import NEUTRAL_SHARED_SIZE, MoESpec, MoETensorNames, OutputFormat, dense_config_dict

_QWEN_EXPERT = {
    "gate": "mlp.experts.{e}.gate_proj.weight",
    "up": "mlp.experts.{e}.up_proj.weight",
    "down": "mlp.experts.{e}.down_proj.weight",
}
_FUSED = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj"}


def _qwen_moe_values(dense_config: PreTrainedConfig, spec: MoESpec, class_name: str) -> dict:
    """The dense config plus the MoE fields Qwen2-MoE and Qwen3-MoE share."""
    values = dense_config_dict(dense_config)
    values.update(
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.intermediate_size,
        norm_topk_prob=spec.renormalize,
        decoder_sparse_step=1,
        mlp_only_layers=spec.dense_layers,
        architectures=[class_name],
    )
    return values


class NativeFormat(OutputFormat):
    """Common checks of the stock classes; subclasses add their own."""

    layouts = ("per-expert", "fused")
    dense_types: tuple[str, ...] = ()
    config_class: type[PreTrainedConfig]
    names: MoETensorNames  # the same for every model of the class

    def tensor_names(self, adapter: ArchitectureAdapter, spec: MoESpec) -> MoETensorNames:
        return self.names

    def model_class(self, config: PreTrainedConfig) -> type:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def explain_unsupported(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> str | None:
        if adapter.model_type not in self.dense_types:
            return f"{self.name} cannot represent a {adapter.display_name} model exactly"
        if spec.expert_lora_rank:
            return f"{self.name} has no LoRA experts (--method lora-experts): its experts are full FFNs"
        if spec.mlp_bias:
            return f"{self.name} experts have no biases and this model's MLP has (mlp_bias=True)"
        if spec.activation != getattr(dense_config, "hidden_act", spec.activation):
            return f"{self.name} uses hidden_act for its experts"
        return self.explain_specific(adapter, dense_config, spec)

    def explain_specific(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> str | None:
        return None


class MixtralFormat(NativeFormat):
    name = "mixtral"
    class_name = "MixtralForCausalLM"
    dense_types = ("llama", "mistral")

    def explain_specific(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> str | None:
        if spec.shared_experts:
            return "Mixtral has no shared experts"
        if not spec.all_layers:
            return "Mixtral makes every layer an MoE layer (no dense-layer subset)"
        if getattr(dense_config, "attention_bias", False):
            return "Mixtral attention has no biases and this model's has (attention_bias=True)"
        return None

    def build_config(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> PreTrainedConfig:
        values = dense_config_dict(dense_config)
        values.update(
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            intermediate_size=spec.intermediate_size,  # one expert's (fine-grained experts are smaller)
            router_jitter_noise=0.0,
            architectures=["MixtralForCausalLM"],
        )
        return MixtralConfig(**values)

    names = MoETensorNames(
        router="mlp.gate.weight",
        fused=dict(_FUSED),
        per_expert={
            "gate": "block_sparse_moe.experts.{e}.w1.weight",
            "up": "block_sparse_moe.experts.{e}.w3.weight",
            "down": "block_sparse_moe.experts.{e}.w2.weight",
        },
        per_expert_router="block_sparse_moe.gate.weight",
    )


class Qwen2MoeFormat(NativeFormat):
    """Qwen2-MoE, written so that transformers, vLLM and llama.cpp compute the same model.

    llama.cpp's qwen2moe graph ignores `norm_topk_prob` (it never renormalises, as Qwen1.5-MoE and Qwen2-57B-A14B
    are trained) and computes the shared-expert gate's sigmoid as silu(y) / y. So outputs are written with
    `norm_topk_prob: false`, a near-uniform router and the routed experts scaled by E / K (`MoESpec.renormalize`),
    and the shared-expert gate as a tiny constant instead of zeros.
    """

    name = "qwen2_moe"
    class_name = "Qwen2MoeForCausalLM"
    dense_types = ("llama", "mistral", "qwen2")
    unrenormalised_in = "llama.cpp"
    no_dense_layers_in = "llama.cpp"

    def explain_specific(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> str | None:
        if getattr(dense_config, "attention_bias", False):
            return "Qwen2-MoE has biases on q/k/v only and this model's o_proj has one too (attention_bias=True)"
        return None

    def build_config(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> PreTrainedConfig:
        values = _qwen_moe_values(dense_config, spec, self.class_name)
        values.update(
            shared_expert_intermediate_size=spec.shared_experts * spec.shared_intermediate_size or NEUTRAL_SHARED_SIZE,
            qkv_bias=True,  # see `zero_tensors`
        )
        if adapter.model_type == "mistral":
            sliding = dense_config.sliding_window is not None
            values.update(
                use_sliding_window=sliding,
                max_window_layers=spec.num_layers,
                layer_types=[("sliding_attention" if sliding else "full_attention")] * spec.num_layers,
            )
        elif adapter.model_type == "llama":
            values.update(use_sliding_window=False, layer_types=["full_attention"] * spec.num_layers)
        return Qwen2MoeConfig(**values)

    def zero_tensors(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> dict[str, tuple[int, ...]]:
        """Zero q/k/v biases for a Llama / Mistral: vLLM's Qwen2-MoE always has them (transformers' only with
        `qkv_bias=True`) and computes garbage from the unset ones."""
        if adapter.model_type == "qwen2":
            return {}
        head_dim = (
            getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
        )
        q, kv = dense_config.num_attention_heads * head_dim, dense_config.num_key_value_heads * head_dim
        return {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}

    names = MoETensorNames(
        router="mlp.gate.weight",
        fused=dict(_FUSED),
        per_expert=dict(_QWEN_EXPERT),
        shared={
            "gate": "mlp.shared_expert.gate_proj.weight",
            "up": "mlp.shared_expert.up_proj.weight",
            "down": "mlp.shared_expert.down_proj.weight",
        },
        shared_gate="mlp.shared_expert_gate.weight",
        neutral_shared_size=NEUTRAL_SHARED_SIZE,
        nonzero_shared_gate=True,
    )


class Qwen3MoeFormat(NativeFormat):
    name = "qwen3_moe"
    class_name = "Qwen3MoeForCausalLM"
    dense_types = ("qwen3",)
    no_dense_layers_in = "llama.cpp"

    def explain_specific(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> str | None:
        if spec.shared_experts:
            return "Qwen3-MoE has no shared experts"
        layer_types = set(getattr(dense_config, "layer_types", None) or ["full_attention"])
        if getattr(dense_config, "use_sliding_window", False) and layer_types != {"sliding_attention"}:
            return "Qwen3-MoE slides the window on every layer and this model slides only some"
        return None

    def build_config(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> PreTrainedConfig:
        values = _qwen_moe_values(dense_config, spec, self.class_name)
        values.pop("layer_types", None)
        return Qwen3MoeConfig(**values)

    names = MoETensorNames(router="mlp.gate.weight", fused=dict(_FUSED), per_expert=dict(_QWEN_EXPERT))


class GraniteMoeSharedFormat(NativeFormat):
    """Llama with attention biases: Granite's multipliers set to 1 and attention scaled by head_dim**-0.5."""

    name = "granitemoeshared"
    class_name = "GraniteMoeSharedForCausalLM"
    dense_types = ("llama",)
    not_automatic = (
        "vLLM 0.32 builds GraniteMoe attention without biases and would serve it wrongly (--format native writes it)"
    )

    def explain_specific(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> str | None:
        if not spec.all_layers:
            return "GraniteMoeShared makes every layer an MoE layer (no dense-layer subset)"
        return None

    def build_config(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> PreTrainedConfig:
        values = dense_config_dict(dense_config)
        head_dim = (
            getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
        )
        values.update(
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            shared_intermediate_size=spec.shared_experts * spec.shared_intermediate_size,
            intermediate_size=spec.intermediate_size,  # one expert's
            attention_multiplier=head_dim**-0.5,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            logits_scaling=1.0,
            architectures=[self.class_name],
        )
        return GraniteMoeSharedConfig(**values)

    names = MoETensorNames(
        router="block_sparse_moe.router.weight",
        per_expert_router="block_sparse_moe.router.layer.weight",
        fused={"gate_up": "block_sparse_moe.experts.gate_up_proj", "down": "block_sparse_moe.experts.down_proj"},
        saved_fused={
            "gate_up": "block_sparse_moe.input_linear.weight",
            "down": "block_sparse_moe.output_linear.weight",
        },
        shared={"gate_up": "shared_mlp.input_linear.weight", "down": "shared_mlp.output_linear.weight"},
    )


NATIVE_FORMATS: dict[str, NativeFormat] = {
    f.name: f for f in (MixtralFormat(), Qwen2MoeFormat(), Qwen3MoeFormat(), GraniteMoeSharedFormat())
}
