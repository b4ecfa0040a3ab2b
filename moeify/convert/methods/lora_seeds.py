"""`--method lora-experts --lora-expert ADAPTER`: seed each expert's LoRA delta from a LoRA adapter of the dense model.

Expert e of a lora-experts MoE is the shared FFN plus `scale * B_e A_e` on `gate_up` and on `down`
(`MoeifyExpertDeltas`, rank R, `scale = alpha / R`). A peft LoRA adapter of the dense model holds, per layer, LoRA
on `gate_proj`, `up_proj` and `down_proj` (or a fused `gate_up_proj`), each `s_p B_p A_p` with its own rank r_p and
scale s_p. Expert e then reproduces that fine-tune's FFN exactly:

- `gate_up`: A_e stacks `[A_gate; A_up]` in its first r_gate + r_up rows and B_e is block-diagonal,
  `[[B_gate, 0], [0, B_up]] * (s_p / scale)`, so `scale * B_e A_e = [s_g B_g A_g; s_u B_u A_u]`;
- `down`: A_e's first r_down rows are A_down, B_e's first columns `B_down * (s_d / scale)` (times 1/2 beside shared
  experts, where the routed experts' down projection is halved);
- the remaining rows of A_e keep their fresh random values with zero B columns: free capacity for training.

R must be at least r_gate + r_up and r_down. Only the FFN's LoRA is used; an adapter's attention LoRA cannot live
in an expert and is reported as ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ...errors import MoeifyError

_ROLES = ("gate", "up", "gate_up", "down")


class _Lora:
    """One LoRA target: `scale * B @ A`, A `(r, in)`, B `(out, r)`."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        self.lora_a, self.lora_b, self.scale = lora_a.float(), lora_b.float(), scale

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


class LoraExpertSeeds:
    """The FFN LoRA of up to E adapters, placed as the first experts' deltas (expert e from adapter e)."""

    def __init__(
        self,
        adapters: list[Path],
        ffn_names: Callable[[int], dict[str, str]],
        rank: int,
        alpha: float,
        down_scale: float,
        log: Callable[[str], None],
    ) -> None:
        self.rank, self.scale, self.down_scale = rank, alpha / rank, down_scale
        self.ffn_names = ffn_names
        self.adapters = [_read(path, log) for path in adapters]

    def __len__(self) -> int:
        return len(self.adapters)

    def _targets(self, expert: int, layer: int) -> dict[str, _Lora]:
        """Role (gate, up, gate_up, down) -> the LoRA of adapter `expert` on that FFN matrix of `layer`."""
        modules = {role: name.removesuffix(".weight") for role, name in self.ffn_names(layer).items() if role in _ROLES}
        return {role: self.adapters[expert][m] for role, m in modules.items() if m in self.adapters[expert]}

    def seed(self, layer: int, projection: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Write the adapters' factors into the layer's fresh `(E * R, in)` A and zero `(out, E * R)` B, in place."""
        E, R = lora_a.shape[0] // self.rank, self.rank  # noqa: N806
        a_view = lora_a.view(E, R, -1)
        for expert in range(len(self.adapters)):
            targets = self._targets(expert, layer)
            if projection == "gate_up":
                parts = [targets["gate_up"]] if "gate_up" in targets else []
                if "gate" in targets or "up" in targets:
                    parts = [targets.get("gate"), targets.get("up")]  # type: ignore[list-item]
                out_half = lora_b.shape[0] // 2
            else:
                parts, out_half = [targets.get("down")], 0
            row = 0
            for index, lora in enumerate(parts):
                if lora is None:
                    continue
                if row + lora.rank > R:
                    raise MoeifyError(
                        f"--lora-expert {expert + 1}: layer {layer}'s {projection} LoRA needs rank "
                        f"{sum(p.rank for p in parts if p is not None)} in one expert; raise --expert-lora-rank to at "
                        f"least that (it is {R})."
                    )
                factor = lora.scale / self.scale * (self.down_scale if projection == "down" else 1.0)
                rows = slice(index * out_half, index * out_half + lora.lora_b.shape[0])
                if lora.lora_a.shape[1] != a_view.shape[2] or rows.stop > lora_b.shape[0]:
                    raise MoeifyError(
                        f"--lora-expert {expert + 1}: its LoRA on layer {layer}'s {projection} has shapes "
                        f"{tuple(lora.lora_a.shape)} / {tuple(lora.lora_b.shape)}, which do not fit this model's FFN; "
                        "was it trained on another base?"
                    )
                a_view[expert, row : row + lora.rank] = lora.lora_a.to(lora_a.dtype)
                # B's column of (expert e, rank row j) is j * E + e (peft's target_parameters layout).
                columns = torch.arange(row, row + lora.rank) * E + expert
                lora_b[rows, columns] = (lora.lora_b * factor).to(lora_b.dtype)
                row += lora.rank


def _read(path: Path, log: Callable[[str], None]) -> dict[str, _Lora]:
    """Module name (`model.layers.0.mlp.gate_proj`) -> its LoRA, for every LoRA target of a peft adapter folder."""
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise MoeifyError(f"--lora-expert {path}: no adapter_config.json (give a peft LoRA adapter folder).")
    config = json.loads(config_file.read_text())
    from peft.utils.other import get_pattern_key

    from ...io.peft_adapter import lora_adapter_tensors

    unsupported = ("use_dora", "lora_bias", "fan_in_fan_out", "target_parameters")
    tensors = lora_adapter_tensors(path, config, "--lora-expert", unsupported)

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out: dict[str, _Lora] = {}
    for key, lora_a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        rank = lora_a.shape[0]
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out[module] = _Lora(lora_a, tensors[f"{module}.lora_B.weight"], scale)
        if ranks and rank != ranks.get(get_pattern_key(ranks.keys(), module), config["r"]):
            raise MoeifyError(f"--lora-expert {path}: {key} has rank {rank}, not the one its config gives.")
    ffn = [m for m in out if m.rpartition(".")[2] in {f"{r}_proj" for r in _ROLES}]
    if not ffn:
        raise MoeifyError(
            f"--lora-expert {path} has no LoRA on the FFN (gate_proj / up_proj / down_proj), so it cannot seed an "
            "expert."
        )
    ignored = sorted({m.rpartition(".")[2] for m in out} - {m.rpartition(".")[2] for m in ffn})
    if ignored:
        log(f"moeify: --lora-expert {path}: its LoRA on {', '.join(ignored)} is not used (an expert holds FFN LoRA).")
    return out
