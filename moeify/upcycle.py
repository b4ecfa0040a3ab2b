"""Upcycling methods: how one dense FFN becomes a layer's routed experts, shared experts and router.

A method is a function `(DenseFFN, LayerContext) -> MoELayerWeights` registered in `METHODS`. It sees one
layer at a time (the converter streams), and may return the same `ExpertFFN` object for several experts:
writers then convert it once and write its bytes once per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import MoeifyError


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


@dataclass
class MoELayerWeights:
    """One MoE layer: `router` `(E, H)`, `experts` (E entries), shared experts as one MLP, and its gate `(1, H)`."""

    router: torch.Tensor
    experts: list[ExpertFFN]
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


def copy_upcycle(ffn: DenseFFN, ctx: LayerContext) -> MoELayerWeights:
    """Sparse upcycling (Komatsuzaki et al. 2022): every expert is the dense FFN; exact at step 0.

    With renormalised top-k, `sum_k w_k FFN(x) = FFN(x)`. With shared experts, the routed experts' output
    is halved and the shared experts (copies too) sit behind a zero-initialised sigmoid gate (= 1/2):
    `FFN/2 + FFN/2 = FFN`, bit-exact for powers of two.
    """
    router = init_router(ctx, ffn.gate.shape[1])
    if ctx.shared_experts == 0:
        return MoELayerWeights(router=router, experts=[ffn] * ctx.num_experts)
    routed = ffn.scaled_output(0.5)
    return MoELayerWeights(
        router=router,
        experts=[routed] * ctx.num_experts,
        shared=stack_shared(ffn, ctx.shared_experts),
        shared_gate=torch.zeros(1, ffn.gate.shape[1]),
    )


METHODS: dict[str, Callable[[DenseFFN, LayerContext], MoELayerWeights]] = {"copy": copy_upcycle}
EXACT_METHODS = {"copy"}


def get_method(name: str) -> Callable[[DenseFFN, LayerContext], MoELayerWeights]:
    """The upcycling method called `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise MoeifyError(f"unknown upcycling method '{name}'; available: {', '.join(sorted(METHODS))}") from None
