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
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import MoeifyError
from ..formats.layouts import (
    EXPERT_PARAMS,
    ExpertPiece,
    checkpoint_name,
    expert_pieces,
    released_expert_pieces,
    released_name,
)
from ..io.atomic import atomic_output, check_output_folder
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.dtypes import DTYPES
from ..io.peft_adapter import adapter_folder, lora_adapter_tensors
from ..io.writer import TensorSpec, parse_max_shard_size, write_safetensors

_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "README.md")


@dataclass
class _Lora:
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
    plan = _plan(base_folder, adapter_dir, None if dtype == "auto" else DTYPES[dtype])
    say(f"moeify: merging {len(plan.loras)} LoRA targets and {len(plan.replaced)} trained modules into {base}.")

    max_diff = rel_diff = None
    with atomic_output(out_path) as tmp:
        write_safetensors(plan.specs, tmp, max_shard, progress)
        _write_metadata(plan, base_folder, tmp)
        if check:
            max_diff, rel_diff = _logit_difference(tmp, base_folder, adapter_dir, plan)
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


@dataclass
class _Plan:
    config: dict
    model_type: str
    loras: dict[str, _Lora]  # module parameter -> its LoRA
    replaced: dict[str, torch.Tensor]  # module parameter -> trained value (modules_to_save)
    specs: list[TensorSpec]
    from_4bit: str | None
    adapter_config: dict
    config_updates: dict = field(default_factory=dict)  # written over the base's config.json


def _plan(base: Path, adapter: Path, dtype: torch.dtype | None) -> _Plan:
    """Check the adapter against the base (on the meta device) and list every output tensor with its producer."""
    from ..quant.loading import read_config

    config, quantization = read_config(base)
    from_4bit = f"{quantization.quant_type}, blocksize {quantization.blocksize}" if quantization else None
    if getattr(config, "quantization_config", None) is not None:
        method = _quant_method(config.quantization_config)
        raise MoeifyError(f"{base} is quantized ({method}); merge into a full-precision base.")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    # lora-experts (MixLoRA): one FFN shared by the experts plus their LoRA deltas, merged into full experts.
    lora_experts = {
        name for name, module in model.named_modules() if name.endswith(".experts") and hasattr(module, "deltas")
    }
    experts = {
        name: module
        for name, module in model.named_modules()
        if name.endswith(".experts")
        and name not in lora_experts
        and all(isinstance(getattr(module, p, None), nn.Parameter) for p in EXPERT_PARAMS)
    }
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    loras, replaced = _read_adapter(adapter, adapter_config, params, experts)

    reader = open_checkpoint(base)
    names = set(reader)
    model_type = config.model_type
    specs: list[TensorSpec] = []
    if quantization is None:
        pieces = {
            piece.name: piece
            for module in experts
            for piece in expert_pieces(module, params[f"{module}.gate_up_proj"].shape[0], names, model_type)
        }
        owners = {
            piece.name: module
            for module in experts
            for piece in expert_pieces(module, params[f"{module}.gate_up_proj"].shape[0], names, model_type)
        }
        targets = _linear_targets(loras, replaced, names, model_type, base)
        for name in reader:
            out_dtype = _out_dtype(reader.dtype(name), dtype)
            owner = next((m for m in lora_experts if name.startswith(f"{m}.")), None)
            if owner is not None:
                if ".deltas." not in name:  # the deltas are folded into the experts
                    specs.append(_lora_experts_spec(name, out_dtype, reader, owner, replaced, config))
            elif name in pieces:
                lora = loras.get(f"{owners[name]}.{pieces[name].param}")
                specs.append(_expert_spec(name, out_dtype, reader, pieces[name], lora))
            else:
                specs.append(_module_spec(name, out_dtype, reader, *targets.get(name, (None, None))))
    else:
        specs = _specs_from_4bit(reader, model, experts, loras, replaced, quantization, dtype, base)
    updates = {"expert_lora_rank": 0, "expert_lora_alpha": None} if lora_experts else {}
    return _Plan(config.to_dict(), model_type, loras, replaced, specs, from_4bit, adapter_config, updates)


def _quant_method(quantization: object) -> str:
    if isinstance(quantization, dict):
        return str(quantization.get("quant_method", "unknown"))
    return str(getattr(quantization, "quant_method", "unknown"))


def _read_adapter(
    adapter: Path, config: dict, params: dict[str, nn.Parameter], experts: dict[str, nn.Module]
) -> tuple[dict[str, _Lora], dict[str, torch.Tensor]]:
    """The adapter's LoRA targets and trained modules, checked against the base's parameter shapes."""
    unsupported = ("use_dora", "lora_bias", "fan_in_fan_out", "layer_replication", "trainable_token_indices")
    tensors = lora_adapter_tensors(adapter, config, "moeify merge", unsupported)
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets_of = {
        module: [
            p
            for target in config.get("target_parameters") or []
            for p in EXPERT_PARAMS
            if _ends(f"{module}.{p}", target)
        ]
        for module in experts
    }
    loras: dict[str, _Lora] = {}
    replaced: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        depth = 0
        while module.endswith(".base_layer"):  # peft nests one wrapper per target parameter of a module
            module, depth = module.removesuffix(".base_layer"), depth + 1
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise MoeifyError(f"{adapter} has {key} without its lora_B.")
        lora_a, lora_b = tensors[key], tensors[b_key]
        used |= {key, b_key}
        if module in experts:
            order = targets_of[module]
            if depth >= len(order):
                raise MoeifyError(f"{adapter}: {key} does not match the adapter's target_parameters {order}.")
            param = f"{module}.{order[len(order) - 1 - depth]}"
            shape = params[param].shape
            num_experts, out_dim, in_dim = shape
            if lora_a.shape[0] % num_experts or lora_a.shape[1] != in_dim or lora_b.shape != (out_dim, lora_a.shape[0]):
                _mismatch(adapter, key, lora_a, lora_b, param, shape)
            rank, current = lora_a.shape[0] // num_experts, param
        elif f"{module}.weight" in params and depth == 0:
            param = f"{module}.weight"
            shape = params[param].shape
            if len(shape) != 2 or lora_a.shape[1] != shape[1] or lora_b.shape != (shape[0], lora_a.shape[0]):
                _mismatch(adapter, key, lora_a, lora_b, param, shape)
            rank, current, num_experts = lora_a.shape[0], module, 0
        else:
            raise MoeifyError(
                f"the adapter does not fit this base: it has LoRA for {module}, which the base does not have "
                "(was it trained on another model?)."
            )
        expected = rank_pattern.get(get_pattern_key(rank_pattern.keys(), current), config["r"])
        if expected != rank:
            experts_note = f" for the base's {num_experts} experts" if num_experts else ""
            raise MoeifyError(
                f"the adapter does not fit this base: {key} has {lora_a.shape[0]} rows, rank {rank}{experts_note}, "
                f"but the adapter was saved with rank {expected} (was {adapter} trained on another model?)."
            )
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), current), config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        loras[param] = _Lora(lora_a, lora_b, scale, num_experts)
    for key, value in tensors.items():  # modules_to_save: the trained copy of a whole module
        if key in used:
            continue
        saved = (
            config.get("modules_to_save") or []
        )  # a saved module's parameters, e.g. `...shared_expert.up_proj.weight`
        if key not in params or not any(f".{m}." in f".{key}" for m in saved):
            raise MoeifyError(
                f"{adapter} holds {key}, which moeify merge cannot place (not LoRA, not a module to save)."
            )
        if value.shape != params[key].shape:
            _mismatch(adapter, key, value, None, key, params[key].shape)
        replaced[key] = value
    if not loras and not replaced:
        raise MoeifyError(f"{adapter} holds no LoRA weights.")
    return loras, replaced


def _ends(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith(f".{suffix}")


def _mismatch(
    adapter: Path, key: str, a: torch.Tensor, b: torch.Tensor | None, param: str, shape: tuple[int, ...]
) -> None:
    got = f"{tuple(a.shape)}" + (f" / lora_B {tuple(b.shape)}" if b is not None else "")
    raise MoeifyError(
        f"the adapter does not fit this base: {key} is {got}, but the base's {param} is {tuple(shape)} "
        f"(was {adapter} trained on another model?)."
    )


def _out_dtype(stored: torch.dtype, override: torch.dtype | None) -> torch.dtype:
    return override if override is not None and stored.is_floating_point else stored


def _linear_targets(
    loras: dict[str, _Lora], replaced: dict[str, torch.Tensor], names: set[str], model_type: str, base: Path
) -> dict[str, tuple[_Lora | None, torch.Tensor | None]]:
    """Checkpoint name -> (LoRA, replacement) of every non-expert parameter the adapter changes."""
    targets: dict[str, tuple[_Lora | None, torch.Tensor | None]] = {}
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


def _module_spec(
    name: str, dtype: torch.dtype, reader: Checkpoint, lora: _Lora | None, value: torch.Tensor | None
) -> TensorSpec:
    def produce() -> Iterator[torch.Tensor]:
        if value is not None:
            yield value
        elif lora is not None:
            yield reader.get(name).float() + lora.delta()
        else:
            yield reader.get(name)

    return TensorSpec(name, dtype, reader.shape(name), produce)


def _expert_spec(
    name: str, dtype: torch.dtype, reader: Checkpoint, piece: ExpertPiece, lora: _Lora | None
) -> TensorSpec:
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


def _lora_experts_spec(
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


def _specs_from_4bit(
    reader: Checkpoint,
    model: nn.Module,
    experts: dict[str, nn.Module],
    loras: dict[str, _Lora],
    replaced: dict[str, torch.Tensor],
    quantization: object,
    dtype: torch.dtype | None,
    base: Path,
) -> list[TensorSpec]:
    """Output tensors of a merge into a `save_4bit` checkpoint: experts dequantized, in the class's released layout."""
    from ..quant.experts_4bit import Experts4bit

    names = set(reader)
    model_type = model.config.model_type
    targets = _linear_targets(loras, replaced, names, model_type, base)
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
        spec = _module_spec(name, _out_dtype(reader.dtype(name), dtype), reader, lora, value)
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
            spec = _module_spec(f"{module}.{projection}_bias", compute, reader, None, None)
            specs.append(TensorSpec(f"{module}.{projection}_proj_bias", compute, spec.shape, spec.produce))
    return specs


def _write_metadata(plan: _Plan, base: Path, folder: Path) -> None:
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


def _write_card(plan: _Plan, base: str | Path, adapter: str | Path, folder: Path, max_diff: float | None) -> None:
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


@torch.no_grad()
def _logit_difference(merged: Path, base: Path, adapter: Path, plan: _Plan) -> tuple[float, float]:
    """Max |logit difference| (absolute, and relative to the largest logit) of the merged model vs the adapter
    model, both in float32, on the verify prompts."""
    from ..inspect.verify import PROMPTS, load_tokenizer

    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    adapter_model = _adapter_model(base, adapter, plan).eval()
    try:
        tokenizer = load_tokenizer(merged, base, adapter)
        tokenizer.padding_side = "right"
        batch = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))
        mask = batch["attention_mask"].bool()
    except MoeifyError:  # no tokenizer: fixed token ids
        vocab = merged_model.config.get_text_config().vocab_size
        ids = torch.arange(48).reshape(3, 16) * 7919 % vocab
        batch, mask = {"input_ids": ids}, torch.ones_like(ids, dtype=torch.bool)
    expected = adapter_model(**batch).logits.float()[mask]
    got = merged_model(**batch).logits.float()[mask]
    diff = float((expected - got).abs().max())
    return diff, diff / float(expected.abs().max())


def _adapter_model(base: Path, adapter: Path, plan: _Plan) -> nn.Module:
    """The model the adapter was trained as: the 4-bit base + LoRA (moeify), or stock peft on the base."""
    from peft import PeftModel

    if plan.from_4bit is None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter)
    from ..quant import load_with_adapter

    return load_with_adapter(base, adapter, dtype=torch.float32)
