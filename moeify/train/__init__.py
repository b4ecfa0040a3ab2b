"""`moeify train` and `moeify eval`: recipes (`recipe.py`), the loss (`loss.py`), the run on transformers' Trainer
(`run.py`), aux-loss-free balancing (`balancing.py`), `--dry-run` (`dry_run.py`) and held-out evaluation with the
training loss (`evaluate.py`). Launchers run `python -m moeify train RECIPE.yaml`."""

from .loss import causal_lm_loss

__all__ = ["causal_lm_loss"]
