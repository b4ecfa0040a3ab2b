"""vLLM plugin: with moeify installed beside vLLM, `vllm serve OUT` and `LLM(OUT)` run moeify-format outputs.

vLLM loads it through the `vllm.general_plugins` entry point (pyproject.toml) in every process it starts; `register`
imports moeify (its config and model classes join transformers' Auto classes, so no `trust_remote_code` is needed)
and registers `MoeifyForCausalLM` with vLLM's `ModelRegistry` as the class in `moeify.serving.vllm_model`. That class is
vLLM's own Transformers-backend MoE model, except where vLLM's fused MoE kernel would compute moeify's experts
wrongly: there the experts stay moeify's modules, computed by moeify's code inside vLLM. Nothing of vLLM is patched.
"""

from __future__ import annotations

ARCHITECTURE = "MoeifyForCausalLM"


def register() -> None:
    """The `vllm.general_plugins` entry point: register moeify's format with transformers and with vLLM."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "moeify.serving.vllm_model:MoeifyForCausalLM")
