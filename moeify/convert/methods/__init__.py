"""Upcycling methods: how one dense FFN becomes a layer's routed experts, shared experts and router.

A method is a function `(DenseFFN, LayerContext) -> MoELayerWeights` registered in `METHODS` (one module each:
`copy.py`, `fine_grained.py`); per-expert transforms run after it (`drop.py`). A method sees one layer at a time (the
converter streams), and may return the same `ExpertFFN` object for several experts: writers then convert it once and
write its bytes once per expert.
"""

from __future__ import annotations

from collections.abc import Callable

from ...errors import MoeifyError
from .base import DenseFFN, ExpertFFN, LayerContext, LazyExperts, MoELayerWeights
from .copy import copy_upcycle
from .drop import add_expert_noise, drop_upcycle
from .fine_grained import fine_grained_upcycle, split_upcycle

TRANSFORMS: dict[str, Callable[..., ExpertFFN]] = {"drop_upcycling": drop_upcycle, "expert_noise": add_expert_noise}


def apply_transforms(weights: MoELayerWeights, ctx: LayerContext) -> MoELayerWeights:
    """The layer with `ctx.transforms` applied to each routed expert, built lazily (see `LazyExperts`)."""
    if not ctx.transforms:
        return weights
    base = weights.experts

    def build(expert: int) -> ExpertFFN:
        ffn = base[expert]
        for name, settings in ctx.transforms.items():
            ffn = TRANSFORMS[name](ffn, ctx, expert, **settings)
        return ffn

    return MoELayerWeights(weights.router, LazyExperts(len(base), build), weights.shared, weights.shared_gate)


METHODS: dict[str, Callable[[DenseFFN, LayerContext], MoELayerWeights]] = {
    "copy": copy_upcycle,
    "fine-grained": fine_grained_upcycle,
    "split": split_upcycle,
    # MixLoRA: the experts are copies of the FFN, which the format writes once with each expert's zero-B LoRA delta.
    "lora-experts": copy_upcycle,
}


EXACT_METHODS = {"copy", "fine-grained", "lora-experts"}


def get_method(name: str) -> Callable[[DenseFFN, LayerContext], MoELayerWeights]:
    """The upcycling method called `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise MoeifyError(f"unknown upcycling method '{name}'; available: {', '.join(sorted(METHODS))}") from None
