"""Gemma 3 text decoder (GELU-tanh MLP, sandwich norms, sliding/global layers): moeify format only."""

from .base import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    model_type="gemma3_text", display_name="Gemma 3", activation_attrs=("hidden_activation", "hidden_act")
)
