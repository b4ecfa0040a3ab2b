"""moeify's own format: the dense architecture with MoE blocks (`MoeifyForCausalLM`), for any adapter.

Written fused (transformers' conversion mappings do not apply to custom code), with `auto_map` and the
modeling files beside the weights so `trust_remote_code=True` loads it without moeify installed.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..architectures import ArchitectureAdapter
from ..modeling import MoeifyConfig, MoeifyForCausalLM
from .base import MoESpec, MoETensorNames, OutputFormat, RouterTensor


class MoeifyFormat(OutputFormat):
    name = "moeify"
    class_name = "MoeifyForCausalLM"
    layouts = ("fused",)

    def explain_unsupported(
        self, adapter: ArchitectureAdapter, dense_config: PreTrainedConfig, spec: MoESpec
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
            shared_expert_intermediate_size=spec.shared_intermediate_size,
            shared_expert_gate=True,
            router=dict(spec.router),
            mlp_activation=spec.activation,
            mlp_bias=spec.mlp_bias,
            mlp_module_name=adapter.mlp_module,
            expert_lora_rank=spec.expert_lora_rank,
            expert_lora_alpha=spec.expert_lora_alpha,
            architectures=["MoeifyForCausalLM"],
        )

    def tensor_names(self, adapter: ArchitectureAdapter, spec: MoESpec) -> MoETensorNames:
        mlp = adapter.mlp_module
        fused = {"gate_up": f"{mlp}.experts.gate_up_proj", "down": f"{mlp}.experts.down_proj"}
        shared = {role: f"{mlp}.shared_experts.{role}_proj.weight" for role in ("gate", "up", "down")}
        if spec.mlp_bias:
            fused.update(gate_up_bias=f"{mlp}.experts.gate_up_proj_bias", down_bias=f"{mlp}.experts.down_proj_bias")
            shared.update({f"{role}_bias": f"{mlp}.shared_experts.{role}_proj.bias" for role in ("gate", "up", "down")})
        deltas = {}
        if spec.expert_lora_rank:  # MoeifyExpertDeltas
            deltas = {f"{p}_{f}": f"{mlp}.experts.deltas.{p}_lora_{f}" for p in ("gate_up", "down") for f in "AB"}
        return MoETensorNames(
            router=f"{mlp}.router.weight",
            fused=fused,
            shared=shared,
            shared_gate=f"{mlp}.shared_expert_gate.weight",
            expert_deltas=deltas,
        )

    def router_tensors(self, adapter: ArchitectureAdapter, spec: MoESpec, hidden: int) -> dict[str, RouterTensor]:
        router, mlp = spec.router, adapter.mlp_module
        n = spec.num_experts + spec.num_null_experts
        extra = {}
        if router["network"] == "mlp":
            extra[f"{mlp}.router.input_proj.weight"] = RouterTensor((router["mlp_hidden_size"], hidden), "random")
        if router["noisy_top_k"]:
            extra[f"{mlp}.router.noise.weight"] = RouterTensor((n, hidden))
        if router["gating_residual"]:
            extra[f"{mlp}.router.residual.weight"] = RouterTensor((n, n))
        if router["bias_update_rate"] > 0:
            extra[f"{mlp}.router.e_score_correction_bias"] = RouterTensor((n,))
        constant = router["null_experts"]["constant"]
        if constant:
            extra[f"{mlp}.constant_experts.vectors"] = RouterTensor((constant, hidden), "random")
            extra[f"{mlp}.constant_experts.mix.weight"] = RouterTensor((2 * constant, hidden), "random")
        return extra

    def model_class(self, config: PreTrainedConfig) -> type:
        return MoeifyForCausalLM
