"""Where a model's parameters are in a checkpoint, for code that reads or writes checkpoints tensor by tensor.

A parameter's checkpoint name is its module name, except in the layouts stock `save_pretrained` writes for the
native MoE classes (their names are declared once, in `moeify.formats.native`): Mixtral's and GraniteMoe's routers
keep legacy names, and experts are stored per expert (Mixtral `w1/w3/w2`, Qwen `gate_proj/up_proj/down_proj`) or,
for GraniteMoe, fused under its own names. `load_for_training` and `merge` read through these functions, and
`merge` writes a class's released layout with them.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import torch

from ..errors import MoeifyError
from ..io.checkpoint import Checkpoint
from . import NATIVE_FORMATS, MoETensorNames

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.(.*)$")


@dataclass(frozen=True)
class ExpertPiece:
    """One checkpoint tensor holding (part of) a fused experts parameter (`gate_up_proj` `(E, 2I, H)` or
    `down_proj` `(E, H, I)`): every expert (`expert` None), or one expert's matrix or one `half` of its rows
    (Mixtral's `w1` is half 0 of an expert's `gate_up_proj`, `w3` half 1)."""

    name: str
    param: str
    expert: int | None = None
    half: int | None = None

    def rows(self, total: int) -> slice:
        """The rows of one expert's `(total, in)` matrix that this tensor holds."""
        if self.half is None:
            return slice(None)
        return slice(self.half * total // 2, (self.half + 1) * total // 2)


def _native_names(model_type: str) -> MoETensorNames | None:
    fmt = NATIVE_FORMATS.get(model_type)
    return fmt.names if fmt is not None else None


def checkpoint_name(name: str, names: Collection[str], model_type: str) -> str | None:
    """The checkpoint tensor holding module parameter `name` (not an expert weight), or None if there is none."""
    if name in names:
        return name
    legacy = released_name(name, model_type)
    return legacy if legacy in names else None


def released_name(name: str, model_type: str) -> str:
    """The name stock `save_pretrained` gives module parameter `name` (other than expert weights)."""
    native, match = _native_names(model_type), _LAYER.match(name)
    if native and native.per_expert_router and match and match.group(2) == native.router:
        return f"{match.group(1)}.{native.per_expert_router}"
    return name


def expert_pieces(module: str, num_experts: int, names: Collection[str], model_type: str) -> list[ExpertPiece]:
    """The checkpoint tensors holding experts module `module`'s `gate_up_proj` and `down_proj` (not biases)."""
    if all(f"{module}.{p}" in names for p in EXPERT_PARAMS):
        return [ExpertPiece(f"{module}.{p}", p) for p in EXPERT_PARAMS]
    for layout in ("per-expert", "saved-fused"):
        pieces = _native_pieces(module, num_experts, model_type, layout)
        if pieces and all(piece.name in names for piece in pieces):
            return pieces
    raise MoeifyError(f"no expert weights for {module} in the checkpoint (neither fused nor per expert).")


def released_expert_pieces(module: str, num_experts: int, model_type: str) -> list[ExpertPiece]:
    """The tensors stock `save_pretrained` writes for experts module `module`: per expert for Mixtral and Qwen-MoE,
    GraniteMoe's own fused names, module names (fused) for any other class."""
    for layout in ("per-expert", "saved-fused"):
        pieces = _native_pieces(module, num_experts, model_type, layout)
        if pieces:
            return pieces
    return [ExpertPiece(f"{module}.{p}", p) for p in EXPERT_PARAMS]


def _native_pieces(module: str, num_experts: int, model_type: str, layout: str) -> list[ExpertPiece]:
    native, match = _native_names(model_type), _LAYER.match(module)
    if native is None or match is None or f"{match.group(2)}.gate_up_proj" != native.fused["gate_up"]:
        return []
    layer = match.group(1)
    if layout == "saved-fused" and native.saved_fused:
        return [ExpertPiece(f"{layer}.{native.saved_fused[p.removesuffix('_proj')]}", p) for p in EXPERT_PARAMS]
    if layout == "per-expert" and native.per_expert:
        roles = [("gate", "gate_up_proj", 0), ("up", "gate_up_proj", 1), ("down", "down_proj", None)]
        pieces = []
        for e in range(num_experts):
            for role, param, half in roles:
                pieces.append(ExpertPiece(f"{layer}.{native.per_expert[role].format(e=e)}", param, e, half))
        return pieces
    return []


def read_expert(
    pieces: list[ExpertPiece], param: str, expert: int, shape: tuple[int, int], dtype: torch.dtype, reader: Checkpoint
) -> torch.Tensor:
    """One expert's matrix `(out, in)` of `param`, read from its pieces straight into one buffer."""
    out = torch.empty(shape, dtype=dtype)
    for piece in pieces:
        if piece.param != param or piece.expert not in (None, expert):
            continue
        reader.read_into(piece.name, out[piece.rows(shape[0])], index=expert if piece.expert is None else None)
    return out
