"""Per-expert LoRA on `Experts4bit`, as peft tuner layers laid out like peft's `target_parameters` LoRA.

peft puts LoRA on fused 3-D experts with `LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])`: two `ParamWrapper`s around the experts module, gate_up innermost, each with
`lora_A` `(E * r, in)` and `lora_B` `(out, E * r)`. `ExpertsLoraLayer` is the same nesting around an `Experts4bit`, so
a `PeftModel` holding it saves (`save_pretrained`) an adapter that stock peft loads onto the full-precision model
with `target_parameters`, and peft treats it as its own (trainable parameters, state dict, adapter switching).
The difference is the computation: the factors of both wrappers are handed to `Experts4bit`, which applies each
expert's `A_e`, `B_e` to that expert's tokens inside its grouped dispatch, never forming `W + delta`.
"""

from __future__ import annotations

import math

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import ExpertLoraConfig
from .dispatch import PROJECTIONS, ExpertDispatch, LoraFactors


class ExpertsLoraLayer(nn.Module, BaseTunerLayer):
    """LoRA of one projection (`"gate_up"` or `"down"`) of every expert; wraps an `Experts4bit` / `ExpertsFrozen` or
    another `ExpertsLoraLayer`."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, projection: str, adapter_name: str, lora: ExpertLoraConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.projection = projection
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, lora)

    def accepts_unrouted(self, hidden_states: torch.Tensor) -> bool:
        return self.experts.accepts_unrouted(hidden_states)

    @property
    def experts(self) -> ExpertDispatch:
        module = self.base_layer
        while isinstance(module, ExpertsLoraLayer):
            module = module.base_layer
        assert isinstance(module, ExpertDispatch)
        return module

    def update_layer(self, adapter_name: str, lora: ExpertLoraConfig) -> None:
        lora.validate()
        experts = self.experts
        out_dim, in_dim = experts.shapes[self.projection]
        rank = experts.num_experts * lora.r
        self.r[adapter_name], self.lora_alpha[adapter_name], self.scaling[adapter_name] = lora.r, lora.alpha, lora.scale
        self.lora_A[adapter_name] = nn.Linear(in_dim, rank, bias=False)
        self.lora_B[adapter_name] = nn.Linear(rank, out_dim, bias=False)
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))  # peft's default
        nn.init.zeros_(self.lora_B[adapter_name].weight)  # the adapted model starts equal to the base
        self.lora_dropout[adapter_name] = nn.Dropout(lora.dropout) if lora.dropout else nn.Identity()
        device = next(experts.parameters()).device
        self.lora_A[adapter_name].to(device)
        self.lora_B[adapter_name].to(device)

    def factors(self) -> dict[str, LoraFactors]:
        """The active adapter's factors of this wrapper and of the wrappers inside it."""
        inner = self.base_layer.factors() if isinstance(self.base_layer, ExpertsLoraLayer) else {}
        if self.disable_adapters:
            return inner
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) > 1:
            raise ValueError(f"ExpertsLoraLayer applies one adapter at a time; active: {active}")
        for name in active:
            inner[self.projection] = LoraFactors(
                self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.lora_dropout[name]
            )
        return inner

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.experts(hidden_states, top_k_index, top_k_weights, lora=self.factors())

    def merge(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("expert LoRA is merged into full precision by `moeify merge` (4-bit would lose it)")

    def unmerge(self) -> None:
        raise NotImplementedError("expert LoRA is never merged in place")


def add_expert_lora(model: nn.Module, lora: ExpertLoraConfig, adapter_name: str = "default") -> list[str]:
    """Give every `Experts4bit` / `ExpertsFrozen` of `model` per-expert LoRA on gate_up and down; returns the
    experts' names.

    With a `PeftModel` (e.g. from `get_peft_model` for attention LoRA), its config is extended so
    `save_pretrained` writes an adapter that stock peft loads with `target_parameters` onto the full-precision
    model; the experts may use another rank than the other targets (kept in peft's `rank_pattern`).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, ExpertDispatch)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no 4-bit or frozen experts: call moeify.quant.quantize_experts or "
            "freeze_experts first."
        )
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        wrapped: nn.Module = getattr(holder, child)
        for projection in PROJECTIONS:  # gate_up innermost, as peft nests target_parameters in list order
            wrapped = ExpertsLoraLayer(wrapped, projection, adapter_name, lora)
        setattr(holder, child, wrapped)
    if isinstance(model, PeftModel):
        config = model.peft_config[adapter_name]
        if lora.use_rslora != config.use_rslora:
            raise ValueError("the experts' LoRA and the other targets must agree on use_rslora (one adapter config)")
        suffixes = sorted({".".join(name.split(".")[-2:]) for name in names})  # e.g. "mlp.experts"
        targets = [f"{s}.{p}_proj" for s in suffixes for p in PROJECTIONS]
        config.target_parameters = list(dict.fromkeys([*(config.target_parameters or []), *targets]))
        if (lora.r, lora.alpha) != (config.r, config.lora_alpha):
            config.rank_pattern = {**(config.rank_pattern or {}), **dict.fromkeys(targets, lora.r)}
            config.alpha_pattern = {**(config.alpha_pattern or {}), **dict.fromkeys(targets, lora.alpha)}
    return [name.removeprefix("base_model.model.") for name in names]
