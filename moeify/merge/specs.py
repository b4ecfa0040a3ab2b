"""The merged tensors, produced lazily for the streaming writer: `W + s B A` per linear module, per expert (each
expert's factors from peft's `target_parameters` layout), the lora-experts deltas, and 4-bit experts dequantized
into the class's released layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MoeifyError
from ..formats.layouts import (
    ExpertPiece,
    checkpoint_name,
    released_expert_pieces,
    released_name,
)
from ..io.checkpoint import Checkpoint
from ..io.writer import TensorSpec


@dataclass
class Lora:
    """One adapter target: `delta = scale * B @ A`, per expert when `num_experts` > 0."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    num_experts: int = 0

    def delta(self, expert: int | None = None) -> torch.Tensor:
        """The float32 update of the weight `(out, in)` (of one expert)."""
        a, b = self.lora_A.float(), self.lora_B.float()
        if expert is not None:
            r = a.shape[0] // self.num_experts
            a = a.view(self.num_experts, r, -1)[expert]
            b = b.view(b.shape[0], r, self.num_experts)[:, :, expert]
        return self.scale * (b @ a)


def output_dtype(stored: torch.dtype, override: torch.dtype | None) -> torch.dtype:
    return override if override is not None and stored.is_floating_point else stored


def linear_targets(
    loras: dict[str, Lora], replaced: dict[str, torch.Tensor], names: set[str], model_type: str, base: Path
) -> dict[str, tuple[Lora | None, torch.Tensor | None]]:
    """Checkpoint name -> (LoRA, replacement) of every non-expert parameter the adapter changes."""
    targets: dict[str, tuple[Lora | None, torch.Tensor | None]] = {}
    for param, lora in loras.items():
        if lora.num_experts:
            continue
        name = checkpoint_name(param, names, model_type)
        if name is None:
            raise MoeifyError(f"{base} has no tensor for {param}, which the adapter changes.")
        targets[name] = (lora, None)
    for param, value in replaced.items():
        name = checkpoint_name(param, names, model_type)
        if name is None:
            raise MoeifyError(f"{base} has no tensor for {param}, which the adapter replaces.")
        targets[name] = (None, value)
    return targets


def module_spec(
    name: str, dtype: torch.dtype, reader: Checkpoint, lora: Lora | None, value: torch.Tensor | None
) -> TensorSpec:
    def produce() -> Iterator[torch.Tensor]:
        if value is not None:
            yield value
        elif lora is not None:
            yield reader.get(name).float() + lora.delta()
        else:
            yield reader.get(name)

    return TensorSpec(name, dtype, reader.shape(name), produce)


def expert_spec(name: str, dtype: torch.dtype, reader: Checkpoint, piece: ExpertPiece, lora: Lora | None) -> TensorSpec:
    def produce() -> Iterator[torch.Tensor]:
        weight = reader.get(name)
        if lora is None:
            yield weight
            return
        for expert in range(weight.shape[0]) if piece.expert is None else [piece.expert]:
            matrix = weight[expert] if piece.expert is None else weight
            delta = lora.delta(expert)
            yield matrix.float() + delta[piece.rows(delta.shape[0])]

    return TensorSpec(name, dtype, reader.shape(name), produce)


def lora_experts_spec(
    name: str, dtype: torch.dtype, reader: Checkpoint, owner: str, replaced: dict[str, torch.Tensor], config: Any
) -> TensorSpec:
    """A lora-experts module's shared tensor `name` as full experts: expert e's weight `W + scale * B_e A_e` (the
    adapter's trained deltas, else the base's), one expert at a time; a bias repeats per expert."""
    E, rank = config.num_experts, config.expert_lora_rank  # noqa: N806
    scale = config.expert_lora_alpha / rank
    projection = name.rpartition(".")[2].removesuffix("_proj")

    def factor(which: str) -> torch.Tensor:
        key = f"{owner}.deltas.{projection}_lora_{which}"
        return (replaced[key] if key in replaced else reader.get(key)).float()

    def produce() -> Iterator[torch.Tensor]:
        weight = reader.get(name)
        if name.endswith("_bias"):
            yield from [weight] * E
            return
        weight = weight.float()  # once, not per expert
        a = factor("A").view(E, rank, -1)
        b = factor("B").view(-1, rank, E)
        for e in range(E):
            yield weight + scale * b[..., e] @ a[e]

    return TensorSpec(name, dtype, (E, *reader.shape(name)), produce)


def specs_from_4bit(
    reader: Checkpoint,
    model: nn.Module,
    experts: dict[str, nn.Module],
    loras: dict[str, Lora],
    replaced: dict[str, torch.Tensor],
    quantization: object,
    dtype: torch.dtype | None,
    base: Path,
) -> list[TensorSpec]:
    """Output tensors of a merge into a `save_4bit` checkpoint: experts dequantized, in the class's released layout."""
    from ..quant.experts_4bit import Experts4bit

    names = set(reader)
    model_type = model.config.model_type
    targets = linear_targets(loras, replaced, names, model_type, base)
    compute = dtype or model.config.dtype or torch.bfloat16
    specs: list[TensorSpec] = []
    cache: dict[str, Experts4bit] = {}

    def dequantized(module: str) -> Experts4bit:
        if module not in cache:  # one layer's 4-bit experts at a time
            cache.clear()
            quantized = Experts4bit.like(experts[module], quantization)  # type: ignore[arg-type]
            with torch.no_grad():
                for key, tensor in quantized.state_dict().items():
                    tensor.copy_(reader.get(f"{module}.{key}").view(tensor.dtype).view(tensor.shape))
            cache[module] = quantized
        return cache[module]

    def expert_spec(module: str, piece: ExpertPiece, shape: tuple[int, ...]) -> TensorSpec:
        def produce() -> Iterator[torch.Tensor]:
            quantized, lora = dequantized(module), loras.get(f"{module}.{piece.param}")
            projection = piece.param.removesuffix("_proj")
            for expert in range(quantized.num_experts) if piece.expert is None else [piece.expert]:
                matrix = quantized.dequantize(projection, torch.tensor([expert]), torch.float32)[0]
                if lora is not None:
                    matrix = matrix + lora.delta(expert)
                yield matrix[piece.rows(matrix.shape[0])]

        return TensorSpec(piece.name, compute, shape, produce)

    owned = {
        f"{module}.{key}" for module in experts for key in Experts4bit.like(experts[module], quantization).state_dict()
    }
    for name in reader:
        if name in owned:
            module, _, key = name.rpartition(".")
            if key == "gate_up_packed":  # the first tensor of each experts module: write the whole module here
                specs.extend(_released_experts(module, experts[module], model_type, expert_spec, reader, compute))
            continue
        lora, value = targets.get(name, (None, None))
        spec = module_spec(name, output_dtype(reader.dtype(name), dtype), reader, lora, value)
        spec.name = released_name(name, model_type)
        specs.append(spec)
    return specs


def _released_experts(
    module: str,
    full: nn.Module,
    model_type: str,
    expert_spec: Callable[[str, ExpertPiece, tuple[int, ...]], TensorSpec],
    reader: Checkpoint,
    compute: torch.dtype,
) -> list[TensorSpec]:
    num_experts = full.gate_up_proj.shape[0]
    specs = []
    for piece in released_expert_pieces(module, num_experts, model_type):
        shape = tuple(getattr(full, piece.param).shape)
        if piece.expert is not None:
            shape = shape[1:]
            if piece.half is not None:
                shape = (shape[0] // 2, *shape[1:])
        specs.append(expert_spec(module, piece, shape))
    for projection in ("gate_up", "down"):  # expert biases (moeify format, mlp_bias)
        if f"{module}.{projection}_bias" in reader:
            spec = module_spec(f"{module}.{projection}_bias", compute, reader, None, None)
            specs.append(TensorSpec(f"{module}.{projection}_proj_bias", compute, spec.shape, spec.produce))
    return specs
