"""Upcycling methods: how one dense FFN becomes a layer's routed experts, shared experts and router.

A method is a function `(DenseFFN, LayerContext) -> MoELayerWeights` registered in `METHODS`. It sees one
layer at a time (the converter streams), and may return the same `ExpertFFN` object for several experts:
writers then convert it once and write its bytes once per expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ...errors import MoeifyError


@dataclass
class ExpertFFN:
    """A gated MLP: `down(act(gate x + gate_bias) * (up x + up_bias)) + down_bias`. Shapes `(I, H)`, `(H, I)`."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]

    def scaled_output(self, factor: float) -> ExpertFFN:
        """The same MLP with its output multiplied by `factor` (exact: only `down` is scaled)."""
        return ExpertFFN(
            self.gate,
            self.up,
            self.down * factor,
            self.gate_bias,
            self.up_bias,
            None if self.down_bias is None else self.down_bias * factor,
        )


DenseFFN = ExpertFFN


@dataclass
class LayerContext:
    """What a method knows about the layer it converts."""

    layer: int
    num_experts: int
    top_k: int
    shared_experts: int
    router_init: str
    router_init_std: float
    seed: int
    # Per-expert transforms applied after the method, in order (Drop-Upcycling, expert noise): name -> settings.
    transforms: dict[str, dict[str, Any]] = field(default_factory=dict)
    granularity: int = 1
    split: str | None = None  # neuron splitting: "random" or "kmeans"
    shared_size: int = 0  # neurons of each shared expert: 0 = a full copy of the FFN, else its first `shared_size`


@dataclass
class MoELayerWeights:
    """One MoE layer: `router` `(E, H)`, `experts` (E entries), shared experts as one MLP, and its gate `(1, H)`."""

    router: torch.Tensor
    experts: Sequence[ExpertFFN]
    shared: ExpertFFN | None = None
    shared_gate: torch.Tensor | None = None


def init_router(ctx: LayerContext, hidden_size: int) -> torch.Tensor:
    """Router weights `(E, H)` in float32: zeros, or N(0, std) from a generator seeded by (seed, layer)."""
    if ctx.router_init == "zeros":
        return torch.zeros(ctx.num_experts, hidden_size)
    generator = torch.Generator().manual_seed(ctx.seed * 100_003 + ctx.layer)
    return torch.randn(ctx.num_experts, hidden_size, generator=generator) * ctx.router_init_std


def _concat(tensors: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors, dim=dim)  # type: ignore[arg-type]


def stack_shared(ffn: ExpertFFN, count: int) -> ExpertFFN:
    """`count` copies of `ffn` as one MLP of `count * I` neurons whose output equals `ffn`'s."""
    if count == 1:
        return ffn
    return ExpertFFN(
        gate=torch.cat([ffn.gate] * count, dim=0),
        up=torch.cat([ffn.up] * count, dim=0),
        down=torch.cat([ffn.down / count] * count, dim=1),
        gate_bias=_concat([ffn.gate_bias] * count, 0),
        up_bias=_concat([ffn.up_bias] * count, 0),
        down_bias=ffn.down_bias,
    )


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
    return _with_shared(ffn, ctx, router, experts)


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
        labels = balanced_kmeans(features, ctx.num_experts, seed=ctx.seed * 100_003 + ctx.layer)
        groups = [torch.nonzero(labels == e).flatten() for e in range(ctx.num_experts)]
    else:
        generator = torch.Generator().manual_seed(ctx.seed * 100_003 + ctx.layer)
        groups = list(torch.randperm(size, generator=generator).reshape(ctx.num_experts, -1))
    experts = [neurons(routed, rows.sort().values, ctx.num_experts) for rows in groups]
    return _with_shared(ffn, ctx, init_router(ctx, ffn.gate.shape[1]), experts)


def neurons(ffn: ExpertFFN, rows: torch.Tensor, down_scale: float) -> ExpertFFN:
    """The MLP made of `ffn`'s intermediate neurons `rows` (rows of gate and up, columns of down), its down
    projection multiplied by `down_scale`; down's bias is kept whole."""
    return ExpertFFN(
        ffn.gate[rows],
        ffn.up[rows],
        ffn.down[:, rows] * down_scale,
        None if ffn.gate_bias is None else ffn.gate_bias[rows],
        None if ffn.up_bias is None else ffn.up_bias[rows],
        ffn.down_bias,
    )


def _with_shared(
    ffn: DenseFFN, ctx: LayerContext, router: torch.Tensor, experts: Sequence[ExpertFFN]
) -> MoELayerWeights:
    """The layer, with `ctx.shared_experts` full copies of `ffn` behind a zero gate (the routed side already
    halved by the caller), as `copy_upcycle` builds them."""
    if ctx.shared_experts == 0:
        return MoELayerWeights(router=router, experts=experts)
    return MoELayerWeights(
        router=router,
        experts=experts,
        shared=stack_shared(ffn, ctx.shared_experts),
        shared_gate=torch.zeros(1, ffn.gate.shape[1]),
    )


class LazyExperts(Sequence[ExpertFFN]):
    """A layer's experts built when accessed (`build(e)`), so a layer of E distinct experts never holds all E.

    The last expert built is kept: writers read an expert's gate, up and down one after the other.
    """

    def __init__(self, count: int, build: Callable[[int], ExpertFFN]) -> None:
        self.count, self.build = count, build
        self._last: tuple[int, ExpertFFN] | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> ExpertFFN:  # type: ignore[override]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        index %= self.count
        if self._last is None or self._last[0] != index:
            self._last = (index, self.build(index))
        return self._last[1]


def _expert_generator(ctx: LayerContext, expert: int, salt: int) -> torch.Generator:
    """The random stream of one expert of one layer for one transform, from `--seed`."""
    return torch.Generator().manual_seed(((ctx.seed * 100_003 + ctx.layer) * 1_009 + expert) * 7 + salt)


def drop_upcycle(ffn: ExpertFFN, ctx: LayerContext, expert: int, rate: float, independent: bool = False) -> ExpertFFN:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): re-initialise `round(rate * I)` intermediate neurons of this
    expert, the rows of gate and up and the columns of down, from a normal with the mean and std of the values they
    replace (per matrix). By default one random set of neurons is shared by gate, up and down, so whole neurons are
    new; `independent` draws a set per matrix, as the paper's released code does. Biases are kept."""
    generator = _expert_generator(ctx, expert, 1)
    size = ffn.intermediate_size
    count = round(rate * size)
    shared = torch.randperm(size, generator=generator)[:count]
    picks = [torch.randperm(size, generator=generator)[:count] for _ in range(3)] if independent else [shared] * 3

    def reinit(weight: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
        out = weight.float().clone()
        old = out.index_select(dim, rows)
        fresh = torch.randn(old.shape, generator=generator) * old.std() + old.mean()
        out.index_copy_(dim, rows, fresh)
        return out.to(weight.dtype)

    return ExpertFFN(
        reinit(ffn.gate, picks[0], 0),
        reinit(ffn.up, picks[1], 0),
        reinit(ffn.down, picks[2], 1),
        ffn.gate_bias,
        ffn.up_bias,
        ffn.down_bias,
    )


def dropped_neurons(ctx: LayerContext, expert: int, size: int, rate: float) -> torch.Tensor:
    """The neurons `drop_upcycle` re-initialises in this expert (shared-set mode), for tests and reports."""
    return torch.randperm(size, generator=_expert_generator(ctx, expert, 1))[: round(rate * size)]


def add_expert_noise(ffn: ExpertFFN, ctx: LayerContext, expert: int, std: float) -> ExpertFFN:
    """Relative Gaussian noise: each weight matrix `W` of this expert gets `N(0, (std * W.std())^2)` added."""
    generator = _expert_generator(ctx, expert, 2)

    def noisy(weight: torch.Tensor) -> torch.Tensor:
        base = weight.float()
        return (base + torch.randn(base.shape, generator=generator) * (std * base.std())).to(weight.dtype)

    return ExpertFFN(noisy(ffn.gate), noisy(ffn.up), noisy(ffn.down), ffn.gate_bias, ffn.up_bias, ffn.down_bias)


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
