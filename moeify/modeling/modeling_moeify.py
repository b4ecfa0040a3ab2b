"""moeify's Mixture-of-Experts causal LM: a dense transformers decoder whose MLPs became MoE blocks.

Data flow: the dense architecture named by `config.text_config` (embeddings, attention, norms, rotary,
masks, KV cache: transformers' own code for Llama, Gemma 3, Phi-3, ...) runs unchanged, except that the MLP
of each layer in `config.moe_layers` is a `MoeifySparseMoeBlock`: router -> routed experts (+ shared
experts) -> weighted sum.

Copied next to the weights for `trust_remote_code=True`: imports torch, transformers and its siblings only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from .configuration_moeify import MoeifyConfig
from .experts import MoeifyExpertDeltas, MoeifyExpertsBase, MoeifyMixLoraExperts, build_experts, routed_only
from .router import MoeifyTopKRouter, RoutingState, load_balancing_loss, router_z_loss

# transformers 5.25 renamed the key-value cache argument and output field `past_key_values` to `cache` (the old
# name warns, and goes in 5.40); moeify's model passes and returns it under the name of the installed version.
CACHE = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# The experts implementation `import moeify` registers (faster on the CPU); without moeify, transformers' default.
MOEIFY_EXPERTS = "moeify"


class MoeifySharedExperts(nn.Module):
    """The shared experts: one gated MLP of `num_shared_experts * shared_expert_intermediate_size` neurons."""

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        inner = config.num_shared_experts * config.shared_expert_intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.mlp_activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MoeifyConstantExperts(nn.Module):
    """MoE++ constant experts: expert c outputs `a1 x + a2 v_c` with `[a1, a2] = softmax(W_c x)` (`W_c`: rows of
    `mix`); no FFN."""

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        self.num_experts = config.router["null_experts"]["constant"]
        self.vectors = nn.Parameter(torch.empty(self.num_experts, hidden))
        self.mix = nn.Linear(hidden, 2 * self.num_experts, bias=False)  # not `gate`: a router module name

    def forward(self, hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`hidden_states` `(T, H)`, `weights` `(T, C)` (each constant expert's routing weight per token)."""
        mix = F.softmax(self.mix(hidden_states).reshape(-1, self.num_experts, 2).float(), dim=-1)
        weighted = weights.float().unsqueeze(-1) * mix  # (T, C, 2)
        keep = weighted[..., 0].sum(dim=-1, keepdim=True).to(hidden_states.dtype) * hidden_states
        return keep + weighted[..., 1].to(hidden_states.dtype) @ self.vectors


class MoeifySparseMoeBlock(nn.Module):
    """Router, routed experts and optional shared experts; a drop-in for a dense decoder layer's MLP.

    `y = sum_{i in topk} w_i expert_i(x) [+ sigmoid(g . x) * shared(x)]`, where an expert may also be one of MoE++'s
    zero-computation experts (zero: 0, copy: x, constant: `a1 x + a2 v`). Assignments to those, and assignments
    dropped for capacity, never enter the experts' grouped dispatch.
    """

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__()
        _refuse_engines_that_assume_silu(config)
        _refuse_engines_without_null_experts(config)
        self.router = MoeifyTopKRouter(config)
        self.experts = build_experts(config)
        self.constant_experts = MoeifyConstantExperts(config) if config.router["null_experts"]["constant"] > 0 else None
        self.shared_experts = MoeifySharedExperts(config) if config.num_shared_experts > 0 else None
        self.shared_expert_gate = (
            nn.Linear(config.text_config.hidden_size, 1, bias=False)
            if config.num_shared_experts > 0 and config.shared_expert_gate
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_shape = hidden_states.shape
        flat = hidden_states.reshape(-1, input_shape[-1])
        _, top_k_weights, top_k_index = self.router(flat)
        if self.router.num_null_experts or (self.training and self.router.capacity_factor is not None):
            output = self._mixed_experts(flat, top_k_index, top_k_weights)
        else:
            output = self.experts(flat, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(flat)) * shared
            output = output + shared
        return output.reshape(input_shape)

    def _mixed_experts(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """FFN experts for the assignments that go to one, zero-computation experts for the rest; the others cost
        no expert GEMM. Experts that skip an index >= E themselves get the whole routing; the rest get the FFN
        assignments only, compacted to one slot each (a gather before, a scatter after)."""
        num_experts = self.router.num_experts
        if _skips_unrouted(self.experts, hidden_states):
            output = self.experts(hidden_states, top_k_index, top_k_weights)
        else:
            output = routed_only(
                self.experts, hidden_states, top_k_index, top_k_weights, num_experts, self.experts.parameters()
            )
        null = self.router.null_experts
        first_copy = num_experts + null["zero"]
        if null["copy"]:
            picked = (top_k_index >= first_copy) & (top_k_index < first_copy + null["copy"])
            output = output + (top_k_weights * picked).sum(dim=-1, keepdim=True) * hidden_states
        if self.constant_experts is not None:
            first = first_copy + null["copy"]
            choices = torch.arange(first, first + null["constant"], device=top_k_index.device)
            picked = top_k_index.unsqueeze(-1) == choices  # (T, k, C)
            weights = (top_k_weights.unsqueeze(-1) * picked).sum(dim=1)  # (T, C)
            output = output + self.constant_experts(hidden_states, weights)
        return output


def _skips_unrouted(experts: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether `experts` leaves out the assignments to an index >= E (null experts, dropped for capacity) itself.

    An experts module, or the experts implementation it runs, says so with `accepts_unrouted(hidden_states)` (moeify's
    kernels and training experts do, on the CPU). Handing them the whole routing saves the compaction's gather and
    scatter; every other implementation gets the routed assignments only."""
    accepts = getattr(experts, "accepts_unrouted", None)
    if accepts is None:
        implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        accepts = getattr(ALL_EXPERTS_FUNCTIONS.get(implementation), "accepts_unrouted", None)
    return accepts is not None and accepts(hidden_states)


SILU_ACTIVATIONS = ("silu", "swish")


def _refuse_engines_that_assume_silu(config: MoeifyConfig) -> None:
    """vLLM's Transformers backend (attention implementation "vllm") swaps 3-D `experts` modules for its fused MoE
    kernel with the activation hard-coded to SiLU (vLLM 0.32, `model_executor/models/transformers/moe.py`): GELU
    experts (Gemma 3) would be served wrongly, silently. Biased experts are not swapped (their biases are 2-D), nor
    are any under moeify's vLLM plugin where the kernel would differ (it sets `vllm_experts_kept`)."""
    kept = getattr(config, "vllm_experts_kept", False) or config.mlp_bias
    if config._attn_implementation == "vllm" and config.mlp_activation not in SILU_ACTIVATIONS and not kept:
        raise ValueError(
            f"vLLM's Transformers backend computes fused MoE experts with SiLU only, and this model's experts use "
            f"{config.mlp_activation}: it would serve wrong tokens, so moeify refuses. Install moeify in vLLM's "
            "environment (its vLLM plugin serves this model), or run it with transformers (`generate`)."
        )


def _refuse_engines_without_null_experts(config: MoeifyConfig) -> None:
    """vLLM's Transformers backend computes the `experts` module with its own fused kernel for `num_experts_per_tok`
    slots per token; with MoE++ null experts a token sends a varying number of slots to the FFN experts, which that
    kernel was not checked with here, so moeify refuses rather than risk wrong tokens (moeify's vLLM plugin keeps
    such experts out of that kernel and sets `vllm_experts_kept`)."""
    kept = getattr(config, "vllm_experts_kept", False)
    if config._attn_implementation == "vllm" and config.num_null_experts and not kept:
        raise ValueError(
            "this model has MoE++ null experts, which vLLM's fused MoE kernel does not compute; install moeify in "
            "vLLM's environment (its vLLM plugin serves this model), or run it with transformers (`generate`)."
        )


@torch.no_grad()
def init_moe_weights(module: nn.Module, std: float) -> None:
    """Random initialisation of the MoE modules (conversion overwrites it with the upcycled weights)."""
    if isinstance(module, MoeifyExpertsBase | MoeifyMixLoraExperts):
        nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(module.down_proj, mean=0.0, std=std)
        if hasattr(module, "gate_up_proj_bias"):
            nn.init.zeros_(module.gate_up_proj_bias)
            nn.init.zeros_(module.down_proj_bias)
    elif isinstance(module, MoeifyExpertDeltas):  # peft's LoRA init: A ~ U(+-1/sqrt(in)), B = 0
        for projection in ("gate_up", "down"):
            lora_a = getattr(module, f"{projection}_lora_A")
            bound = lora_a.shape[1] ** -0.5
            nn.init.uniform_(lora_a, -bound, bound)
            nn.init.zeros_(getattr(module, f"{projection}_lora_B"))
    elif isinstance(module, MoeifyTopKRouter):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.input_proj is not None:
            nn.init.normal_(module.input_proj.weight, mean=0.0, std=std)
        for start_at_zero in (module.noise, module.residual):  # no noise and no residual until trained
            if start_at_zero is not None:
                nn.init.zeros_(start_at_zero.weight)
        if module.e_score_correction_bias is not None:
            nn.init.zeros_(module.e_score_correction_bias)
    elif isinstance(module, MoeifyConstantExperts):
        nn.init.normal_(module.vectors, mean=0.0, std=std)
        nn.init.normal_(module.mix.weight, mean=0.0, std=std)


def _dense_init_then_moe(dense_init: Any, std: float, module: nn.Module) -> None:
    dense_init(module)
    init_moe_weights(module, std)


def build_dense(dense_class: type[PreTrainedModel], config: MoeifyConfig) -> PreTrainedModel:
    """`dense_class` (the dense architecture's causal LM or base model) built from `config.text_config`."""
    # `from_pretrained(experts_implementation=...)` is copied onto `text_config` too, and the dense class (no
    # experts) refuses an explicit "grouped_mm": build it without the request, which applies to our experts.
    requested_experts = getattr(config.text_config, "_experts_implementation_internal", None)
    config.text_config._experts_implementation_internal = None
    try:
        return dense_class(config.text_config)
    finally:
        config.text_config._experts_implementation_internal = requested_experts


def upcycle_decoder(decoder: PreTrainedModel, config: MoeifyConfig) -> PreTrainedModel:
    """Make the MLP of each layer in `config.moe_layers` of a dense base model a `MoeifySparseMoeBlock`, in place."""
    # The gating residual's previous logits, from one MoE layer to the next (kept only when a router reads them).
    state = RoutingState() if config.router["gating_residual"] else None
    previous = None
    for layer_idx in config.moe_layers:
        block = MoeifySparseMoeBlock(config)
        block.router.layer_index, block.router.previous_layer, block.router.state = layer_idx, previous, state
        setattr(decoder.layers[layer_idx], config.mlp_module_name, block)
        previous = layer_idx
    return decoder


class MoeifyPreTrainedModel(PreTrainedModel):
    config: MoeifyConfig
    config_class = MoeifyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for `@use_experts_implementation` in this file's text; our experts live in experts.py.
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        if requested_experts is None and MOEIFY_EXPERTS in ALL_EXPERTS_FUNCTIONS:
            requested_experts = MOEIFY_EXPERTS
        return super().get_correct_experts_implementation(requested_experts)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        text_config = getattr(self.config, "text_config", self.config)  # the dense config while `MoeifyModel` builds
        init_moe_weights(module, getattr(text_config, "initializer_range", 0.02))


class MoeifyModel(MoeifyPreTrainedModel):
    """The decoder of `MoeifyForCausalLM` without its head: what `AutoModel` builds (vLLM's Transformers backend
    adds its own head to it).

    An instance is also the dense architecture's own base model (e.g. `Gemma3TextModel`, built from
    `config.text_config`; see `__new__`) with MoE blocks: its parameter names, forward, attention and cache code are
    the dense model's, exactly `MoeifyForCausalLM(config).model`. Its config is the `MoeifyConfig`, which answers the
    dense fields too, so it saves and reloads as this MoE.
    """

    def __new__(cls, config: MoeifyConfig | None = None, *args: Any, **kwargs: Any) -> MoeifyModel:
        if cls is MoeifyModel and config is not None:  # copies (`copy.deepcopy`) come with their class already
            cls = _with_dense_base(cls, MODEL_MAPPING[type(config.text_config)])
        return super().__new__(cls)

    def __init__(self, config: MoeifyConfig) -> None:
        dense_class = type(self).__bases__[1]  # see `_with_dense_base`
        requested_experts = getattr(config, "_experts_implementation_internal", None)
        build_dense(partial(dense_class.__init__, self), config)
        self.config = config
        config._experts_implementation_internal = self.get_correct_experts_implementation(requested_experts)
        upcycle_decoder(self, config)  # its MoE modules are initialised by `MoeifyPreTrainedModel._init_weights`
        self.post_init()


@functools.cache
def _with_dense_base(moe_class: type, dense_class: type) -> type:
    """`moe_class` over the dense base model class: `MoeifyModel`'s methods first, then the dense model's."""
    return type(moe_class.__name__, (moe_class, dense_class), {"__module__": moe_class.__module__})


class MoeifyForCausalLM(MoeifyPreTrainedModel, GenerationMixin):
    """A causal LM whose `config.moe_layers` MLPs are `MoeifySparseMoeBlock`s.

    `self.model` is the dense architecture's own base model (e.g. `Gemma3TextModel`), so parameter names are
    the dense model's (`model.layers.3.self_attn.q_proj.weight`) except inside the MoE blocks
    (`model.layers.3.mlp.router.weight`, `model.layers.3.mlp.experts.gate_up_proj`, ...).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoeifyConfig) -> None:
        super().__init__(config)
        dense = build_dense(MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)], config)
        self._no_split_modules = list(getattr(dense, "_no_split_modules", None) or [])
        self.model = upcycle_decoder(dense.model, config)
        # transformers initialises a nested PreTrainedModel's subtree with that model's own `_init_weights`,
        # which does not know the MoE modules: extend it for this instance.
        std = getattr(config.text_config, "initializer_range", 0.02)
        self.model._init_weights = partial(_dense_init_then_moe, self.model._init_weights, std)
        self.lm_head = dense.lm_head
        self.vocab_size = config.text_config.vocab_size
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MoeifyCausalLMOutputWithPast:
        cache = kwargs.pop("cache", None)  # transformers >= 5.25 passes `cache`, older ones `past_key_values`
        cache = past_key_values if past_key_values is not None else cache
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        settings = self.config.router
        weighted = bool(settings["aux_loss_coef"] or settings["z_loss_coef"])
        router_losses = output_router_logits or (weighted and (labels is not None or self.training))
        routing: list[tuple[MoeifyTopKRouter, torch.Tensor, torch.Tensor]] = []
        hooks = []
        if router_losses:
            # The dense decoder layers do not return router outputs, so collect them at the routers.
            for module in self.modules():
                if isinstance(module, MoeifyTopKRouter):
                    hooks.append(module.register_forward_hook(lambda m, _i, out: routing.append((m, out[0], out[2]))))
        try:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{CACHE: cache},
                **kwargs,
            )
        finally:
            for hook in hooks:
                hook.remove()

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = z_loss = None
        if routing:
            # Means over MoE layers of each layer's loss (padding excluded: `attention_mask` matches the tokens).
            aux_loss = torch.stack(
                [
                    load_balancing_loss(logits_, index, router.num_choices, router.scoring, attention_mask)
                    for router, logits_, index in routing
                ]
            ).mean()
            z_loss = torch.stack([router_z_loss(logits_, attention_mask) for _, logits_, _ in routing]).mean()
            if loss is not None:
                loss = loss + settings["aux_loss_coef"] * aux_loss.to(loss.device)
                loss = loss + settings["z_loss_coef"] * z_loss.to(loss.device)

        return MoeifyCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(logits_ for _, logits_, _ in routing) if output_router_logits else None,
            **{CACHE: getattr(outputs, CACHE)},
        )


@dataclass
class MoeifyCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus `z_loss`, the router z-loss (mean over MoE layers), reported beside
    `aux_loss` (the load-balancing loss); both are already weighted into `loss` when labels are given."""

    z_loss: torch.FloatTensor | None = None


__all__ = ["MoeifyForCausalLM", "MoeifyModel", "MoeifyPreTrainedModel", "MoeifySparseMoeBlock"]
