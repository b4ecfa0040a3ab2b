"""Per-expert transforms after a method: Drop-Upcycling (Nakamura et al. 2025: re-initialise a share of each
expert's neurons) and expert noise."""

from __future__ import annotations

import torch

from .base import ExpertFFN, LayerContext, expert_generator


def drop_upcycle(ffn: ExpertFFN, ctx: LayerContext, expert: int, rate: float, independent: bool = False) -> ExpertFFN:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): re-initialise `round(rate * I)` intermediate neurons of this
    expert, the rows of gate and up and the columns of down, from a normal with the mean and std of the values they
    replace (per matrix). By default one random set of neurons is shared by gate, up and down, so whole neurons are
    new; `independent` draws a set per matrix, as the paper's released code does. Biases are kept."""
    generator = expert_generator(ctx, expert, 1)
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
    return torch.randperm(size, generator=expert_generator(ctx, expert, 1))[: round(rate * size)]


def add_expert_noise(ffn: ExpertFFN, ctx: LayerContext, expert: int, std: float) -> ExpertFFN:
    """Relative Gaussian noise: each weight matrix `W` of this expert gets `N(0, (std * W.std())^2)` added."""
    generator = expert_generator(ctx, expert, 2)

    def noisy(weight: torch.Tensor) -> torch.Tensor:
        base = weight.float()
        return (base + torch.randn(base.shape, generator=generator) * (std * base.std())).to(weight.dtype)

    return ExpertFFN(noisy(ffn.gate), noisy(ffn.up), noisy(ffn.down), ffn.gate_bias, ffn.up_bias, ffn.down_bias)
