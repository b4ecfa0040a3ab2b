"""Next-token loss of a causal LM computed in chunks of tokens, so the `(tokens, vocab)` logits never exist at once.

A causal LM's forward with labels builds the logits of every token (bf16), casts them to float32, and keeps the
log-softmax for backward: with a 32k vocabulary and 1024 tokens that is about 0.4 GiB, more than the 4-bit
experts of a small MoE. Here the model runs as usual (LoRA, gradient checkpointing, router losses and all) but
computes the logits of one position only, then the LM head and the cross-entropy run on chunks of the decoder's
output under activation checkpointing: each chunk's logits are recomputed in backward instead of kept, so the
peak holds one chunk's logits. The result equals `model(input_ids, labels=labels).loss` (same shift, same ignore
index -100, mean over the predicted tokens, plus the router auxiliary loss).

Why by hand: transformers computes the loss from full logits, and the fused kernels that avoid them (Liger's fused
linear cross-entropy, Apple's Cut Cross-Entropy) are CUDA/Triton only; this is the same idea in plain PyTorch,
for any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.text import IGNORE_INDEX
from ..modeling.router import load_balancing_loss, router_z_loss

CHUNK_BYTES = 32 << 20  # float32 logits of one chunk


class LossTerms(NamedTuple):
    """A batch's loss before its reduction: what gradient accumulation needs to weigh micro-batches by tokens."""

    token_loss_sum: torch.Tensor  # summed next-token cross-entropy (float32)
    predicted_tokens: torch.Tensor  # how many positions were predicted (labels != -100 after the shift)
    router_loss: torch.Tensor  # the weighted router losses of this batch (a per-batch mean, 0 without them)

    def mean(self) -> torch.Tensor:
        """The batch's loss: mean cross-entropy over its predicted tokens plus its router losses."""
        return self.token_loss_sum / self.predicted_tokens.clamp(min=1) + self.router_loss


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    router_loss: bool = True,
    z_loss_coef: float = 0.0,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` plus its router losses: `causal_lm_loss_terms(...).mean()`."""
    return causal_lm_loss_terms(
        model, input_ids, labels, attention_mask, chunk_tokens, router_loss=router_loss, z_loss_coef=z_loss_coef
    ).mean()


def causal_lm_loss_terms(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    router_loss: bool = True,
    z_loss_coef: float = 0.0,
) -> LossTerms:
    """Next-token cross-entropy of `model` (a transformers causal LM, or a peft / DDP / FSDP wrapper of one), summed
    over the predicted tokens, with their count, and its router auxiliary loss when the config asks for one
    (`output_router_logits`, `router_aux_loss_coef`).

    The model's own forward runs (through any wrapper, so distributed engines see it) with `logits_to_keep=1`; the
    decoder's final hidden states are taken with a forward hook, and the LM head and cross-entropy run on chunks of
    them. `labels` default to `input_ids`; positions labelled -100 are not predicted. `chunk_tokens` defaults to
    the tokens whose float32 logits fill `CHUNK_BYTES` (256 tokens for a 32k vocabulary); `router_loss=False` leaves
    the auxiliary loss out (evaluation). Every format has the same router losses, averaged over MoE layers with
    padding excluded: the load-balancing loss of each layer is Switch Transformer's `n * sum_i f_i P_i` (Fedus et al.
    2021; Megatron-Core's per-layer loss), the z-loss ST-MoE's `logsumexp(router_logits)^2` (Zoph et al. 2022).
    moeify's own models compute and weigh theirs by their config's `router` section (`aux_loss_coef`,
    `z_loss_coef`); for the stock classes they are computed here from their routers, with `router_aux_loss_coef`
    (when `output_router_logits` is set; their own Mixtral-style loss, which pools the layers' tokens, is switched
    off) and `z_loss_coef`. A model whose LM head this function does not know (not a bias-free Linear) gets
    `model(..., labels=labels).loss` (its router loss then stays inside the token term).
    """
    labels = input_ids if labels is None else labels
    predicted = (labels[:, 1:] != IGNORE_INDEX).sum()
    base = _unwrap(model)
    config = base.config.get_text_config()
    head = base.get_output_embeddings()
    # DeepSpeed ZeRO-3 keeps the head's weight partitioned outside the head's own forward: use the model's loss.
    partitioned = hasattr(getattr(head, "weight", None), "ds_id")
    if not isinstance(head, nn.Linear) or head.bias is not None or partitioned:
        if z_loss_coef and router_loss:
            from ..errors import MoeifyError

            raise MoeifyError(
                "moe.z_loss_coef: the router z-loss needs moeify's loss, which this model (or DeepSpeed ZeRO-3) "
                "cannot use; set it to 0."
            )
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        return LossTerms(loss.float() * predicted.to(loss.device), predicted.to(loss.device), loss.new_zeros(()))
    captured: list[torch.Tensor] = []
    hooks = [base.get_decoder().register_forward_hook(lambda _m, _i, out: captured.append(out[0]))]
    reports_losses = isinstance(getattr(base.config, "router", None), dict)  # moeify's model weighs its own
    # The stock classes' own aux loss (Mixtral's) pools every layer's tokens into one Switch loss; moeify's
    # definition is the Switch loss of each layer, averaged over layers, computed here from their routers.
    aux_coef = 0.0
    if router_loss and not reports_losses and getattr(base.config, "output_router_logits", False):
        aux_coef = float(getattr(base, "router_aux_loss_coef", getattr(base.config, "router_aux_loss_coef", 0.0)))
    routing: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (router, logits, top-k index) per layer
    if router_loss and not reports_losses and (aux_coef or z_loss_coef):
        from ..inspect.router_stats import routers

        for module in routers(base).values():
            hooks.append(module.register_forward_hook(lambda m, _i, out: routing.append((m, out[0], out[2]))))
    native = {"output_router_logits": False} if aux_coef else {}  # theirs would be computed and thrown away
    try:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, **native)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = captured[-1]
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    # Ignored positions go through the head too (cross_entropy skips them): selecting the others first would read
    # their count on the host, a synchronisation per step on accelerators.
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    softcap = getattr(config, "final_logit_softcapping", None)
    scaling = getattr(config, "logits_scaling", None)  # GraniteMoe divides its logits by this
    chunk_tokens = chunk_tokens or max(1, CHUNK_BYTES // (4 * head.weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(
            _chunk_loss, hidden[start:end], targets[start:end], head.weight, softcap, scaling, use_reentrant=False
        )
    router = total.new_zeros(())
    aux = getattr(outputs, "aux_loss", None)
    if router_loss and reports_losses:
        # moeify's model computes its router losses whenever it trains with non-zero weights (its config's
        # `router` section) and reports them unweighted: weigh them here as its own loss would.
        settings = base.config.router
        if aux is not None:
            router = router + settings["aux_loss_coef"] * aux.to(router.device)
        if getattr(outputs, "z_loss", None) is not None:
            router = router + settings["z_loss_coef"] * outputs.z_loss.to(router.device)
    if routing and aux_coef:
        aux = torch.stack(
            [
                load_balancing_loss(logits, index, m.num_experts, attention_mask=attention_mask)
                for m, logits, index in routing
            ]
        ).mean()
        router = router + aux_coef * aux.to(router.device)
    if routing and z_loss_coef:
        z = torch.stack([router_z_loss(logits, attention_mask) for _, logits, _ in routing]).mean()
        router = router + z_loss_coef * z.to(router.device)
    return LossTerms(total, predicted.to(total.device), router)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / FSDP (`.module`) and peft (`get_base_model`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_loss(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, softcap: float | None, scaling: float | None
) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    if scaling:
        logits = logits / scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)
