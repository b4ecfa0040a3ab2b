"""moeify: upcycle dense Hugging Face causal LMs into Mixture-of-Experts models.

`import moeify` registers `MoeifyConfig` / `MoeifyForCausalLM` / `MoeifyModel` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads moeify-format models. It imports neither torch nor transformers
itself (see `moeify.registration`): the classes load when transformers or the names below are first used.
"""

from typing import Any

from . import registration

__version__ = "0.1.0"

registration.install()

__all__ = [
    "BiasBalancingCallback",
    "MoeifyConfig",
    "MoeifyForCausalLM",
    "MoeifyModel",
    "RouterConfig",
    "RouterStats",
    "__version__",
    "update_routing_bias",
]


def __getattr__(name: str) -> Any:
    if name in ("MoeifyConfig", "MoeifyForCausalLM", "MoeifyModel", "RouterConfig"):
        from . import modeling

        return getattr(modeling, name)
    if name in ("BiasBalancingCallback", "update_routing_bias"):
        from .train import balancing

        return getattr(balancing, name)
    if name == "RouterStats":
        from .inspect.router_stats import RouterStats

        return RouterStats
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")
