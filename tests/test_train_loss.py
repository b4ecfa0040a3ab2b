"""`causal_lm_loss` equals the model's own loss (and its gradients), chunk by chunk, for every class moeify writes."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteMoeSharedConfig,
    GraniteMoeSharedForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from moeify.train import causal_lm_loss
from moeify.train.loss import causal_lm_loss_terms

SMALL = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
MODELS = {
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
        )
    ),
    "granitemoeshared (logits_scaling)": lambda: GraniteMoeSharedForCausalLM(
        GraniteMoeSharedConfig(
            **SMALL, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32, logits_scaling=4.0
        )
    ),
    "gemma3 (softcapping)": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(**SMALL, head_dim=16, final_logit_softcapping=5.0, sliding_window=4)
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_loss_and_gradients_equal_the_models_own(name: str) -> None:
    torch.manual_seed(0)
    model = get_peft_model(MODELS[name](), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(std=0.1)
    ids = torch.randint(0, 101, (3, 13))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not predicted
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels[2, 9:] = -100

    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_tokens=7)  # several chunks, one partial
    got.backward()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert expected_grads
    for param_name, grad in expected_grads.items():
        param = dict(model.named_parameters())[param_name]
        torch.testing.assert_close(param.grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_the_stock_classes_aux_loss_is_the_switch_loss_of_each_layer_averaged(name: str) -> None:
    """The reference is transformers' own Mixtral loss applied to one layer at a time (it pools all layers' tokens
    when given all of them), with padding excluded; the model's pooled loss is switched off."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    model = MODELS[name]()
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.5
    model.router_aux_loss_coef = 0.5  # the stock classes copy it at construction
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    experts, top_k = model.config.num_experts if name == "qwen2_moe" else 4, 2
    per_layer = [load_balancing_loss_func((lg,), experts, top_k, mask) for lg in out.router_logits]
    by_hand = [_switch_loss(lg, top_k, mask) for lg in out.router_logits]
    torch.testing.assert_close(torch.stack(per_layer), torch.stack(by_hand))
    pooled = load_balancing_loss_func(out.router_logits, experts, top_k, mask)
    torch.testing.assert_close(out.aux_loss, pooled)  # what the model adds itself
    expected = out.loss - 0.5 * out.aux_loss + 0.5 * torch.stack(by_hand).mean()
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_tokens=4)
    torch.testing.assert_close(got, expected)
    # The pooled definition (the model's own loss) would fail the comparison above: the test tells them apart.
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out.loss, expected)


def _switch_loss(router_logits: torch.Tensor, top_k: int, mask: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss of one layer, by hand: `n * sum_i f_i P_i` over the non-padding
    tokens, f_i the share of tokens that picked expert i among their top k, P_i its mean softmax probability."""
    keep = mask.reshape(-1).bool()
    probs = torch.softmax(router_logits.float(), dim=-1)[keep]
    n = probs.shape[-1]
    picked = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return n * (picked.mean(0) * probs.mean(0)).sum()


def test_native_and_moeify_format_of_the_same_weights_have_the_same_aux_loss(
    tmp_path,
    tmp_path_factory: pytest.TempPathFactory,  # noqa: ANN001
) -> None:
    from tiny_models import DENSE_FOLDER, dense_model
    from transformers import AutoModelForCausalLM

    from moeify.convert.converter import convert
    from moeify.convert.options import ConvertOptions
    from moeify.train.loss import causal_lm_loss_terms

    dense = dense_model("llama", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    models = {}
    for layout in ("native", "moeify"):
        options = ConvertOptions(num_experts=4, top_k=2, format=layout, seed=3)
        convert(str(dense), tmp_path / layout, options, progress=False, log=lambda _: None)
        models[layout] = AutoModelForCausalLM.from_pretrained(tmp_path / layout, dtype=torch.float32).train()
    native, own = models["native"], models["moeify"]
    assert type(native).__name__ == "MixtralForCausalLM"
    native.config.output_router_logits, native.config.router_aux_loss_coef = True, 1.0
    native.router_aux_loss_coef = 1.0
    own.config.router = {**own.config.router, "aux_loss_coef": 1.0}
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    got = {k: causal_lm_loss_terms(m, ids, attention_mask=mask).router_loss for k, m in models.items()}
    assert float(got["native"]) > 1.0  # about k = 2
    torch.testing.assert_close(got["native"], got["moeify"])


def test_moeify_format_with_router_loss(tmp_path, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: ANN001
    from tiny_models import DENSE_FOLDER, dense_model
    from transformers import AutoModelForCausalLM

    from moeify.convert.converter import convert
    from moeify.convert.options import ConvertOptions

    dense = dense_model("gemma3", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    convert(
        str(dense),
        tmp_path / "moe",
        ConvertOptions(num_experts=4, top_k=2, shared_experts=1),
        progress=False,
        log=lambda _: None,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.5
    ids = torch.randint(0, 300, (2, 9))
    expected = model(input_ids=ids, labels=ids)
    assert expected.aux_loss is not None
    torch.testing.assert_close(causal_lm_loss(model, ids, chunk_tokens=5), expected.loss)


def test_router_z_loss_is_added_with_its_coefficient_and_its_gradient() -> None:
    torch.manual_seed(0)
    model = MODELS["mixtral"]()
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    keep = mask.reshape(-1).bool()
    z = torch.stack([(torch.logsumexp(lg.float(), -1) ** 2)[keep].mean() for lg in out.router_logits]).mean()
    expected = out.loss - model.router_aux_loss_coef * out.aux_loss + 0.1 * z  # output_router_logits is off
    expected.backward()
    router = model.model.layers[0].mlp.gate.weight
    expected_grad = router.grad.clone()
    model.zero_grad()
    terms = causal_lm_loss_terms(model, ids, labels, attention_mask=mask, chunk_tokens=5, z_loss_coef=0.1)
    got = terms.mean()
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(router.grad, expected_grad)
    # The router term alone is 0.1 * z, tighter than the total allows; formulas that are easy to get wrong (padding
    # counted, mean of logsumexp squared, no square) would fail that comparison.
    torch.testing.assert_close(terms.router_loss, 0.1 * z.detach(), atol=1e-7, rtol=1e-6)
    lse = [torch.logsumexp(lg.detach().float(), -1) for lg in out.router_logits]
    wrong = {
        "padding counted": torch.stack([(x**2).mean() for x in lse]).mean(),
        "mean squared": torch.stack([x[keep].mean() ** 2 for x in lse]).mean(),
        "no square": torch.stack([x[keep].mean() for x in lse]).mean(),
    }
    for formula, value in wrong.items():
        assert abs(float(value - z)) > 100 * 1e-6 * float(z), formula
