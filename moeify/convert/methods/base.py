"""What every upcycling method works with: the FFN weights of one expert, the layer's context and result, the
router's first weights, and the per-expert random streams."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


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

    @property
    def layer_seed(self) -> int:
        return layer_seed(self.seed, self.layer)


def layer_seed(seed: int, layer: int) -> int:
    """The seed of one layer's random draws (router, splits, per-expert streams) from `--seed`: distinct per layer, and
    the same layer draws the same numbers whatever other layers are converted."""
    return seed * 100_003 + layer


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
    generator = torch.Generator().manual_seed(ctx.layer_seed)
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


def with_shared(
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


def expert_generator(ctx: LayerContext, expert: int, salt: int) -> torch.Generator:
    """The random stream of one expert of one layer for one transform, from `--seed`."""
    return torch.Generator().manual_seed((ctx.layer_seed * 1_009 + expert) * 7 + salt)
