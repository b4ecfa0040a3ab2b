"""The merge's own check: the merged model's logits against the base with the adapter applied by peft."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import MoeifyError
from .plan import Plan


@torch.no_grad()
def logit_difference(merged: Path, base: Path, adapter: Path, plan: Plan) -> tuple[float, float]:
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


def _adapter_model(base: Path, adapter: Path, plan: Plan) -> nn.Module:
    """The model the adapter was trained as: the 4-bit base + LoRA (moeify), or stock peft on the base."""
    from peft import PeftModel

    if plan.from_4bit is None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter)
    from ..quant import load_with_adapter

    return load_with_adapter(base, adapter, dtype=torch.float32)
