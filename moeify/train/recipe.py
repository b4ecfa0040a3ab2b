"""Training recipes: a YAML file checked against one typed, documented schema before any model is loaded.

```yaml
model: {path: out/gemma-3-270m-moe}          # or {source: DENSE, convert: {num_experts: 8, top_k: 2}}
quantization: {experts: nf4, linear: nf4, compute_dtype: bfloat16}   # each: nf4 | fp4 | none
lora: {r: 16, alpha: 32, dropout: 0.0, targets: [attention, experts, shared_experts], train_router: true}
data: {path: corpus.jsonl, text_field: text, max_length: 512, eval_fraction: 0.05}
training: {per_device_train_batch_size: 2, max_steps: 200, learning_rate: 2.0e-4, seed: 0, logging_steps: 10}
moe: {aux_loss_coef: 0.001, z_loss_coef: 0.0}
output: {dir: runs/demo, merge: false, push_to_hub: null}
```

`training` takes transformers' `TrainingArguments` names as they are. Every other section is a dataclass below;
each field's `doc` is what `moeify train --print-defaults` prints. Errors name the key, what was expected and, for
a misspelled key, the nearest valid one. The checks are written here rather than with a schema library so that a
recipe error reads like the rest of moeify's errors and costs no extra dependency.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.text import DataRecipe
from ..errors import MoeifyError

Precision = Literal["nf4", "fp4", "none"]
LoraTarget = Literal["attention", "experts", "shared_experts"]
ExpertsImplementation = Literal["moeify", "moeify_grouped", "grouped_mm", "batched_mm", "eager"]


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class ModelRecipe:
    """The model to fine-tune."""

    path: str | None = _doc("a converted MoE: folder or Hub id (or give `source` to upcycle first)", default=None)
    source: str | None = _doc("a dense model to upcycle first: folder, Hub id or .gguf", default=None)
    convert: dict[str, Any] = _doc(
        "`moeify convert` settings for `source` (num_experts, top_k, ...)", default_factory=dict
    )


@dataclass
class QuantizationRecipe:
    """How the frozen base is stored while training."""

    experts: Precision = _doc("routed experts: nf4 | fp4 (bitsandbytes 4-bit) | none (compute dtype)", default="nf4")
    linear: Precision = _doc("attention and other linear layers: nf4 | fp4 | none", default="none")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = _doc(
        "dtype of the frozen weights and of the computation (bfloat16: autocast, trained weights float32; float16 "
        "is refused)",
        default="bfloat16",
    )
    double_quant: bool = _doc("quantize the 4-bit scales too", default=True)
    blocksize: int = _doc("weights per 4-bit scale (experts)", default=64)


@dataclass
class LoraRecipe:
    """LoRA adapters (`lora: null` trains every weight instead)."""

    r: int = _doc("rank", default=16)
    alpha: float = _doc("scale numerator: scale = alpha / r", default=32.0)
    dropout: float = _doc("LoRA input dropout (experts': not saved, peft's expert LoRA has none)", default=0.0)
    targets: list[LoraTarget] = _doc(
        "what gets LoRA: attention, experts, shared_experts",
        default_factory=lambda: ["attention", "experts", "shared_experts"],
    )
    expert_r: int | None = _doc("rank of the experts' LoRA (default: r); a dense model's FFN counts", default=None)
    expert_alpha: float | None = _doc("scale numerator of the experts' LoRA (default: alpha)", default=None)
    train_router: bool = _doc("train the routers in full precision (saved with the adapter)", default=True)


@dataclass
class MoeRecipe:
    """Router losses and balancing while training (the router's structure is set by `moeify convert`)."""

    aux_loss_coef: float = _doc("weight of the load-balancing loss", default=0.001)
    z_loss_coef: float = _doc("weight of the router z-loss", default=0.0)
    jitter: float | None = _doc(
        "multiply router inputs by U(1-j, 1+j) while training (moeify format); null = the model's setting",
        default=None,
    )
    capacity_factor: float | None = _doc(
        "drop each expert's assignments beyond capacity_factor * k * tokens / E while training (moeify format); "
        "0 = dropless, null = the model's setting",
        default=None,
    )
    bias_update_rate: float | None = _doc(
        "aux-loss-free balancing step size (moeify format; the model must have been converted with "
        "--bias-update-rate, which creates the bias); null = the model's setting",
        default=None,
    )
    router_warmup_steps: int = _doc(
        "for the first N optimizer steps only the routers train (every other trained weight waits), so routing "
        "settles on the upcycled experts before they change",
        default=0,
    )
    experts_implementation: ExpertsImplementation = _doc(
        "how the experts run in full fine-tuning (lora: null), transformers' experts_implementation: moeify "
        "(transformers' grouped_mm off the CPU) | moeify_grouped (one grouped autograd function, any device) | "
        "grouped_mm | batched_mm | eager",
        default="moeify",
    )

    def router_settings(self) -> dict[str, float | None]:
        """The keys of moeify's `config.router` section this recipe sets (unset keys keep the model's)."""
        settings: dict[str, float | None] = {"aux_loss_coef": self.aux_loss_coef, "z_loss_coef": self.z_loss_coef}
        if self.jitter is not None:
            settings["jitter"] = self.jitter
        if self.capacity_factor is not None:
            settings["capacity_factor"] = self.capacity_factor or None
        if self.bias_update_rate is not None:
            settings["bias_update_rate"] = self.bias_update_rate
        return settings


@dataclass
class OutputRecipe:
    """Where results go."""

    dir: str = _doc("run folder: adapter, checkpoints, train_results.json", default="runs/moeify")
    merge: bool = _doc("also write a merged full-precision model (moeify merge) to DIR/merged", default=False)
    push_to_hub: str | None = _doc("Hub repository to upload the result to", default=None)


@dataclass
class Recipe:
    """A whole training run."""

    model: ModelRecipe = _doc("the model to fine-tune", default_factory=ModelRecipe)
    quantization: QuantizationRecipe = _doc("storage of the frozen base", default_factory=QuantizationRecipe)
    lora: LoraRecipe | None = _doc("LoRA settings; null for full fine-tuning", default_factory=LoraRecipe)
    data: DataRecipe = _doc("training text", default_factory=DataRecipe)
    training: dict[str, Any] = _doc(
        "transformers TrainingArguments, by their own names",
        default_factory=lambda: {
            "per_device_train_batch_size": 2,
            "max_steps": 200,
            "learning_rate": 2.0e-4,
            "seed": 0,
            "logging_steps": 10,
        },
    )
    moe: MoeRecipe = _doc("MoE losses", default_factory=MoeRecipe)
    output: OutputRecipe = _doc("outputs", default_factory=OutputRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides (values parsed as YAML), and check it."""
    raw: Any = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise MoeifyError(f"recipe {file} does not exist.")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise MoeifyError(f"recipe {file} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise MoeifyError("a recipe is a mapping of sections (model, quantization, lora, data, training, moe, output).")
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise MoeifyError(f"override '{override}' is not KEY=VALUE (e.g. training.learning_rate=1e-4).")
        _set(raw, key.split("."), yaml.safe_load(value) if value else None)
    recipe = _build(Recipe, raw, "")
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: Recipe) -> None:
    """Checks across fields, and the `training` section against transformers' `TrainingArguments`."""
    if (recipe.model.path is None) == (recipe.model.source is None):
        raise MoeifyError("model: give exactly one of `path` (a converted MoE) or `source` (a dense model to upcycle).")
    if recipe.model.source is not None:
        from ..convert.options import ConvertOptions

        valid = [f.name for f in dataclasses.fields(ConvertOptions)]
        for key in recipe.model.convert:
            if key not in valid or key in ("overwrite",):
                raise MoeifyError(f"model.convert.{key}: not a `moeify convert` setting{_suggest(key, valid)}.")
    elif recipe.model.convert:
        raise MoeifyError("model.convert: only used with model.source (a dense model to upcycle).")
    from ..io.source import is_hub_id

    for key in ("path", "source"):
        value = getattr(recipe.model, key)
        if value is not None and not Path(value).expanduser().exists() and not is_hub_id(value):
            raise MoeifyError(
                f"model.{key} '{value}' is neither a local folder nor a Hub id (org/name or org/name@revision)."
            )
    if recipe.quantization.compute_dtype == "float16" or recipe.training.get("fp16"):
        raise MoeifyError(
            "float16 training (quantization.compute_dtype: float16, training.fp16) is not supported: its gradients "
            "need loss scaling, which moeify does not validate. Use compute_dtype: bfloat16 (CPUs, and GPUs from "
            "Ampere / SM80 on) or float32 (older GPUs such as T4 or V100)."
        )
    if recipe.quantization.compute_dtype == "bfloat16" and recipe.training.get("bf16") is False:
        raise MoeifyError(
            "training.bf16: false with quantization.compute_dtype: bfloat16: the trained weights are float32 and meet "
            "the bfloat16 ones under autocast, which training.bf16 turns on. Remove training.bf16, or set "
            "compute_dtype: float32."
        )
    if not recipe.data.path:
        raise MoeifyError("data.path: missing; give a Hub dataset id or a local text/json/jsonl/parquet/csv file.")
    if not 0.0 <= recipe.data.eval_fraction < 1.0:
        raise MoeifyError(f"data.eval_fraction: must be in [0, 1), got {recipe.data.eval_fraction}.")
    if recipe.moe.router_warmup_steps < 0:
        raise MoeifyError(f"moe.router_warmup_steps: must be 0 or more, got {recipe.moe.router_warmup_steps}.")
    if recipe.data.eval_blocks is not None and recipe.data.eval_blocks < 1:
        raise MoeifyError(f"data.eval_blocks: must be at least 1 (or null for all), got {recipe.data.eval_blocks}.")
    if recipe.lora is None and (recipe.quantization.experts, recipe.quantization.linear) != ("none", "none"):
        raise MoeifyError("lora: null (full fine-tuning) needs quantization.experts and .linear set to none.")
    if recipe.lora is not None and recipe.moe.experts_implementation != "moeify":
        raise MoeifyError(
            "moe.experts_implementation: applies to full fine-tuning (lora: null); with LoRA the frozen experts run "
            "moeify's own dispatch. Remove it, or set lora: null."
        )
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    for key, value in recipe.training.items():
        if key not in names and key not in CHECKPOINTING_KEYS:  # either name on any version (trainer_settings)
            raise MoeifyError(f"training.{key}: not a TrainingArguments field{_suggest(key, names)}.")
        if key == "output_dir":
            raise MoeifyError("training.output_dir: set output.dir instead.")
        if key == "resume_from_checkpoint":
            hint = bool | str | None  # true: the last one
        else:  # a checkpointing key may be the other version's name, which `hints` lacks
            hint = bool if key in CHECKPOINTING_KEYS else hints.get(key, Any)
        recipe.training[key] = value = _coerce(value, hint)
        _check_type(value, hint, f"training.{key}")
    try:  # what only TrainingArguments itself checks (enum values, combinations)
        TrainingArguments(output_dir=recipe.output.dir, **trainer_settings(recipe))
    except (ValueError, TypeError) as err:
        settings = trainer_settings(recipe)
        culprit = next((key for key in settings if _fails(TrainingArguments, key, settings[key])), None)
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise MoeifyError(f"training.{culprit}: {first}" if culprit else f"training: {first}") from None


# The recipe's `training` keys for activation checkpointing: transformers 5.25 renamed `gradient_checkpointing`.
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")


def wants_checkpointing(recipe: Recipe) -> bool:
    """Whether the recipe trains with activation checkpointing (either key; on by default)."""
    values = [recipe.training[key] for key in CHECKPOINTING_KEYS if recipe.training.get(key) is not None]
    return bool(values[0]) if values else True


def checkpointing_argument() -> str:
    """`TrainingArguments`' name for activation checkpointing in the installed transformers."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def trainer_settings(recipe: Recipe) -> dict[str, Any]:
    """`training` as `TrainingArguments` keywords (`resume_from_checkpoint` is `Trainer.train`'s, not theirs).

    On a machine without an accelerator `use_cpu` defaults to true, so a recipe written for GPUs (`bf16: true`)
    validates and runs there instead of failing on transformers' hardware check. `compute_dtype: bfloat16` turns
    on `bf16` (autocast). The evaluation batch defaults to the training batch.
    """
    import torch

    settings = {k: v for k, v in recipe.training.items() if k not in ("resume_from_checkpoint", *CHECKPOINTING_KEYS)}
    if any(key in recipe.training for key in CHECKPOINTING_KEYS):
        settings[checkpointing_argument()] = wants_checkpointing(recipe)
    if torch.accelerator.current_accelerator() is None:
        settings.setdefault("use_cpu", True)
    # Evaluation batches as large as the training ones (transformers' default is 8 whatever the training batch):
    # without gradients they then never need more memory than a training step did.
    if "per_device_train_batch_size" in settings:
        settings.setdefault("per_device_eval_batch_size", settings["per_device_train_batch_size"])
    if recipe.quantization.compute_dtype == "bfloat16":
        # Frozen weights are stored in bfloat16 and trained ones are float32 masters (`upcast_trainable`): the
        # forward runs under bfloat16 autocast, where each product takes both.
        settings["bf16"] = True
    return settings


def _fails(arguments: type, key: str, value: Any) -> bool:
    try:
        arguments(output_dir="unused", **{key: value})
    except (ValueError, TypeError):
        return True
    return False


def defaults_yaml() -> str:
    """The whole schema with its defaults, one comment per field (`moeify train --print-defaults`)."""
    lines = ["# moeify train recipe: every key, its default and what it means"]
    for top in dataclasses.fields(Recipe):
        lines.append(f"\n# {top.metadata['doc']}")
        default = getattr(Recipe(), top.name)
        if top.name == "training":
            lines.append("training:  # any transformers TrainingArguments field, by its own name")
            lines += [f"  {k}: {_yaml_value(v)}" for k, v in default.items()]
            continue
        lines.append(f"{top.name}:")
        for sub in dataclasses.fields(default):
            lines.append(f"  {sub.name}: {_yaml_value(getattr(default, sub.name))}  # {sub.metadata['doc']}")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _set(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise MoeifyError(f"override {'.'.join(keys)}: {key} is not a section.")
        node = child
    node[keys[-1]] = value


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f": did you mean `{close[0]}`?" if close else f" (valid: {', '.join(valid)})" if len(valid) <= 12 else ""


def _build(cls: type, raw: Any, where: str) -> Any:
    """An instance of dataclass `cls` from mapping `raw`, every key and type checked."""
    if not isinstance(raw, dict):
        raise MoeifyError(f"{where or 'recipe'}: expected a mapping of {cls.__name__} keys, got {_kind(raw)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            prefix = f"{where}." if where else ""
            raise MoeifyError(f"`{prefix}{key}`: unknown key{_suggest(str(key), list(fields))}.")
    values = {}
    for name, value in raw.items():
        path = f"{where}.{name}" if where else name
        values[name] = _convert(value, hints[name], path)
    return cls(**values)


def _convert(value: Any, hint: Any, where: str) -> Any:
    options = _union(hint)
    dataclass_types = [t for t in options if dataclasses.is_dataclass(t)]
    if dataclass_types and isinstance(value, dict):
        return _build(dataclass_types[0], value, where)
    if value is None and type(None) in options:
        return None
    value = _coerce(value, hint)
    _check_type(value, hint, where)
    return float(value) if float in options and isinstance(value, int) and not isinstance(value, bool) else value


def _coerce(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string: take it as the number a float field means."""
    options = _union(hint)
    if isinstance(value, str) and float in options and str not in options:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Raise a `MoeifyError` naming the expected type when `value` does not fit `hint`."""
    if not _fits(value, hint):
        raise MoeifyError(f"{where}: expected {_describe(hint)}, got {_kind(value)} {value!r}.")


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        if issubclass(hint, str) and hasattr(hint, "__members__"):  # a str Enum (TrainingArguments): its values
            return value in {member.value for member in hint} or isinstance(value, hint)
        return isinstance(value, hint) or (hint is str and isinstance(value, str))
    return True  # annotations this checker does not model are left to the consumer


def _union(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, str) and hasattr(hint, "__members__"):
        return "one of " + ", ".join(str(member.value) for member in hint)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)
