"""Serving engines: the vLLM plugin that lets vLLM load moeify-format models."""
