"""moeify: upcycle dense Hugging Face causal LMs into Mixture-of-Experts models.

`import moeify` registers `MoeifyConfig` / `MoeifyForCausalLM` / `MoeifyModel` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads moeify-format models.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import MoeifyConfig, MoeifyForCausalLM, MoeifyModel

__version__ = "0.1.0"

AutoConfig.register(MoeifyConfig.model_type, MoeifyConfig, exist_ok=True)
AutoModel.register(MoeifyConfig, MoeifyModel, exist_ok=True)
AutoModelForCausalLM.register(MoeifyConfig, MoeifyForCausalLM, exist_ok=True)
# Both calls are needed for `save_pretrained` to write a complete `auto_map` and copy the modeling files.
MoeifyConfig.register_for_auto_class()
MoeifyForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MoeifyConfig", "MoeifyForCausalLM", "__version__"]
