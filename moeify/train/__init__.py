"""`moeify train`: recipes (`recipe.py`), data (`data.py`, `corpus.py`), the loss (`loss.py`), the run on
transformers' Trainer (`run.py`), aux-loss-free balancing (`balancing.py`) and `--dry-run` (`dry_run.py`);
`python -m moeify.train` for launchers."""

from .loss import causal_lm_loss

__all__ = ["causal_lm_loss"]
