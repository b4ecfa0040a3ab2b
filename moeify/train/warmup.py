"""Router warm-up: for the first `moe.router_warmup_steps` optimizer steps only the routers train.

An upcycled MoE starts with experts that are copies (or near-copies) of one FFN and routers that have never seen
them. A warm-up lets the routers settle on the upcycled experts before the experts (and everything else trained)
start to move. The other trainable weights lose their gradients after each backward pass, so gradient clipping and
AdamW see only the routers'; their optimizer state and weight decay start when the warm-up ends. `requires_grad` is
left alone: DDP and FSDP fix the set of trained parameters when they wrap the model.
"""

from __future__ import annotations

from torch import nn

from ..quant.config import ROUTER_MODULES


def is_router_parameter(name: str) -> bool:
    """A parameter of a router module (`gate`, `router`, the shared-expert gate, MoE++ constant experts), by name,
    through peft's `modules_to_save` wrappers."""
    return any(part in ROUTER_MODULES for part in name.split("."))


def warmup_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the trained routers' parameters, every other trained parameter) of `model`."""
    routers, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (routers if is_router_parameter(name) else others).append(param)
    return routers, others
