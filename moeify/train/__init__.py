"""Training: the loss moeify trains with (`loss.py`); recipes and `moeify train` come with the next issue."""

from .loss import causal_lm_loss

__all__ = ["causal_lm_loss"]
