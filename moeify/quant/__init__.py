"""4-bit (or frozen full-precision) experts and their per-expert LoRA, for fine-tuning MoEs (needs bitsandbytes
and peft; not part of the remote code saved beside converted weights)."""

from .config import ExpertLoraConfig, ExpertQuantization
from .dispatch import ExpertDispatch, LoraFactors
from .experts_4bit import Experts4bit, quantize_experts
from .experts_frozen import ExpertsFrozen, freeze_experts
from .loading import load_for_training, load_with_adapter, save_4bit
from .lora import ExpertsLoraLayer, add_expert_lora

# Their names in moeify 0.1, still importable.
ExpertLora = ExpertLoraConfig
ExpertsLora = ExpertsLoraLayer

__all__ = [
    "ExpertDispatch",
    "ExpertLoraConfig",
    "ExpertQuantization",
    "Experts4bit",
    "ExpertsFrozen",
    "ExpertsLoraLayer",
    "LoraFactors",
    "add_expert_lora",
    "freeze_experts",
    "load_for_training",
    "load_with_adapter",
    "quantize_experts",
    "save_4bit",
]
