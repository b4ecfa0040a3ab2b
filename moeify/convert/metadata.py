"""What a conversion writes beside the weights: config, generation config, tokenizer files, remote code for the
moeify format, and the model card.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from ..inspect.model_card import render_model_card, source_license
from ..io.source import TOKENIZER_FILES, is_hub_id
from .plan import ConversionPlan, not_exact, router_summary


def write_metadata(plan: ConversionPlan, folder: Path) -> None:
    """Config (+ modeling code for the moeify format), generation config, tokenizer files, model card."""
    if plan.fmt.name == "moeify":
        with torch.device("meta"):
            meta_model = plan.fmt.model_class(plan.out_config)(plan.out_config)
        custom_object_save(meta_model, folder, config=plan.out_config)  # modeling files + auto_map
        plan.out_config.auto_map["AutoModel"] = "modeling_moeify.MoeifyModel"  # the decoder alone (vLLM)
    plan.out_config.save_pretrained(folder)
    if (plan.local / "generation_config.json").exists():
        shutil.copy2(plan.local / "generation_config.json", folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(plan.dense_config).save_pretrained(folder)
    for file_name in TOKENIZER_FILES:
        if (plan.local / file_name).exists():
            shutil.copy2(plan.local / file_name, folder / file_name)
    options, spec = plan.options, plan.spec
    settings = {
        "experts": options.num_experts,
        "top-k": options.top_k,
        "shared experts": f"{options.shared_experts}"
        + (f" of {options.shared_expert_size} neurons (the FFN's first)" if options.shared_expert_size else ""),
        "MoE layers": f"{len(spec.moe_layers)} of {spec.num_layers} ({options.layers})",
        "upcycling": " + ".join(
            [
                options.method
                + (
                    f" (one shared FFN per layer, per-expert LoRA rank {spec.expert_lora_rank}, alpha "
                    f"{spec.expert_lora_alpha or 2 * spec.expert_lora_rank:g}, B = 0)"
                    if spec.expert_lora_rank
                    else ""
                ),
                *([f"fine-grained, granularity {options.granularity}"] if options.granularity > 1 else []),
                *([f"neuron split ({options.split})"] if options.split else []),
                *([f"experts from {', '.join(options.expert_sources)}"] if options.expert_sources else []),
                *(
                    [f"expert deltas seeded from {', '.join(options.lora_expert_sources)}"]
                    if options.lora_expert_sources
                    else []
                ),
                *(["non-FFN weights averaged"] if options.merge_non_ffn == "average" else []),
                *(f"{name.replace('_', '-')} {settings}" for name, settings in options.expert_transforms().items()),
            ]
        ),
        "router init": f"{options.router_init} (seed {options.seed})"
        + (f", on {options.calibration_tokens} tokens of {options.calibration}" if options.calibration else "")
        + (f", from {Path(options.expert_prompts).name}" if options.expert_prompts else ""),
        **({"router": router_summary(options)} if options.custom_router() else {}),
        "dtype": str(plan.out_config.dtype).replace("torch.", ""),
        "layout": plan.layout,
    }
    card = render_model_card(
        base_model=plan.source.partition("@")[0] if is_hub_id(plan.source) else Path(plan.source).stem,
        license=source_license(plan.local),
        architecture=plan.adapter.display_name,
        output_class=plan.fmt.class_name,
        format_name=plan.fmt.name,
        reason=plan.reason,
        settings=settings,
        params=plan.params,
        not_exact=not_exact(options),
    )
    card.save(folder / "README.md")
