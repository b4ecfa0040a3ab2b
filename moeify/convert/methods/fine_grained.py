"""Experts made of slices of the dense FFN's neurons: fine-grained experts (`--granularity`, DeepSeekMoE-style
groups with tied router rows) and splits (`--split random|kmeans`, LLaMA-MoE)."""

from __future__ import annotations

from dataclasses import replace

import torch

from .base import DenseFFN, LayerContext, MoELayerWeights, init_router, neurons, with_shared
from .copy import partial_shared


def fine_grained_upcycle(ffn: DenseFFN, ctx: LayerContext) -> MoELayerWeights:
    """Fine-grained upcycling (He et al. 2024, Megatron-Core): E = R * G experts, R replicas of the G slices of the
    FFN's intermediate dimension; exact at step 0.

    Slice g keeps neurons `[g I/G, (g+1) I/G)`: those rows of gate and up, those columns of down, and the slice's
    down is multiplied by G (down's bias is kept whole). Expert e is slice `e % G` of replica `e // G`, and the
    router rows of a replica's G experts are identical, so their probabilities tie and top-k (K = m G) takes m
    whole replicas. With renormalised weights each selected slice weighs 1/(m G):
    `sum over m replicas of sum_g 1/(m G) * (G down_g h_g + b) = sum_g down_g h_g + b = FFN(x)`. Scaling down is
    exact; scaling gate or up would not be (the activation is not homogeneous). With shared experts the routed part
    is halved first, as in `copy_upcycle`; with `--shared-expert-size S` the shared experts are the FFN's first S
    neurons and the G slices split the other I - S (`partial_shared`).
    """
    g = ctx.granularity
    groups = replace(ctx, num_experts=ctx.num_experts // g, top_k=ctx.top_k // g)  # one router row per replica
    router = init_router(groups, ffn.gate.shape[1]).repeat_interleave(g, dim=0)
    partial = partial_shared(ffn, ctx) if ctx.shared_experts and ctx.shared_size else None
    routed = partial[0] if partial else ffn.scaled_output(0.5) if ctx.shared_experts else ffn
    size = routed.intermediate_size // g
    slices = []
    for index in range(g):
        slices.append(neurons(routed, torch.arange(index * size, (index + 1) * size), g))
    experts = [slices[e % g] for e in range(ctx.num_experts)]  # the same objects: converted once per slice
    if partial:
        return replace(partial[1], router=router, experts=experts)
    return with_shared(ffn, ctx, router, experts)


def split_upcycle(ffn: DenseFFN, ctx: LayerContext) -> MoELayerWeights:
    """Neuron splitting (MoEfication, LLaMA-MoE): the FFN's I neurons partitioned into E disjoint experts of I / E
    neurons, at random (seeded) or by balanced k-means on each neuron's [gate; up] weight rows (L2-normalised, so
    neurons that read the same directions share an expert). Not exact at step 0.

    Scale: each expert's down is multiplied by E. With renormalised weights that sum to 1, a uniform router and a
    random choice of K experts, the expected output is then exactly the dense FFN's (`E/E * sum of all experts`),
    whatever K; a trained router makes it better than the average. Shared experts (full copies) are added as in
    `copy_upcycle`, the routed half then halved.
    """
    routed = ffn.scaled_output(0.5) if ctx.shared_experts else ffn
    size = routed.intermediate_size
    if ctx.split == "kmeans":
        from ..clustering import balanced_kmeans

        features = torch.cat([routed.gate, routed.up], dim=1).float()
        features = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
        labels = balanced_kmeans(features, ctx.num_experts, seed=ctx.layer_seed)
        groups = [torch.nonzero(labels == e).flatten() for e in range(ctx.num_experts)]
    else:
        generator = torch.Generator().manual_seed(ctx.layer_seed)
        groups = list(torch.randperm(size, generator=generator).reshape(ctx.num_experts, -1))
    experts = [neurons(routed, rows.sort().values, ctx.num_experts) for rows in groups]
    return with_shared(ffn, ctx, init_router(ctx, ffn.gate.shape[1]), experts)
