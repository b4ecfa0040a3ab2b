"""Upcycling methods: how one dense FFN becomes a layer's routed experts (and its router's first weights)."""
