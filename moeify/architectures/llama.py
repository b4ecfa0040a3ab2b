"""Llama (incl. Llama 3 rope scaling, custom head_dim, attention / MLP biases)."""

from .base import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    model_type="llama", display_name="Llama", native_targets=("mixtral", "qwen2_moe", "granitemoeshared")
)
