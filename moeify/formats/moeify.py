"""moeify's own format: the dense architecture with MoE blocks (`MoeifyForCausalLM`), for any adapter.

Written fused (transformers' conversion mappings do not apply to custom code), with `auto_map` and the
modeling files beside the weights so `trust_remote_code=True` loads it without moeify installed.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..adapters import ArchitectureAdapter
from ..modeling import MoeifyConfig, MoeifyForCausalLM
from ..plan import ConvertOptions
from .base import MoESpec, MoETensorNames, OutputFormat


class MoeifyFormat(OutputFormat):
    name = "moeify"
    class_name = "MoeifyForCausalLM"
    layouts = ("fused",)

    def explain_unsupported(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec, options: ConvertOptions
    ) -> str | None:
        return None

    def build_config(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
    ) -> PreTrainedConfig:
        return MoeifyConfig(
            text_config=dense_config,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            num_shared_experts=spec.shared_experts,
            moe_layers=spec.moe_layers,
            moe_intermediate_size=spec.intermediate_size,
            shared_expert_intermediate_size=spec.intermediate_size,
            shared_expert_gate=True,
            norm_topk_prob=True,
            mlp_activation=spec.activation,
            mlp_bias=spec.mlp_bias,
            mlp_module_name=adapter.mlp_module,
            architectures=["MoeifyForCausalLM"],
        )

    def tensor_names(self, adapter: ArchitectureAdapter, spec: MoESpec) -> MoETensorNames:
        mlp = adapter.mlp_module
        fused = {"gate_up": f"{mlp}.experts.gate_up_proj", "down": f"{mlp}.experts.down_proj"}
        shared = {role: f"{mlp}.shared_experts.{role}_proj.weight" for role in ("gate", "up", "down")}
        if spec.mlp_bias:
            fused.update(gate_up_bias=f"{mlp}.experts.gate_up_proj_bias", down_bias=f"{mlp}.experts.down_proj_bias")
            shared.update({f"{role}_bias": f"{mlp}.shared_experts.{role}_proj.bias" for role in ("gate", "up", "down")})
        return MoETensorNames(
            router=f"{mlp}.router.weight", fused=fused, shared=shared, shared_gate=f"{mlp}.shared_expert_gate.weight"
        )

    def model_class(self, config: PreTrainedConfig) -> type:
        return MoeifyForCausalLM
