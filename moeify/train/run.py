"""`moeify train RECIPE`: the recipe's model loaded for k-bit LoRA training, trained by transformers' `Trainer`.

moeify adds the MoE-specific parts only: the model from `load_for_training` (4-bit experts, per-expert LoRA,
routers trained in full precision) and the chunked loss (`causal_lm_loss`); the loop, checkpoints, logging and
resumption are `Trainer`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ..errors import MoeifyError
from ..io.dtypes import DTYPES
from .loss import IGNORE_INDEX, causal_lm_loss, causal_lm_loss_terms
from .recipe import LoraRecipe, Recipe, checkpointing_argument, trainer_settings, wants_checkpointing

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


class MoeTrainer(Trainer):
    """`Trainer` whose loss is `causal_lm_loss_terms` (the model's own loss, without the full float32 logits).

    Gradient accumulation and several processes weigh every predicted token alike, as one batch would: the token
    term of each micro-batch is divided by the predicted tokens of the whole accumulated batch over all processes
    (`num_items_in_batch`, counted in `get_batch_samples`), and its router losses (per-batch means, like Mixtral's
    and Megatron's) by the accumulation steps. A non-finite loss on any process stops every process at the next
    optimizer step (`check_finite_loss`), before the update reaches the weights.
    """

    z_loss_coef = 0.0  # the recipe's moe.z_loss_coef
    router_warmup_steps = 0  # the recipe's moe.router_warmup_steps (see `warmup.py`)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # compute_loss normalises by num_items_in_batch itself: Trainer must pass it and must not divide by the
        # accumulation steps again. transformers 5.16 decides both from this attribute alone (later releases also
        # read `loss_is_scaled_for_ga`, whose default follows it), so this is the setting every release honours.
        self.model_accepts_loss_kwargs = True
        self._batch_loss: torch.Tensor | None = None  # on the device: read once per optimizer step
        self.add_callback(_FiniteLossCheck(self))
        for printer, concise in ((ProgressCallback, _ConciseProgress), (PrinterCallback, _ConcisePrinter)):
            if self.pop_callback(printer) is not None:
                self.add_callback(concise)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One micro-batch's forward and backward; during the router warm-up, the gradients of every trained
        parameter but the routers' are dropped (the model's parameters are read here, after accelerate has wrapped
        or sharded it)."""
        loss = super().training_step(*args, **kwargs)
        if self.state.global_step < self.router_warmup_steps:
            from .warmup import warmup_split

            for param in warmup_split(self.model)[1]:
                param.grad = None
        return loss

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and their predicted tokens (labels after the shift that are not
        -100), summed over processes; Trainer's own count depends on how it classifies the model's loss."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches or "labels" not in batches[0]:
            return batches, None
        count = sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches).to(device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation needs only the loss here (no `compute_metrics`): the chunked loss, never the full logits."""
        if self.compute_metrics is not None and not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = causal_lm_loss(
                model,
                inputs["input_ids"],
                inputs.get("labels"),
                inputs.get("attention_mask"),
                z_loss_coef=self.z_loss_coef,
            )
        return loss.detach(), None, None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        from ..inspect.router_stats import RouterStats

        with RouterStats(self.model) as self.router_stats:
            return super().train(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs get the routers' health since the last log: mean load CV, busiest expert's share and
        entropy over MoE layers, and each layer's load CV (`router/load_cv/L<index>`)."""
        stats = getattr(self, "router_stats", None)
        if stats is not None and "loss" in logs:
            logs = {**logs, **{k: round(v, 4) for k, v in stats.summary().items()}}
            for index, layer in enumerate(stats.layers()):
                logs[f"router/load_cv/L{index}"] = round(layer.load_cv, 4)
            stats.reset()
        super().log(logs, *args, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if return_outputs:  # evaluation that wants the logits too
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        terms = causal_lm_loss_terms(
            model, inputs["input_ids"], inputs.get("labels"), inputs.get("attention_mask"), z_loss_coef=self.z_loss_coef
        )
        mean = terms.mean()
        if not model.training:
            return mean
        # The first non-finite loss since the last optimizer step is kept on the device, read once per step.
        previous, batch_loss = self._batch_loss, mean.detach()
        self._batch_loss = (
            batch_loss if previous is None else torch.where(torch.isfinite(previous), batch_loss, previous)
        )
        if num_items_in_batch is None:
            return mean  # Trainer divides it by the accumulation steps
        # Each process's gradients are averaged over processes (DDP, FSDP): scaling by their number makes the
        # average the token-weighted mean over all of them.
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        # An accumulated batch without a predicted token (all -100) contributes nothing rather than 0 / 0.
        loss = terms.token_loss_sum * processes / torch.as_tensor(num_items_in_batch).clamp(min=1)
        return loss + terms.router_loss / self.current_gradient_accumulation_steps

    def check_finite_loss(self) -> None:
        """Raise on every process if any process met a non-finite loss since the last optimizer step, naming the
        step and the last complete checkpoint; one host read and one all-reduce of a flag per optimizer step."""
        if self._batch_loss is None:
            return
        local = self._batch_loss
        self._batch_loss = None
        bad = (~torch.isfinite(local)).to(torch.int32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            return
        value = float(local) if not torch.isfinite(local) else "not finite on another process"
        last = complete_checkpoints(self.args.output_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved before it"
        raise MoeifyError(
            f"the training loss is {value} at step {self.state.global_step + 1}; {where}. Lower "
            "training.learning_rate, or check the data of that step."
        )


class _Concise:
    """The console shows the mean router figures; the per-layer ones (`router/load_cv/L3`) are for `report_to`
    integrations and `trainer_state.json`, which get every key."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if logs is not None:
            logs = {k: v for k, v in logs.items() if not (k.startswith("router/") and "/L" in k)}
        return super().on_log(args, state, control, logs=logs, **kwargs)  # type: ignore[misc]


class _ConciseProgress(_Concise, ProgressCallback):
    pass


class _ConcisePrinter(_Concise, PrinterCallback):
    pass


class _FiniteLossCheck(TrainerCallback):
    """Runs `MoeTrainer.check_finite_loss` before each optimizer step, where every process arrives together."""

    def __init__(self, trainer: MoeTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.check_finite_loss()


def train(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe; returns the final metrics (also written to `output.dir/train_results.json`)."""
    from transformers import AutoTokenizer, TrainingArguments, default_data_collator, set_seed

    from ..data.text import build_datasets

    seed = int(recipe.training.get("seed", 42))
    set_seed(seed)
    settings = {**trainer_settings(recipe), checkpointing_argument(): False}  # load_model enables it, non-reentrant
    args = TrainingArguments(output_dir=recipe.output.dir, **settings)
    # One process upcycles or downloads (on each node where nodes do not share output.dir); the others wait for it.
    with args.main_process_first(local=args.save_on_each_node, desc="upcycling / fetching the model"):
        path = _model_folder(recipe)
    model = load_model(recipe, path, device=args.device)  # this process's device (its GPU under DDP)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _set_router_losses(base, recipe)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_set, eval_set = build_datasets(recipe.data, tokenizer)
    trainer = MoeTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        processing_class=tokenizer,  # saved beside the adapter / model
    )
    trainer.z_loss_coef = recipe.moe.z_loss_coef
    if recipe.moe.router_warmup_steps:
        from .warmup import warmup_split

        if not warmup_split(model)[0]:
            raise MoeifyError(
                "moe.router_warmup_steps: the model has no trained router (a dense model, or lora.train_router is "
                "false); set it to 0."
            )
        trainer.router_warmup_steps = recipe.moe.router_warmup_steps
    from .balancing import BiasBalancingCallback, balanced_routers

    if balanced_routers(model):
        trainer.add_callback(BiasBalancingCallback())
    result = trainer.train(resume_from_checkpoint=_resume_point(recipe))
    metrics = dict(result.metrics)
    if eval_set is not None:
        metrics.update(_final_evaluation(trainer))
    trainer.save_model(recipe.output.dir)  # the PeftModel: adapter_config.json + adapter_model.safetensors
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return metrics
    out = Path(recipe.output.dir)
    (out / "train_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "recipe.yaml").write_text(_recipe_yaml(recipe))
    router = {k: v for k, v in _last_logged(trainer).items() if k.startswith("router/") and "/L" not in k}
    _model_card(recipe, recipe.model.path or path, metrics, router).save(out / "README.md")  # the Hub id, if one
    if recipe.output.merge:
        from ..merge import merge

        merge(path, out, out / "merged", overwrite=True, progress=False)
    if recipe.output.push_to_hub:
        from ..io.hub import push_to_hub

        push_to_hub(out, recipe.output.push_to_hub, ignore_patterns=["checkpoint-*", "merged/*", "upcycled/*"])
    return metrics


def load_model(recipe: Recipe, path: str, device: torch.device | None = None) -> torch.nn.Module:
    """The model to train, as the recipe stores and adapts it.

    - 4-bit experts + LoRA: `load_for_training` (experts quantized while loading, onto `device`, per-expert LoRA in
      the dispatch). The other cases load on the CPU and the Trainer moves them.
    - full-precision experts + LoRA: `from_pretrained` (linears 4-bit through `BitsAndBytesConfig` if asked), the
      experts frozen in place (`ExpertsFrozen`) with per-expert LoRA inside the grouped dispatch; the adapter is in
      peft's `target_parameters` layout, which stock peft loads (peft's own LoRA there forms `W + delta` for every
      expert every forward: see benchmarks/moe_block.py).
    - `lora: null`: every weight trains (full fine-tuning), as float32 master weights (the forward runs under
      autocast in the compute dtype).

    What trains is float32 (`upcast_trainable`), what is frozen stays in the compute dtype.
    - a dense model (no experts; the baseline an upcycled MoE is compared with): LoRA through peft, where the
      `experts` target means the FFN's linears (`mlp.*`), at `expert_r` / `expert_alpha`.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..quant import ExpertLoraConfig, ExpertQuantization, add_expert_lora, freeze_experts, load_for_training
    from ..quant.config import ROUTER_MODULES
    from ..quant.dispatch import fused_experts
    from ..quant.loading import (
        _default_targets,
        apply_router_settings,
        enable_checkpointing,
        freeze_unreachable,
        linear_quantization_config,
        upcast_trainable,
    )

    q, lora = recipe.quantization, recipe.lora
    dtype = DTYPES[q.compute_dtype]
    checkpointing = wants_checkpointing(recipe)
    linear = None if q.linear == "none" else linear_quantization_config(q.linear, dtype, q.double_quant)
    if lora is not None and "attention" not in lora.targets:
        raise MoeifyError("lora.targets without `attention` is not built yet; keep attention in the targets.")
    shared = "frozen" if lora is None or "shared_experts" not in lora.targets else "lora"
    lora_experts = bool(getattr(_read_config(path), "expert_lora_rank", 0))
    if lora_experts and q.experts != "none":
        raise MoeifyError(
            "this is a lora-experts model (`moeify convert --method lora-experts`): its experts share one "
            "full-precision FFN per layer and train their own LoRA deltas; set quantization.experts: none."
        )
    if lora is not None and q.experts != "none":
        if "experts" not in lora.targets:
            raise MoeifyError(
                "4-bit experts are frozen: keep `experts` in lora.targets, or set quantization.experts: none."
            )
        return load_for_training(
            path,
            quantization=ExpertQuantization(quant_type=q.experts, blocksize=q.blocksize, double_quant=q.double_quant),
            lora=ExpertLoraConfig(r=lora.expert_r or lora.r, alpha=_expert_alpha(lora), dropout=lora.dropout),
            attention_lora=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout),  # default targets
            dtype=dtype,
            gradient_checkpointing=checkpointing,
            train_router=lora.train_router,
            linear_quantization=linear,
            shared_experts=shared,
            router=recipe.moe.router_settings(),
            device=device,
        )
    config = AutoConfig.from_pretrained(path)
    apply_router_settings(config, recipe.moe.router_settings())
    # Full fine-tuning trains every weight: loaded in float32 (master weights), not rounded to the compute dtype.
    stored = torch.float32 if lora is None else dtype
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=stored, quantization_config=linear)
    dense = not any(name.rpartition(".")[2] == "experts" for name, _ in model.named_modules())
    if checkpointing:
        enable_checkpointing(model)
    if lora is None:
        if not dense:  # default "moeify": transformers' grouped_mm off the CPU; on it, the same GEMMs, less allocation
            model.set_experts_implementation(recipe.moe.experts_implementation)
        freeze_unreachable(model)
        return model  # every other parameter trains, in float32 as loaded
    modules = _default_targets(model, shared)
    targets: list[str] = []
    if dense:  # the FFN is what upcycling turns into experts: peft LoRA on its linears
        ffn = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear) and _in_ffn(n)}
        targets = sorted(ffn) if "experts" in lora.targets else []
    expert_lora = "experts" in lora.targets and not dense and bool(fused_experts(model))
    if expert_lora:
        freeze_experts(model)  # before peft wraps the model: the experts keep their names and tensors
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    to_save = [m for m in ROUTER_MODULES if m in present] if lora.train_router and not dense else []
    if lora_experts and "experts" in lora.targets:
        # The experts' LoRA deltas are the model's own parameters (`MoeifyExpertDeltas`): they train whole, saved in
        # the adapter as `modules_to_save`, while the FFN they share stays frozen.
        to_save.append("deltas")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=[*modules, *targets] if dense else modules,
        modules_to_save=to_save or None,
        rank_pattern=dict.fromkeys(targets, lora.expert_r or lora.r),
        alpha_pattern=dict.fromkeys(targets, _expert_alpha(lora)),
    )
    peft_model = get_peft_model(model, config)
    if expert_lora:  # per-expert LoRA in the grouped dispatch, saved in peft's target_parameters layout
        add_expert_lora(
            peft_model, ExpertLoraConfig(r=lora.expert_r or lora.r, alpha=_expert_alpha(lora), dropout=lora.dropout)
        )
    freeze_unreachable(peft_model)
    upcast_trainable(peft_model)
    return peft_model


def _read_config(path: str) -> Any:
    """The config of a folder (a `save_4bit` checkpoint's too) or a Hub id."""
    from transformers import AutoConfig

    from ..quant.loading import read_config

    return read_config(Path(path))[0] if Path(path).is_dir() else AutoConfig.from_pretrained(path)


def _expert_alpha(lora: LoraRecipe) -> float:
    return lora.alpha if lora.expert_alpha is None else lora.expert_alpha


def _in_ffn(name: str) -> bool:
    """A dense decoder layer's FFN linear (`model.layers.0.mlp.down_proj`)."""
    return name.rpartition(".")[0].rpartition(".")[2] == "mlp"


def _model_folder(recipe: Recipe) -> str:
    """The local folder of the model to train: `model.path` (a Hub id is fetched), or `model.source` upcycled with
    `model.convert` into `output.dir/upcycled` (reused when it is there)."""
    from ..convert.converter import convert
    from ..convert.options import ConvertOptions
    from ..io.source import resolve_source

    if recipe.model.path is not None:
        try:
            return str(resolve_source(recipe.model.path))
        except MoeifyError as err:
            raise MoeifyError(f"model.path: {err}") from None
    out = Path(recipe.output.dir) / "upcycled"
    if not (out / "config.json").exists():
        convert(str(recipe.model.source), out, ConvertOptions(**recipe.model.convert))
    return str(out)


def _final_evaluation(trainer: Trainer) -> dict[str, float]:
    """The held-out metrics of the trained model: those of the Trainer's own evaluation when `eval_steps` already
    ran one at the last step (the same weights: a second pass would only double its cost), else a new one."""
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last["step"] == trainer.state.global_step:
        return {key: value for key, value in last.items() if key.startswith("eval_")}
    return trainer.evaluate()


def _last_logged(trainer: Trainer) -> dict[str, float]:
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logged[-1] if logged else {}


def _model_card(recipe: Recipe, base: str, metrics: dict[str, Any], router: dict[str, float]):  # noqa: ANN202
    """The run's model card: the base, the recipe, the final losses and the routers' health."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base, library_name="peft", pipeline_tag="text-generation", tags=["moe", "moeify", "lora"]
    )
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, int | float))
    health = "\n".join(f"| {k} | {v:.4g} |" for k, v in router.items())
    return ModelCard(
        f"""---
{data.to_yaml()}
---

# LoRA adapter trained with `moeify train`

Base: `{base}` (4-bit {recipe.quantization.experts} experts while training). Load it with peft onto the
full-precision base, or fold it in with `moeify merge {base} THIS_FOLDER -o OUT`.

| metric | value |
|---|---|
{rows}

Router health at the last logging step (mean over MoE layers):

| statistic | value |
|---|---|
{health}

## Recipe

```yaml
{_recipe_yaml(recipe)}```
"""
    )


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders of `output_dir` that were written to the end, oldest first.

    `Trainer` writes a checkpoint in place and its `trainer_state.json` last: a checkpoint counts as complete when
    that file parses and says step N, so one half-written when a run was killed is never resumed from.
    """
    complete = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        try:
            step = int(folder.name.removeprefix("checkpoint-"))
            state = json.loads((folder / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        if state.get("global_step") == step:
            complete.append((step, folder))
    return [folder for _, folder in sorted(complete)]


def _resume_point(recipe: Recipe) -> str | None:
    """`training.resume_from_checkpoint`: a folder, or `true` for the newest complete checkpoint of `output.dir`."""
    value = recipe.training.get("resume_from_checkpoint")
    if value is True:
        complete = complete_checkpoints(recipe.output.dir)
        if not complete:
            raise MoeifyError(f"training.resume_from_checkpoint: no complete checkpoint in {recipe.output.dir}.")
        return str(complete[-1])
    return value or None


def _set_router_losses(model: torch.nn.Module, recipe: Recipe) -> None:
    """The load-balancing loss and the z-loss enter the training loss with the recipe's weights (`moe.*_coef`)."""
    coef = recipe.moe.aux_loss_coef
    if isinstance(getattr(model.config, "router", None), dict):  # moeify's model: set while loading (load_model)
        return
    model.config.output_router_logits = coef > 0
    model.config.router_aux_loss_coef = coef
    if hasattr(model, "router_aux_loss_coef"):  # the stock classes copy it when built
        model.router_aux_loss_coef = coef


def _recipe_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
