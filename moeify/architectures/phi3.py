"""Phi-3 (fused `gate_up_proj` MLP): moeify format only."""

from .base import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(model_type="phi3", display_name="Phi-3", fused_gate_up="gate_up_proj")
