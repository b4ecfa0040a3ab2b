"""Mistral (sliding-window attention on every layer)."""

from .base import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(model_type="mistral", display_name="Mistral", native_targets=("mixtral", "qwen2_moe"))
