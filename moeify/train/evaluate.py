"""`moeify eval`: held-out loss and perplexity of a model (optionally with a LoRA adapter), the expert load and
router entropy of every MoE layer, and a dense baseline's loss side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import MoeifyError
from ..io.dtypes import DTYPES

PRECISIONS = ("nf4", "fp4", "none")  # how experts and linear modules are stored, as a recipe's `quantization`


def evaluate(
    model: str,
    data: str,
    *,
    adapter: str | None = None,
    baseline: str | None = None,
    text_field: str = "text",
    max_length: int = 512,
    max_blocks: int = 64,
    batch_size: int = 4,
    dtype: str = "float32",
    held_out: float = 0.0,
    seed: int = 0,
    eval_split: str = "documents",
    experts: str | None = None,
    linear: str | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (+ `adapter`) on the first `max_blocks` packed blocks of `data`; `baseline` on the same.

    With `held_out` > 0 the blocks are those `moeify train` held out with `data.eval_fraction = held_out`,
    `data.eval_seed = seed` and `data.eval_split = eval_split` (the same split), so a trained adapter is measured
    on text it did not see.

    `experts` and `linear` (`"nf4"`, `"fp4"` or `"none"`) say how the model's routed experts and other linear
    modules are stored, as `quantization.experts` / `quantization.linear` of a recipe: 4-bit experts load with
    `load_for_training` (quantized layer by layer, as training loaded them, so evaluating needs no more memory than
    training did) and `dtype` is the compute dtype (autocast). Default (None): as the adapter's run trained (the
    `recipe.yaml` `moeify train` writes beside it), as a `save_4bit` checkpoint stores them, else `"none"`.

    Returns `{"model": {...}, "baseline": {...}}` with `loss` (mean next-token cross-entropy per predicted token),
    `perplexity`, `tokens`, `blocks` and, for MoE models, `layers` (per router: tokens per expert, load CV, the
    busiest expert's share, router entropy) and `router` (their means).
    """
    from transformers import AutoTokenizer

    from ..data.text import DataRecipe, build_datasets
    from ..io.source import resolve_source

    folder = resolve_source(model)
    tokenizer_folder = next(
        (f for f in (folder, Path(adapter) if adapter else None) if f and (f / "tokenizer_config.json").exists()),
        None,
    )
    if tokenizer_folder is None:
        where = f"{folder} or {adapter}" if adapter else str(folder)
        raise MoeifyError(f"no tokenizer in {where} (tokenizer_config.json): copy the source model's tokenizer there.")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    recipe = DataRecipe(
        path=data,
        text_field=text_field,
        max_length=max_length,
        eval_fraction=held_out,
        eval_split=eval_split,  # type: ignore[arg-type]  (checked by the CLI's choices)
        eval_seed=seed,
        eval_blocks=max_blocks if held_out else None,  # the subset a run with data.eval_blocks evaluates
    )
    train_blocks, eval_blocks = build_datasets(recipe, tokenizer)
    blocks = eval_blocks if held_out and eval_blocks is not None else train_blocks
    blocks = blocks.select(range(min(max_blocks, len(blocks))))
    ids = torch.tensor(blocks["input_ids"])
    storage = _storage(folder, adapter, experts, linear)
    autocast = DTYPES.get(dtype) if storage[0] != "none" and dtype != "float32" else None
    result = {"model": _measure(_load(folder, adapter, dtype, *storage), ids, batch_size, autocast)}
    if baseline:
        dense = _load(resolve_source(baseline), None, dtype, "none", "none")
        if dense.config.get_text_config().vocab_size < int(ids.max()) + 1:
            raise MoeifyError(f"--baseline {baseline} has a smaller vocabulary than {model}'s tokenizer.")
        result["baseline"] = _measure(dense, ids, batch_size)
    return result


def _storage(folder: Path, adapter: str | None, experts: str | None, linear: str | None) -> tuple[str, str]:
    """How the experts and the other linear modules are loaded: as asked, else as trained (see `evaluate`)."""
    from ..quant.loading import read_config

    trained: dict[str, Any] = {}
    if adapter is not None and (Path(adapter) / "recipe.yaml").is_file():
        import yaml

        trained = (yaml.safe_load((Path(adapter) / "recipe.yaml").read_text()) or {}).get("quantization") or {}
    saved = read_config(folder)[1]
    experts = experts or trained.get("experts") or (saved.quant_type if saved else "none")
    linear = linear or trained.get("linear") or "none"
    for name, value in (("experts", experts), ("linear", linear)):
        if value not in PRECISIONS:
            raise MoeifyError(f"--{name} must be one of {', '.join(PRECISIONS)} (got '{value}').")
    if saved is not None and experts != saved.quant_type:
        raise MoeifyError(f"{folder} stores its experts in {saved.quant_type}; they cannot be evaluated as {experts}.")
    return experts, linear


def _load(folder: Path, adapter: str | None, dtype: str, experts: str, linear: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if DTYPES.get(dtype) is None:
        raise MoeifyError(f"--dtype must be one of {', '.join(k for k, v in DTYPES.items() if v)} (got '{dtype}').")
    linear_config = None
    if linear != "none":
        from ..quant.loading import linear_quantization_config

        linear_config = linear_quantization_config(linear, DTYPES[dtype])
    if experts != "none":
        from ..quant import ExpertQuantization, load_with_adapter

        quantization = ExpertQuantization(quant_type=experts)  # type: ignore[arg-type]
        return load_with_adapter(folder, adapter, quantization, linear_config, dtype=DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], quantization_config=linear_config)
    if adapter:
        from peft import PeftModel

        from ..io.peft_adapter import adapter_folder

        model = PeftModel.from_pretrained(model, adapter_folder(adapter))
    return model.eval()


@torch.no_grad()
def _measure(
    model: torch.nn.Module, ids: torch.Tensor, batch_size: int, autocast: torch.dtype | None = None
) -> dict[str, Any]:
    """Loss and router statistics of `model` on `ids`; under autocast to `autocast` when given (a 4-bit model keeps
    what LoRA trained in float32 beside frozen weights in the compute dtype, as training ran it)."""
    from ..inspect.router_stats import RouterStats
    from .loss import causal_lm_loss

    total, predicted = 0.0, 0
    device = next(model.parameters()).device.type
    with RouterStats(model) as stats, torch.autocast(device, dtype=autocast or torch.float32, enabled=bool(autocast)):
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            count = batch.shape[0] * (batch.shape[1] - 1)
            total += float(causal_lm_loss(model, batch, router_loss=False)) * count
            predicted += count
    loss = total / max(predicted, 1)
    report: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": predicted,
        "blocks": len(ids),
    }
    layers = stats.layers()
    if layers:
        report["layers"] = [layer.as_dict() for layer in layers]
        report["router"] = stats.summary()
    return report


def format_report(result: dict[str, Any]) -> str:
    """The table `moeify eval` prints."""
    model = result["model"]
    lines = [f"{'':24}{'loss':>10}{'perplexity':>12}{'tokens':>10}"]
    for key in ("model", "baseline"):
        if key in result:
            r = result[key]
            lines.append(f"{key:24}{r['loss']:>10.4f}{r['perplexity']:>12.2f}{r['tokens']:>10}")
    if "baseline" in result:
        lines.append(f"{'model - baseline':24}{model['loss'] - result['baseline']['loss']:>+10.4f}")
    if "layers" in model:
        lines.append("")
        lines.append(f"{'MoE layer':48}{'load CV':>9}{'busiest':>9}{'entropy':>9}  tokens per expert")
        for layer in model["layers"]:
            lines.append(
                f"{layer['layer']:48}{layer['load_cv']:>9.3f}{layer['busiest_share']:>9.1%}{layer['entropy']:>9.3f}"
                f"  {layer['tokens_per_expert']}"
            )
    return "\n".join(lines)
