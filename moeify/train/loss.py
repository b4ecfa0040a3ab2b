"""Next-token loss of a causal LM computed in chunks of tokens, so the `(tokens, vocab)` logits never exist at once.

A causal LM's forward with labels builds the logits of every token (bf16), casts them to float32, and keeps the
log-softmax for backward: with a 32k vocabulary and 1024 tokens that is about 0.4 GiB, more than the 4-bit
experts of a small MoE. Here the decoder runs as usual (LoRA, gradient checkpointing and all), then the LM head and
the cross-entropy run on chunks of tokens under activation checkpointing: each chunk's logits are
recomputed in backward instead of kept, so the peak holds one chunk's logits. The result equals
`model(input_ids, labels=labels).loss` (same shift, same ignore index -100, mean over the predicted tokens).

Why by hand: transformers computes the loss from full logits, and the fused kernels that avoid them (Liger's fused
linear cross-entropy, Apple's Cut Cross-Entropy) are CUDA/Triton only; this is the same idea in plain PyTorch,
for any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_BYTES = 32 << 20  # float32 logits of one chunk


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (a transformers causal LM, or a peft model around one).

    `labels` default to `input_ids`; positions labelled -100 are not predicted. `chunk_tokens` defaults to the
    tokens whose float32 logits fill `CHUNK_BYTES` (256 tokens for a 32k vocabulary). Models whose forward adds an
    auxiliary loss (`output_router_logits=True`) or transforms logits in a way this function does not know fall
    back to `model(..., labels=labels).loss`.
    """
    labels = input_ids if labels is None else labels
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    head = base.get_output_embeddings()
    if getattr(config, "output_router_logits", False) or not isinstance(head, nn.Linear) or head.bias is not None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    softcap = getattr(config, "final_logit_softcapping", None)
    scaling = getattr(config, "logits_scaling", None)  # GraniteMoe divides its logits by this
    chunk_tokens = chunk_tokens or max(1, CHUNK_BYTES // (4 * head.weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(
            _chunk_loss, hidden[start:end], targets[start:end], head.weight, softcap, scaling, use_reentrant=False
        )
    return total / max(len(targets), 1)


def _chunk_loss(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, softcap: float | None, scaling: float | None
) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    if scaling:
        logits = logits / scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum")
