"""`moeify merge`: fold a LoRA adapter into a model's full-precision weights, in the base's own format."""

from .fold import merge

__all__ = ["merge"]
