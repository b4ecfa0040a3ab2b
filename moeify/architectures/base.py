"""What moeify needs to know about a dense architecture, declared as data.

An adapter says where a decoder layer's MLP lives in the checkpoint, how its projections are named and
which activation it uses, and which stock transformers MoE classes can represent the upcycled model
exactly (tried in order by `--format auto`). The converter never branches on an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedConfig


@dataclass(frozen=True)
class ArchitectureAdapter:
    """A dense decoder architecture that moeify can upcycle.

    Attributes:
        model_type: the dense config's `model_type` (`"llama"`, `"gemma3_text"`, ...).
        display_name: how messages name it.
        layer_prefix: checkpoint prefix of decoder layer `{layer}`.
        mlp_module: attribute of the decoder layer that holds the MLP.
        gate_proj, up_proj, down_proj: projection names inside the MLP.
        fused_gate_up: name of a single `[gate; up]` projection (Phi-3) used instead of gate/up.
        activation_attrs: config attributes that name the MLP activation, first found wins.
        native_targets: names of the stock MoE classes (see `moeify.formats.native`) to try, in order.
        source_model_types: other `model_type`s (e.g. a multimodal wrapper) that this adapter does not cover,
            only used to give a better error message.
    """

    model_type: str
    display_name: str
    layer_prefix: str = "model.layers.{layer}."
    mlp_module: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    fused_gate_up: str | None = None
    activation_attrs: tuple[str, ...] = ("hidden_act",)
    native_targets: tuple[str, ...] = field(default_factory=tuple)

    def mlp_prefix(self, layer: int) -> str:
        """Checkpoint prefix of layer `layer`'s MLP, e.g. `model.layers.3.mlp.`."""
        return f"{self.layer_prefix.format(layer=layer)}{self.mlp_module}."

    def activation(self, config: PreTrainedConfig) -> str:
        """Name of the MLP activation in transformers' `ACT2FN`."""
        for attr in self.activation_attrs:
            value = getattr(config, attr, None)
            if value:
                return str(value)
        raise ValueError(f"{self.display_name} config names no MLP activation ({', '.join(self.activation_attrs)}).")

    def mlp_bias(self, config: PreTrainedConfig) -> bool:
        """Whether the dense MLP projections carry biases."""
        return bool(getattr(config, "mlp_bias", False))

    def ffn_tensor_names(self, layer: int, config: PreTrainedConfig) -> dict[str, str]:
        """Checkpoint names of layer `layer`'s FFN tensors, keyed by role.

        Roles: `gate`, `up` (or `gate_up` when fused), `down`, and `*_bias` when the MLP has biases.
        """
        prefix = self.mlp_prefix(layer)
        projections = {"down": self.down_proj}
        if self.fused_gate_up:
            projections["gate_up"] = self.fused_gate_up
        else:
            projections["gate"] = self.gate_proj
            projections["up"] = self.up_proj
        names = {role: f"{prefix}{name}.weight" for role, name in projections.items()}
        if self.mlp_bias(config):
            names.update({f"{role}_bias": f"{prefix}{name}.bias" for role, name in projections.items()})
        return names
