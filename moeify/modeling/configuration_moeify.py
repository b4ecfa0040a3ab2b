"""Configuration of moeify's own Mixture-of-Experts causal LM.

A :class:`MoeifyConfig` wraps the configuration of the dense model it was upcycled from (``text_config``:
a Llama, Gemma 3, Phi-3, ... config) and adds the MoE settings. The modeling code builds the dense
architecture from ``text_config`` and swaps the MLPs of ``moe_layers`` for MoE blocks, so every dense
architecture transformers knows can be upcycled without copying its attention or norm code.

This file is copied next to the weights on ``save_pretrained`` so that ``trust_remote_code=True`` works
without moeify installed: it may only import torch and transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.23: composite configs list `sub_configs` and build them in `__post_init__`
    SubConfigSpec = None


# The layout of this config and of the weights it describes; a newer moeify that changes either raises it. Configs
# without the key (moeify 0.1) are version 1.
FORMAT_VERSION = 1
SCORINGS = ("softmax", "sigmoid")
NETWORKS = ("linear", "mlp")
NULL_EXPERT_KINDS = ("zero", "copy", "constant")
# Flat `MoeifyConfig` arguments (moeify 0.1 configs, the stock MoE classes' names) -> keys of the router section.
_FLAT_ROUTER_KEYS = {"norm_topk_prob": "normalize", "router_aux_loss_coef": "aux_loss_coef"}


@dataclass
class RouterConfig:
    """The router of every MoE layer; stored in `config.json` as the `router` section of a `MoeifyConfig`.

    Top-k itself is `MoeifyConfig.num_experts_per_tok`, the name transformers' MoE configs and serving engines read.
    Settings marked *inference-neutral* leave an upcycled model exactly equal to its dense source at step 0.
    """

    scoring: str = "softmax"
    """`softmax` (Mixtral) or `sigmoid` (DeepSeek-V3: `s = sigmoid(z)`, weights from `s`); always in float32."""
    normalize: bool = True
    """Renormalise the k selected weights to sum to 1 (what makes copied experts exact)."""
    scaling_factor: float = 1.0
    """Multiply the weights of the routed experts (DeepSeek-V3's `routed_scaling_factor`); 1 keeps identity."""
    network: str = "linear"
    """`linear` (`z = W x`) or `mlp` (`z = W2 tanh(W1 x)`, LLaMA-MoE's and MoE++'s router)."""
    mlp_hidden_size: int = 256
    """Width of the `mlp` router's hidden layer."""
    noisy_top_k: bool = False
    """Training only: add `N(0, 1) * softplus(W_noise x)` to the logits (Shazeer et al. 2017); `W_noise` starts at 0."""
    jitter: float = 0.0
    """Training only: multiply the router's input by `U(1 - jitter, 1 + jitter)` (Switch Transformer); 0 = off."""
    capacity_factor: float | None = None
    """Training only: each expert takes at most `ceil(capacity_factor * k * tokens / E)` of a batch's assignments,
    in token order; the rest are dropped (those slots add nothing). `None`: dropless."""
    aux_loss_coef: float = 0.001
    """Weight of the Switch load-balancing loss added to the loss when labels are given (k when uniform)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss `mean(logsumexp(z)^2)` (ST-MoE) added to the loss when labels are given."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias, used for selection only, moved by
    `u * sign(mean_load - load)` after each optimizer step (`moeify.BiasBalancingCallback`); 0 = no bias."""
    null_experts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NULL_EXPERT_KINDS, 0))
    """MoE++ zero-computation experts a token may pick: `zero` (outputs 0), `copy` (outputs x), `constant`
    (`a1 x + a2 v`, `[a1, a2] = softmax(W_c x)`, v trained). They cost no expert GEMM."""
    gating_residual: bool = False
    """MoE++: a layer's logits add `W_map z_prev` of the previous MoE layer's logits (`W_map` starts at 0)."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RouterConfig:
        """Build from a `config.json` section; unknown keys and bad values raise `ValueError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown router settings {unknown}; known: {sorted(known)}.")
        router = cls(**values)
        router.null_experts = {**dict.fromkeys(NULL_EXPERT_KINDS, 0), **dict(router.null_experts or {})}
        router.validate()
        return router

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def deviation(self) -> str | None:
        """Why these settings change an upcycled model's outputs at step 0, or `None` where they do not. Noise,
        jitter, capacity (training only), losses, a zero bias and sigmoid scoring with renormalised weights are all
        neutral; a gating residual is too while its map is zero (as converted)."""
        why = []
        if any(self.null_experts.values()):
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.null_experts.items() if n)
            why.append(f"MoE++ null experts ({kinds}) take tokens away from the FFN experts")
        if not self.normalize:
            why.append("the top-k weights are not renormalised, so copies of the FFN do not sum to it")
        if self.scaling_factor != 1.0:
            why.append(f"the routed output is scaled by {self.scaling_factor}")
        return "; ".join(why) or None

    def validate(self) -> None:
        """Raise `ValueError` for settings that cannot describe a router."""
        if self.scoring not in SCORINGS:
            raise ValueError(f"router scoring must be one of {SCORINGS}, got {self.scoring!r}.")
        if self.network not in NETWORKS:
            raise ValueError(f"router network must be one of {NETWORKS}, got {self.network!r}.")
        if self.mlp_hidden_size < 1:
            raise ValueError(f"router mlp_hidden_size must be positive, got {self.mlp_hidden_size}.")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"router jitter must be in [0, 1), got {self.jitter}.")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"router capacity_factor must be positive or None, got {self.capacity_factor}.")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"router {name} must be >= 0, got {getattr(self, name)}.")
        bad = sorted(set(self.null_experts) - set(NULL_EXPERT_KINDS))
        if bad:
            raise ValueError(f"unknown null experts {bad}; kinds are {NULL_EXPERT_KINDS}.")
        if any(int(n) < 0 for n in self.null_experts.values()):
            raise ValueError(f"null expert counts must be >= 0, got {self.null_experts}.")


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
        router (`dict`, *optional*):
            The router's settings (see `RouterConfig` for each key and its default): scoring, normalisation,
            network, noise, capacity, losses, bias balancing, null experts, gating residual. Missing keys take
            their defaults; configs written by moeify 0.1 (flat `norm_topk_prob`, `router_aux_loss_coef`) load into
            it. `norm_topk_prob` and `router_aux_loss_coef` remain readable (and settable) as attributes.
        mlp_activation (`str`, defaults to `"silu"`):
            Activation of the gated MLP (the dense model's `hidden_act` / `hidden_activation`).
        mlp_bias (`bool`, defaults to `False`):
            Whether the expert projections carry biases (dense `mlp_bias=True`).
        mlp_module_name (`str`, defaults to `"mlp"`):
            Attribute of a dense decoder layer that holds its MLP.
        expert_lora_rank (`int`, defaults to 0):
            0: every routed expert has its own weights. `r > 0` (`moeify convert --method lora-experts`, MixLoRA):
            the routed experts share one frozen FFN per layer and each adds its own rank-`r` LoRA delta to
            `gate_up` and `down` (`MoeifyMixLoraExperts`); `moe_intermediate_size` is that FFN's.
        expert_lora_alpha (`float`, *optional*):
            LoRA scaling numerator of the expert deltas (`scale = alpha / r`); defaults to `2 * expert_lora_rank`.
        moeify_format_version (`int`, defaults to `FORMAT_VERSION`):
            The version of moeify's format the model was written in; code that reads an older one refuses a newer one.
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
    router: dict[str, Any] | None = None
    output_router_logits: bool = False
    mlp_activation: str = "silu"
    mlp_bias: bool = False
    mlp_module_name: str = "mlp"
    expert_lora_rank: int = 0
    expert_lora_alpha: float | None = None
    tie_word_embeddings: bool = False
    moeify_format_version: int = FORMAT_VERSION

    def __post_init__(self, **kwargs: Any) -> None:
        if int(self.moeify_format_version) > FORMAT_VERSION:
            raise ValueError(
                f"this model is in moeify format version {self.moeify_format_version}, written by a newer moeify; "
                f"this code reads versions up to {FORMAT_VERSION}. Upgrade moeify (pip install -U moeify), or load the "
                "model with trust_remote_code=True (and without importing moeify) to run the code saved beside it."
            )
        router = dict(self.router or {})
        for flat, key in _FLAT_ROUTER_KEYS.items():  # moeify 0.1 configs, or the stock classes' argument names
            if flat in kwargs:
                router.setdefault(key, kwargs.pop(flat))
        self.router = RouterConfig.from_dict(router).to_dict()
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
        if self.expert_lora_rank and self.expert_lora_alpha is None:
            self.expert_lora_alpha = 2.0 * self.expert_lora_rank
        self.validate_moe()

    def get_text_config(self, *args: Any, **kwargs: Any) -> MoeifyConfig:
        """This config itself: it answers the dense decoder's fields (`hidden_size`, `layer_types`, ...: see
        `__getattr__`) besides the MoE's, so code that reads "the text config" of a model (generation caches, vLLM's
        Transformers backend) sees one decoder with experts, not the dense sub-config, which has no expert fields."""
        return self

    @property
    def norm_topk_prob(self) -> bool:
        """Whether the top-k weights are renormalised (`router["normalize"]`), under the stock classes' name."""
        return bool(self.router["normalize"])

    @norm_topk_prob.setter
    def norm_topk_prob(self, value: bool) -> None:
        self.router["normalize"] = bool(value)

    @property
    def router_aux_loss_coef(self) -> float:
        """Weight of the load-balancing loss (`router["aux_loss_coef"]`), under the stock classes' name."""
        return float(self.router["aux_loss_coef"])

    @router_aux_loss_coef.setter
    def router_aux_loss_coef(self, value: float) -> None:
        self.router["aux_loss_coef"] = float(value)

    @property
    def num_null_experts(self) -> int:
        """Zero-computation experts (MoE++) a token may pick besides the routed FFN experts."""
        return sum(self.router["null_experts"].values())

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
        if self.expert_lora_rank < 0:
            raise ValueError(f"expert_lora_rank must be >= 0 (0: full experts), got {self.expert_lora_rank}.")
        num_layers = self.text_config.num_hidden_layers
        bad = [i for i in self.moe_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside the model's {num_layers} layers.")


__all__ = ["MoeifyConfig", "RouterConfig"]
