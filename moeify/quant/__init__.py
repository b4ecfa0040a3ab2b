"""4-bit experts and their LoRA, for fine-tuning MoEs (needs bitsandbytes; not part of the saved remote code)."""

from .config import ExpertLora, ExpertQuantization
from .experts_4bit import Experts4bit, quantize_experts

__all__ = ["ExpertLora", "ExpertQuantization", "Experts4bit", "quantize_experts"]
