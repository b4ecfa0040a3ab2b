"""Router statistics: per MoE layer, how many tokens each expert got, how uneven that is, and how sure the router is.

Every router moeify writes or loads (moeify's `MoeifyTopKRouter`, the stock Mixtral, Qwen2-MoE, Qwen3-MoE and
GraniteMoeShared routers) takes the flattened tokens `(tokens, hidden)` and returns `(router_logits (tokens, E),
top_k_weights, top_k_index (tokens, k))`; `RouterStats` hooks them and accumulates, per layer:

- `tokens_per_expert`: how many (token, slot) assignments each expert received;
- `load_cv`: coefficient of variation of that load (std / mean; 0 = perfectly balanced);
- `busiest_share`: the busiest expert's share of all assignments (1/E when balanced);
- `entropy`: mean entropy (nats) of the router's softmax over experts per token (log E = undecided);
- `dropped`: assignments dropped for capacity (moeify's router, training with a capacity factor);
- `null_share`: share of assignments that went to MoE++ zero-computation experts (moeify's router).

Used by `moeify eval` and by the training logs (`RouterStatsCallback`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROUTER_NAMES = ("gate", "router")


@dataclass
class LayerStats:
    """One MoE layer's routing over everything seen."""

    layer: str
    tokens_per_expert: list[int]
    load_cv: float
    busiest_share: float
    entropy: float
    dropped: int = 0
    null_share: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The router modules of `model` by name (peft's `modules_to_save` copies count once, as their wrapper)."""
    found = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ROUTER_NAMES and hasattr(module, "top_k") and hasattr(module, "num_experts"):
            found[name] = module
    if not found:  # peft wraps trained routers: the wrapper holds the active copy
        for name, module in model.named_modules():
            if name.endswith(".modules_to_save.default") and hasattr(module, "top_k"):
                found[name.removesuffix(".modules_to_save.default")] = module
    return found


class RouterStats:
    """Accumulate routing statistics while a model runs: `with RouterStats(model) as stats: model(...)`.

    `stats.mask = attention_mask` before a forward excludes padding (tokens are counted in the order the router
    sees them: the batch flattened). `stats.layers()` gives one `LayerStats` per router.
    """

    def __init__(self, model: nn.Module) -> None:
        self._routers = routers(model)
        self.mask: torch.Tensor | None = None
        # Accumulated on the routers' device and read only by `layers()`: a training step never waits on the host.
        self._counts: dict[str, torch.Tensor] = {}
        self._entropy: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> RouterStats:
        for name, module in self._routers.items():
            self._hooks.append(module.register_forward_hook(self._hook(name, module)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reset(self) -> None:
        self._counts, self._entropy, self._tokens = {}, {}, {}

    def _hook(self, name: str, module: nn.Module):  # noqa: ANN202
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            # Activation checkpointing runs the router again inside backward: that forward was counted already.
            # torch.utils.checkpoint tells the two apart the same way.
            if torch._C._current_graph_task_id() != -1:
                return
            logits, _, index = output
            logits, index = logits.detach().reshape(-1, logits.shape[-1]), index.detach().reshape(len(logits), -1)
            # Padding is weighted 0 rather than selected away: a selection would read its size on the host.
            keep = torch.ones(len(logits), dtype=torch.long, device=logits.device)
            if self.mask is not None and self.mask.numel() == len(logits):
                keep = self.mask.reshape(-1).to(device=logits.device, dtype=torch.long)
            # moeify's router: FFN experts, then null experts, then the index of dropped assignments.
            choices = getattr(module, "num_choices", module.num_experts)
            counts = torch.zeros(choices + 1, dtype=torch.long, device=index.device).scatter_add_(
                0, index.reshape(-1), keep[:, None].expand(index.shape).reshape(-1)
            )
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            entropy = (-(log_probs.exp() * log_probs).sum(dim=-1) * keep).sum()
            tokens = keep.sum()
            for store, value in ((self._counts, counts), (self._entropy, entropy), (self._tokens, tokens)):
                store[name] = store[name] + value if name in store else value

        return record

    def layers(self) -> list[LayerStats]:
        """Statistics of every router that saw tokens, in model order (named as in the model without peft); reads
        the accumulated figures on the host."""
        result = []
        for name in self._routers:
            if name not in self._counts:
                continue
            shown = name.removeprefix("base_model.model.")
            experts = self._routers[name].num_experts
            choices = getattr(self._routers[name], "num_choices", experts)
            every = self._counts[name].double().cpu()
            slots = float(every.sum())
            counts = every[:experts]
            total = float(counts.sum())
            mean = total / len(counts)
            cv = float(counts.std(unbiased=False)) / mean if mean else 0.0
            result.append(
                LayerStats(
                    layer=shown,
                    tokens_per_expert=[int(c) for c in every[:experts]],
                    load_cv=cv,
                    busiest_share=float(counts.max()) / total if total else 0.0,
                    entropy=float(self._entropy[name]) / max(float(self._tokens[name]), 1.0),
                    dropped=int(every[choices]),
                    null_share=float(every[experts:choices].sum()) / slots if slots else 0.0,
                )
            )
        return result

    def summary(self) -> dict[str, float]:
        """Averages over layers, for logs: `router/load_cv`, `router/busiest_share`, `router/entropy`."""
        layers = self.layers()
        if not layers:
            return {}
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        return {
            "router/load_cv": mean([s.load_cv for s in layers]),
            "router/busiest_share": mean([s.busiest_share for s in layers]),
            "router/entropy": mean([s.entropy for s in layers]),
            "router/dropped": float(sum(s.dropped for s in layers)),
            "router/null_share": mean([s.null_share for s in layers]),
        }


def max_entropy(num_experts: int) -> float:
    """The entropy of a router that cannot decide: log E."""
    return math.log(num_experts)


def format_table(layers: list[dict[str, Any]]) -> str:
    """The per-layer table `moeify route-stats` prints: load CV, busiest share, entropy, drops, null share, and each
    expert's share of the layer's FFN assignments (in %)."""
    lines = [f"{'MoE layer':40}{'load CV':>9}{'busiest':>9}{'entropy':>9}{'dropped':>9}{'null':>7}  expert shares (%)"]
    for layer in layers:
        counts = layer["tokens_per_expert"]
        total = sum(counts) or 1
        shares = " ".join(f"{100 * c / total:4.1f}" for c in counts)
        lines.append(
            f"{layer['layer']:40}{layer['load_cv']:>9.3f}{layer['busiest_share']:>9.1%}{layer['entropy']:>9.3f}"
            f"{layer.get('dropped', 0):>9}{layer.get('null_share', 0.0):>7.1%}  {shares}"
        )
    return "\n".join(lines)


def plot_heatmap(layers: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw each layer's expert shares as a heatmap (rows: MoE layers, columns: experts) to `path` (PNG)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no display backend needed
    except ImportError:
        from ..errors import MoeifyError

        raise MoeifyError("--plot needs matplotlib: pip install matplotlib") from None
    shares = torch.tensor([layer["tokens_per_expert"] for layer in layers], dtype=torch.float64)
    shares = shares / shares.sum(dim=1, keepdim=True).clamp(min=1)
    num_layers, num_experts = shares.shape
    figure = Figure(figsize=(max(4.0, 0.5 * num_experts + 2.5), max(3.0, 0.3 * num_layers + 1.5)), layout="constrained")
    axes = figure.add_subplot()
    uniform = 1.0 / num_experts
    image = axes.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2 * uniform, shares.max()))
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_xticks(range(num_experts))
    names = [_short_layer_name(layer["layer"]) for layer in layers]
    axes.set_yticks(range(num_layers), names, fontsize=7 if num_layers > 24 else 9)
    axes.set_title(f"{title}\nshare of each layer's expert assignments (uniform = {uniform:.3f})", fontsize=9)
    figure.colorbar(image, ax=axes, label="share of assignments")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    return out


def _short_layer_name(name: str) -> str:
    """`model.layers.3.mlp.router` -> `3`."""
    numbers = [part for part in name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else name
