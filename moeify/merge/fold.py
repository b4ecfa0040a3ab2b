"""`moeify merge`: fold a LoRA adapter (peft format) into a model's full-precision weights, tensor by tensor.

The adapter is what `load_for_training` trains and stock peft loads: LoRA on linear modules (`lora_A` `(r, in)`,
`lora_B` `(out, r)`), per-expert LoRA in peft's `target_parameters` layout (`lora_A` `(E * r, in)`, `lora_B`
`(out, E * r)`, expert e's factors `A.view(E, r, in)[e]` and `B.view(out, r, E)[..., e]`), and full copies of
`modules_to_save` (the routers). The base is a full-precision checkpoint (the merge keeps its names, layout and
dtype) or a 4-bit one written by `save_4bit` (experts are dequantized, so the merge equals what was trained, and
written in the layout stock `save_pretrained` writes for the class: per expert for Mixtral and Qwen-MoE).

Why not peft's `merge_and_unload`: it needs the whole model in memory (an 8B Llama upcycled to 8 experts is about
90 GB in bf16) and cannot merge into 4-bit experts. Here one checkpoint tensor (one expert of one) is read,
merged in float32 and written at a time, through the same streaming writer as `convert`, into OUT atomically.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..errors import MoeifyError
from ..io.atomic import atomic_output, check_output_folder
from ..io.dtypes import DTYPES
from ..io.peft_adapter import adapter_folder
from ..io.writer import parse_max_shard_size, write_safetensors
from .check import logit_difference
from .plan import Plan, plan_merge

_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "README.md")


@dataclass
class MergeResult:
    """What `merge` wrote."""

    output: Path
    base: str
    adapter: str
    from_4bit: str | None  # the experts' 4-bit settings when dequantized from a 4-bit base
    targets: int
    replaced: int
    seconds: float
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The report printed at the end of a merge."""
        source = f"experts dequantized from 4-bit ({self.from_4bit})" if self.from_4bit else "full-precision base"
        lines = [
            f"Wrote {self.output} in {self.seconds:.1f}s: {self.adapter} merged into {self.base} ({source}); "
            f"{self.targets} LoRA targets merged, {self.replaced} trained modules copied."
        ]
        if self.max_abs_diff is not None:
            lines.append(
                f"max |logit difference| merged vs adapter model: {self.max_abs_diff:.3e} "
                f"({self.max_rel_diff:.2e} of the largest logit), float32, on the verify prompts"
            )
        return "\n".join(lines)


def merge(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    check: bool = True,
    max_shard_size: str = "5GB",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge the LoRA adapter at `adapter` into the model at `base`, writing a full-precision model to `out`.

    Args:
        base: the model the adapter was trained on: a full-precision MoE folder or Hub id, or a 4-bit checkpoint
            written by `moeify.quant.save_4bit` (its experts are dequantized: the merge equals the trained model).
        adapter: a peft LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
        out: output folder, written atomically; the base's own format (native classes stay native).
        dtype: dtype of the floating tensors written (`auto`: the base's).
        overwrite: replace a non-empty `out`.
        check: load the merged model and the adapter model in float32 and report the max |logit difference| on
            the verify prompts (needs both in memory; skip for models that do not fit).
        max_shard_size: largest output shard.

    Raises:
        MoeifyError: bad input (an adapter for another base, an existing `out`, ...); nothing is written.
    """

    from ..io.source import resolve_source

    started = time.perf_counter()
    say = log or (lambda message: print(message, file=sys.stderr))
    out_path = Path(out).expanduser().absolute()
    check_output_folder(out_path, overwrite)
    max_shard = parse_max_shard_size(max_shard_size)
    if dtype not in DTYPES:
        raise MoeifyError(f"--dtype must be one of {', '.join(DTYPES)} (got '{dtype}').")
    base_folder = resolve_source(str(base), progress=progress)
    adapter_dir = adapter_folder(adapter)
    if base_folder.resolve() == out_path.resolve() or adapter_dir.resolve() == out_path.resolve():
        raise MoeifyError(f"OUT {out_path} is the base or the adapter folder; choose a new folder.")
    plan = plan_merge(base_folder, adapter_dir, None if dtype == "auto" else DTYPES[dtype])
    say(f"moeify: merging {len(plan.loras)} LoRA targets and {len(plan.replaced)} trained modules into {base}.")

    max_diff = rel_diff = None
    with atomic_output(out_path) as tmp:
        write_safetensors(plan.specs, tmp, max_shard, progress)
        _write_metadata(plan, base_folder, tmp)
        if check:
            max_diff, rel_diff = logit_difference(tmp, base_folder, adapter_dir, plan)
        _write_card(plan, base, adapter, tmp, max_diff)
    return MergeResult(
        output=out_path,
        base=str(base),
        adapter=str(adapter),
        from_4bit=plan.from_4bit,
        targets=len(plan.loras),
        replaced=len(plan.replaced),
        seconds=time.perf_counter() - started,
        max_abs_diff=max_diff,
        max_rel_diff=rel_diff,
    )


def _write_metadata(plan: Plan, base: Path, folder: Path) -> None:
    """Config (without the 4-bit quantization_config), and every other non-weight file of the base."""
    for path in sorted(base.iterdir()):
        if path.is_file() and not any(path.match(pattern) for pattern in _WEIGHT_FILES) and path.name != "config.json":
            shutil.copy2(path, folder / path.name)
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    config.update(plan.config_updates)
    if "moeify_model_type" in config:  # a save_4bit checkpoint's: the real model type (and remote code) again
        config["model_type"] = config.pop("moeify_model_type")
        if "moeify_auto_map" in config:
            config["auto_map"] = config.pop("moeify_auto_map")
    if plan.specs:
        floating = {spec.dtype for spec in plan.specs if spec.dtype.is_floating_point}
        if len(floating) == 1:
            config["dtype"] = str(floating.pop()).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_card(plan: Plan, base: str | Path, adapter: str | Path, folder: Path, max_diff: float | None) -> None:
    """The base's model card (if any) with a section recording the merged adapter."""
    card_path = Path(str(base)) / "README.md"
    empty = f"---\n{ModelCardData(library_name='transformers', pipeline_tag='text-generation').to_yaml()}\n---\n"
    # A save_4bit folder's README describes the 4-bit checkpoint, not the model: start a new card then.
    card = ModelCard.load(card_path) if card_path.exists() and not plan.from_4bit else ModelCard(empty)
    experts = sorted({p for p, lora in plan.loras.items() if lora.num_experts})
    others = sorted({p for p, lora in plan.loras.items() if not lora.num_experts})
    expert_ranks = sorted(
        {lora.lora_A.shape[0] // lora.num_experts for lora in plan.loras.values() if lora.num_experts}
    )
    other_ranks = sorted({lora.lora_A.shape[0] for lora in plan.loras.values() if not lora.num_experts})
    ranks = ", ".join(
        f"{what} rank {'/'.join(map(str, values))}"
        for what, values in (("expert", expert_ranks), ("other", other_ranks))
        if values
    )
    source = (
        f"its experts dequantized from the 4-bit base ({plan.from_4bit}), so the weights equal the trained model's"
        if plan.from_4bit
        else "the full-precision base weights"
    )
    check = (
        f"\nmax |logit difference| against the adapter model (float32, verify prompts): {max_diff:.3e}\n"
        if max_diff is not None
        else "\n(logits not compared: merged with --no-check)\n"
    )
    card.text += f"""
## Merged LoRA adapter

`moeify merge` merged the LoRA adapter `{adapter}` (peft {plan.adapter_config.get("peft_version", "")} format;
{ranks}) into `{base}`, on {source}.

| merged | count |
|---|---|
| LoRA on expert weights (per expert) | {len(experts)} |
| LoRA on other linear weights | {len(others)} |
| trained modules copied (routers) | {len(plan.replaced)} |
{check}"""
    tags = list(card.data.tags or [])
    card.data.tags = [*tags, *(t for t in ("moeify", "lora-merged") if t not in tags)]
    card.save(folder / "README.md")
