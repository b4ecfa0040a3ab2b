"""moeify's own expert kernels, registered with transformers' experts interface when moeify is imported.

They are not part of the remote code saved beside a model: without moeify installed, a moeify-format model runs
its experts through transformers' own implementations.
"""

# Loaded here, before any kernel module: moeify's import hook registers the kernels as soon as transformers' MoE
# integration has loaded, and a kernel module that loaded it itself would be registered while half-imported.
import transformers.integrations.moe  # noqa: F401, E402
