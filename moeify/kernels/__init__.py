"""moeify's own expert kernels, registered with transformers' experts interface when moeify is imported.

They are not part of the remote code saved beside a model: without moeify installed, a moeify-format model runs
its experts through transformers' own implementations.
"""
