"""`import moeify` registers moeify's classes with transformers' Auto classes, without importing transformers.

Importing transformers' modeling code costs seconds (torch, torch.distributed, dynamo), more than torch itself,
and the `moeify` command must answer `--help` and argument errors quickly. So `import moeify` only installs an
import hook: when transformers loads its Auto configuration mapping, `MoeifyConfig` is registered there; when it
loads its Auto model mappings, `MoeifyForCausalLM` and `MoeifyModel` are registered as stand-ins that import the
real classes the first time they are used (and then put the real classes in their place). If transformers is
already loaded, everything is registered at once. Registration by hand, as transformers documents it
(`AutoConfig.register`, `AutoModelForCausalLM.register`), would import the modeling code at `import moeify`.

The same hook registers moeify's expert kernels (`moeify.kernels`) with transformers' experts interface once
transformers loads its MoE integration, and runs the registrations that had to wait while moeify's own configuration
module was the one importing transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODELS_MODULE = "transformers.models.auto.modeling_auto"
EXPERTS_MODULE = "transformers.integrations.moe"
MODEL_CLASSES = {"MoeifyForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING", "MoeifyModel": "MODEL_MAPPING"}


CONFIG_FILE_MODULE = "moeify.modeling.configuration_moeify"
_deferred: list[Callable[[], None]] = []


def _config_being_imported() -> bool:
    """True while moeify's configuration module itself runs: its `from transformers import AutoConfig` is what
    loads transformers' Auto mapping, and `MoeifyConfig` does not exist yet."""
    module = sys.modules.get(CONFIG_FILE_MODULE)
    return module is not None and not hasattr(module, "MoeifyConfig")


def run_deferred() -> None:
    """Registrations that waited for `MoeifyConfig` to exist (run once its module has)."""
    while _deferred:
        _deferred.pop(0)()


def register_kernels() -> None:
    """moeify's expert kernels join transformers' experts interface (`experts_implementation="moeify"`)."""
    from .kernels import cpu_experts

    cpu_experts.register()


def register_config() -> None:
    """`AutoConfig` knows model_type "moeify"."""
    if _config_being_imported():
        _deferred.append(register_config)
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling.configuration_moeify import MoeifyConfig

    CONFIG_MAPPING.register(MoeifyConfig.model_type, MoeifyConfig, exist_ok=True)


def register_models() -> None:
    """`AutoModelForCausalLM` and `AutoModel` map `MoeifyConfig` to moeify's classes (stand-ins until used)."""
    if _config_being_imported():
        _deferred.append(register_models)
        return
    modeling_auto = sys.modules[MODELS_MODULE]
    from .modeling.configuration_moeify import MoeifyConfig

    for name, mapping in MODEL_CLASSES.items():
        getattr(modeling_auto, mapping).register(MoeifyConfig, _stand_in(name), exist_ok=True)


class _StandIn(type):
    """The class of a stand-in: any attribute it lacks (`from_pretrained`, `config_class`, ...) is the real class's,
    imported then, and the real class replaces the stand-in in the Auto mapping."""

    def __getattr__(cls, attribute: str) -> Any:
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)
        return getattr(_real(cls.__name__), attribute)


def _stand_in(name: str) -> type:
    return _StandIn(name, (), {"__module__": "moeify.modeling", "__doc__": f"moeify's {name}, imported when used."})


def _real(name: str) -> type:
    from . import modeling

    real = getattr(modeling, name)
    from .modeling import MoeifyConfig

    getattr(sys.modules[MODELS_MODULE], MODEL_CLASSES[name]).register(MoeifyConfig, real, exist_ok=True)
    return real


class _RunAfter(importlib.abc.Loader):
    """A module's own loader, then `callback` once the module has run."""

    def __init__(self, inner: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self.inner, self.callback = inner, callback

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.callback()

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, is_package, ...: the inner loader's
        return getattr(self.inner, name)


class _Hook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loaders of the modules registration waits for."""

    def __init__(self) -> None:
        self.pending: dict[str, Callable[[], None]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        callback = self.pending.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            del self.pending[fullname]
            spec.loader = _RunAfter(spec.loader, callback)
            if not self.pending:
                sys.meta_path.remove(self)
        return spec


_HOOK = _Hook()


def install() -> None:
    """Register now what transformers has loaded already; hook the rest (idempotent)."""
    callbacks = (
        (CONFIG_MODULE, register_config),
        (MODELS_MODULE, register_models),
        (EXPERTS_MODULE, register_kernels),
        (CONFIG_FILE_MODULE, run_deferred),
    )
    for module, callback in callbacks:
        if module in sys.modules:
            callback()
        else:
            _HOOK.pending[module] = callback
    if _HOOK.pending and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
