"""Configuration of moeify's own Mixture-of-Experts causal LM.

A :class:`MoeifyConfig` wraps the configuration of the dense model it was upcycled from (``text_config``:
a Llama, Gemma 3, Phi-3, ... config) and adds the MoE settings. The modeling code builds the dense
architecture from ``text_config`` and swaps the MLPs of ``moe_layers`` for MoE blocks, so every dense
architecture transformers knows can be upcycled without copying its attention or norm code.

This file is copied next to the weights on ``save_pretrained`` so that ``trust_remote_code=True`` works
without moeify installed: it may only import torch and transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.23: composite configs list `sub_configs` and build them in `__post_init__`
    SubConfigSpec = None


class MoeifyConfig(PreTrainedConfig):
    r"""
    Args:
        text_config (`PreTrainedConfig` or `dict`):
            Configuration of the dense decoder the MoE was built from (its `model_type` selects the architecture).
        num_experts (`int`, defaults to 8):
            Number of routed experts in each MoE layer.
        num_experts_per_tok (`int`, defaults to 2):
            How many routed experts each token uses (top-k).
        num_shared_experts (`int`, defaults to 0):
            Number of shared experts every token uses, stored as one MLP of
            `num_shared_experts * shared_expert_intermediate_size` neurons (as Qwen-MoE and DeepSeek-MoE do).
        moe_layers (`list[int]`, *optional*):
            Decoder layers whose MLP is an MoE block; `None` means every layer.
        moe_intermediate_size (`int`, *optional*):
            Intermediate size of one routed expert; defaults to the dense MLP's.
        shared_expert_intermediate_size (`int`, *optional*):
            Intermediate size of one shared expert; defaults to `moe_intermediate_size`.
        shared_expert_gate (`bool`, defaults to `True`):
            Scale the shared experts' output by `sigmoid(w . x)` (Qwen2-MoE); a zero `w` gives 1/2.
        norm_topk_prob (`bool`, defaults to `True`):
            Renormalise the top-k router probabilities so they sum to 1 (what makes copied experts exact).
        router_aux_loss_coef (`float`, defaults to 0.001):
            Weight of the load-balancing loss added to the LM loss when labels are given.
        mlp_activation (`str`, defaults to `"silu"`):
            Activation of the gated MLP (the dense model's `hidden_act` / `hidden_activation`).
        mlp_bias (`bool`, defaults to `False`):
            Whether the expert projections carry biases (dense `mlp_bias=True`).
        mlp_module_name (`str`, defaults to `"mlp"`):
            Attribute of a dense decoder layer that holds its MLP.
    """

    model_type = "moeify"
    if SubConfigSpec is not None:
        sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    else:
        sub_configs = {"text_config": AutoConfig}

    text_config: PreTrainedConfig | dict[str, Any] | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    moe_layers: list[int] | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = True
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    mlp_activation: str = "silu"
    mlp_bias: bool = False
    mlp_module_name: str = "mlp"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if SubConfigSpec is None and not isinstance(self.text_config, PreTrainedConfig):
            text_config = dict(self.text_config or {})  # transformers < 5.23 leaves the dict (or None) as is
            self.text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
        super().__post_init__(**kwargs)  # turns a `text_config` dict into its config class by `model_type`
        num_layers = self.text_config.num_hidden_layers
        if self.moe_layers is None:
            self.moe_layers = list(range(num_layers))
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.text_config.intermediate_size
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.moe_intermediate_size
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.validate_moe()

    def get_text_config(self, *args: Any, **kwargs: Any) -> MoeifyConfig:
        """This config itself: it answers the dense decoder's fields (`hidden_size`, `layer_types`, ...: see
        `__getattr__`) besides the MoE's, so code that reads "the text config" of a model (generation caches, vLLM's
        Transformers backend) sees one decoder with experts, not the dense sub-config, which has no expert fields."""
        return self

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: the dense decoder's field of that name.
        text_config = self.__dict__.get("text_config")
        if name.startswith("__") or not isinstance(text_config, PreTrainedConfig):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(text_config, name)

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:  # `resize_token_embeddings` sets it on the text config
        self.text_config.vocab_size = value

    def validate_moe(self) -> None:
        """Raise `ValueError` when the MoE settings cannot describe a model."""
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be at least 2, got {self.num_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be between 1 and num_experts={self.num_experts}, "
                f"got {self.num_experts_per_tok}."
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}.")
        num_layers = self.text_config.num_hidden_layers
        bad = [i for i in self.moe_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside the model's {num_layers} layers.")


__all__ = ["MoeifyConfig"]
