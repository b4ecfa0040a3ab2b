"""Sparse upcycling: every expert a copy of the dense FFN (Komatsuzaki et al. 2022), and shared experts taken from
its neurons (`--shared-expert-size`)."""

from __future__ import annotations

from dataclasses import replace

import torch

from .base import DenseFFN, ExpertFFN, LayerContext, MoELayerWeights, init_router, neurons, stack_shared


def partial_shared(ffn: DenseFFN, ctx: LayerContext) -> tuple[ExpertFFN, MoELayerWeights]:
    """`--shared-expert-size S`: the FFN's neurons split in two, exactly. The shared experts take neurons `[0, S)`
    (down doubled against their zero gate's 1/2, down's bias left to the routed side); the routed side is the MLP
    of neurons `[S, I)`, returned for the method to copy or slice. Every neuron is counted once:
    `FFN(x) = sum_{n < S} + sum_{n >= S}`."""
    size = ffn.intermediate_size
    shared = neurons(ffn, torch.arange(ctx.shared_size), 2.0)
    if shared.down_bias is not None:
        shared = replace(shared, down_bias=torch.zeros_like(shared.down_bias))
    layer = MoELayerWeights(
        router=init_router(ctx, ffn.gate.shape[1]),
        experts=[],
        shared=stack_shared(shared, ctx.shared_experts),
        shared_gate=torch.zeros(1, ffn.gate.shape[1]),
    )
    return neurons(ffn, torch.arange(ctx.shared_size, size), 1.0), layer


def copy_upcycle(ffn: DenseFFN, ctx: LayerContext) -> MoELayerWeights:
    """Sparse upcycling (Komatsuzaki et al. 2022): every expert is the dense FFN; exact at step 0.

    With renormalised top-k, `sum_k w_k FFN(x) = FFN(x)`. With shared experts, the routed experts' output
    is halved and the shared experts (copies too) sit behind a zero-initialised sigmoid gate (= 1/2):
    `FFN/2 + FFN/2 = FFN`, bit-exact for powers of two. With `--shared-expert-size S` the shared experts are the
    FFN's first S neurons and every routed expert a copy of the others (`partial_shared`).
    """
    router = init_router(ctx, ffn.gate.shape[1])
    if ctx.shared_experts == 0:
        return MoELayerWeights(router=router, experts=[ffn] * ctx.num_experts)
    if ctx.shared_size:
        routed, layer = partial_shared(ffn, ctx)
        return replace(layer, experts=[routed] * ctx.num_experts)
    routed = ffn.scaled_output(0.5)
    return MoELayerWeights(
        router=router,
        experts=[routed] * ctx.num_experts,
        shared=stack_shared(ffn, ctx.shared_experts),
        shared_gate=torch.zeros(1, ffn.gate.shape[1]),
    )
