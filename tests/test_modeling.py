"""MoeifyForCausalLM itself: experts implementations agree, KV cache, save/load, losses, config round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

import moeify  # noqa: F401
from moeify import MoeifyConfig, MoeifyForCausalLM

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def tiny(shared: int = 1, bias: bool = False, layers: list[int] | None = None) -> MoeifyForCausalLM:
    torch.manual_seed(0)
    config = MoeifyConfig(text_config=LlamaConfig(**TEXT, mlp_bias=bias), num_experts=4, num_experts_per_tok=2,
                          num_shared_experts=shared, moe_layers=layers, mlp_bias=bias)
    return MoeifyForCausalLM(config).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_experts_implementations_agree(bias: bool) -> None:
    model = tiny(bias=bias)
    ids = torch.randint(0, 96, (2, 10))
    outputs = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        outputs[implementation] = model(ids).logits
    torch.testing.assert_close(outputs["grouped_mm"], outputs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["batched_mm"], outputs["eager"], atol=1e-5, rtol=1e-5)
    assert outputs["eager"].abs().max() > 0


def test_generate_with_cache_equals_full_forward() -> None:
    model = tiny()
    ids = torch.randint(0, 96, (1, 6))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    tokens = ids
    for _ in range(6):
        next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_save_load_round_trip_and_remote_code_files(tmp_path: Path) -> None:
    model = tiny(layers=[0, 2])
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"configuration_moeify.py", "modeling_moeify.py", "router.py", "experts.py"} <= names
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_moeify.MoeifyForCausalLM"
    assert config.moe_layers == [0, 2] and config.text_config.model_type == "llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert not hasattr(loaded.model.layers[1].mlp, "router"), "layer 1 stays dense"


def test_aux_loss_added_with_labels() -> None:
    model = tiny().train()
    ids = torch.randint(0, 96, (2, 8))
    plain = model(ids, labels=ids)
    routed = model(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and routed.aux_loss is not None
    assert len(routed.router_logits) == 3 and routed.router_logits[0].shape == (16, 4)
    torch.testing.assert_close(routed.loss, plain.loss + model.config.router_aux_loss_coef * routed.aux_loss)
    routed.loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad is not None


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoeifyConfig(text_config=LlamaConfig(**TEXT), num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="outside"):
        MoeifyConfig(text_config=LlamaConfig(**TEXT), moe_layers=[7])


def test_gemma_softcapping_applies() -> None:
    text = Gemma3TextConfig(**TEXT, head_dim=8, final_logit_softcapping=0.5)
    model = MoeifyForCausalLM(MoeifyConfig(text_config=text, num_experts=2, num_experts_per_tok=1)).eval()
    logits = model(torch.randint(0, 96, (1, 5))).logits
    assert logits.abs().max() <= 0.5
