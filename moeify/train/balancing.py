"""Aux-loss-free load balancing (DeepSeek-V3): move each router's selection bias after every optimizer step.

Routers built with `router.bias_update_rate > 0` count, while training, how many assignments each expert receives.
After each optimizer step, `update_routing_bias(model)` sums those counts over processes (so every process applies
the same update and the biases stay identical) and moves each bias by `u * sign(mean_load - load)`. Use it from a
plain accelerate / PyTorch loop after `optimizer.step()`, or add `BiasBalancingCallback()` to a `Trainer` (`moeify
train` does when the model has such routers). Gradient checkpointing runs each router twice per step and so counts
twice; the sign of `mean_load - load` is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback


def balanced_routers(model: nn.Module) -> list[nn.Module]:
    """The routers of `model` (through DDP / FSDP / peft wrappers) that carry a selection bias. The buffer must be
    the module's own: peft's `ModulesToSaveWrapper` forwards attribute lookups to the router it wraps."""
    return [m for m in model.modules() if m._buffers.get("e_score_correction_bias") is not None]


@torch.no_grad()
def update_routing_bias(model: nn.Module) -> int:
    """One aux-loss-free balancing step on every biased router of `model`; returns how many were updated.

    Counts are summed over processes when `torch.distributed` is initialised (one all-reduce of all layers' counts).
    """
    routers = [r for r in balanced_routers(model) if r.load is not None]
    if not routers:
        return 0
    loads = torch.stack([r.load for r in routers])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    for router, load in zip(routers, loads, strict=True):
        router.update_bias(load)
    return len(routers)


class BiasBalancingCallback(TrainerCallback):
    """`Trainer` callback: `update_routing_bias(model)` after every optimizer step."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **_: Any) -> None:
        if model is not None:
            update_routing_bias(model)
