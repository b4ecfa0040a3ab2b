"""moeify: upcycle dense Hugging Face causal LMs into Mixture-of-Experts models.

`import moeify` registers `MoeifyConfig` / `MoeifyForCausalLM` / `MoeifyModel` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads moeify-format models. It imports neither torch nor transformers
itself (see `moeify.registration`): the classes load when transformers or the names below are first used.
"""

from typing import Any

from . import registration

__version__ = "0.1.0"

registration.install()

__all__ = ["MoeifyConfig", "MoeifyForCausalLM", "MoeifyModel", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("MoeifyConfig", "MoeifyForCausalLM", "MoeifyModel"):
        from . import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")
