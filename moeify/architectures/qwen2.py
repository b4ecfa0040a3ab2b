"""Qwen2 (q/k/v biases, optional sliding window on the top layers)."""

from .base import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(model_type="qwen2", display_name="Qwen2", native_targets=("qwen2_moe",))
