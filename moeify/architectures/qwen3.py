"""Qwen3 (q/k norms, explicit head_dim)."""

from .base import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(model_type="qwen3", display_name="Qwen3", native_targets=("qwen3_moe",))
