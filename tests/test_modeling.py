"""MoeifyForCausalLM itself: experts implementations agree, KV cache, save/load, losses, config round trip."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

import moeify  # noqa: F401
from moeify import MoeifyConfig, MoeifyForCausalLM

TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny(shared: int = 1, bias: bool = False, layers: list[int] | None = None) -> MoeifyForCausalLM:
    torch.manual_seed(0)
    config = MoeifyConfig(
        text_config=LlamaConfig(**TEXT, mlp_bias=bias),
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=shared,
        moe_layers=layers,
        mlp_bias=bias,
    )
    return MoeifyForCausalLM(config).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_experts_implementations_agree_with_eager_in_outputs_and_gradients(bias: bool) -> None:
    """Every experts implementation computes the eager reference's logits and every parameter's and the input
    embeddings' gradients, within 1e-5 in float32."""
    model = tiny(bias=bias)
    ids = torch.randint(0, 96, (2, 10))
    outputs, grads = {}, {}
    assert model.config._experts_implementation == "moeify"  # the default
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        outputs[implementation] = logits.detach()
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert outputs["eager"].abs().max() > 0
    assert any("experts.gate_up_proj" in n for n in grads["eager"]) and any("router" in n for n in grads["eager"])
    for implementation in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(outputs[implementation], outputs["eager"], atol=1e-5, rtol=1e-5)
        assert grads[implementation].keys() == grads["eager"].keys()
        for name, grad in grads["eager"].items():
            torch.testing.assert_close(grads[implementation][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_generate_with_cache_equals_full_forward() -> None:
    model = tiny()
    ids = torch.randint(0, 96, (1, 6))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    tokens = ids
    for _ in range(6):
        next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_cache_under_either_name_without_deprecation_warnings() -> None:
    """transformers 5.25 renamed `past_key_values` to `cache` (argument and output field): the model takes the cache
    under either name, returns it under the installed version's, and generating raises no deprecation warning."""
    from moeify.modeling.modeling_moeify import CACHE

    model = tiny()
    ids = torch.randint(0, 96, (1, 7))
    full = model(ids, use_cache=False).logits[:, -1]
    for name in dict.fromkeys(["past_key_values", CACHE]):
        cache = getattr(model(ids[:, :-1], use_cache=True), CACHE)
        assert cache is not None and cache.get_seq_length() == 6, name
        step = model(ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5, msg=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    renamed = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not renamed, renamed


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


def test_aux_and_z_loss_added_with_labels() -> None:
    model = tiny().train()
    ids = torch.randint(0, 96, (2, 8))
    model.config.router.update(aux_loss_coef=0.0, z_loss_coef=0.0)
    plain = model(ids, labels=ids)
    assert plain.aux_loss is None and plain.z_loss is None and plain.router_logits is None
    model.config.router.update(aux_loss_coef=0.01, z_loss_coef=0.002)
    routed = model(ids, labels=ids)
    assert routed.aux_loss is not None and routed.z_loss is not None and routed.router_logits is None
    torch.testing.assert_close(routed.loss, plain.loss + 0.01 * routed.aux_loss + 0.002 * routed.z_loss)
    logged = model(ids, labels=ids, output_router_logits=True)
    assert len(logged.router_logits) == 3 and logged.router_logits[0].shape == (16, 4)
    routed.loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad is not None


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoeifyConfig(text_config=LlamaConfig(**TEXT), num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="outside"):
        MoeifyConfig(text_config=LlamaConfig(**TEXT), moe_layers=[7])


def test_gemma_softcapping_applies() -> None:
    """The head's raw logits are scaled far past the cap, so only an applied `tanh(raw / cap) * cap` keeps them in."""
    torch.manual_seed(0)
    cap = 0.5
    text = Gemma3TextConfig(**TEXT, head_dim=8, final_logit_softcapping=cap)
    model = MoeifyForCausalLM(MoeifyConfig(text_config=text, num_experts=2, num_experts_per_tok=1)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
        ids = torch.randint(0, 96, (2, 5))
        raw = model.lm_head(model.model(ids).last_hidden_state)
        logits = model(ids).logits
    assert raw.abs().max() > 10 * cap, "the uncapped logits must exceed the cap for this test to mean anything"
    assert logits.abs().max() <= cap
    torch.testing.assert_close(logits, torch.tanh(raw / cap) * cap, atol=1e-6, rtol=1e-5)
    assert (logits.abs() > 0.9 * cap).float().mean() > 0.5, "most logits saturate near the cap"


def test_text_config_answers_dense_and_expert_fields() -> None:
    """What code reading "the text config" (generation caches, vLLM) needs: one config with both kinds of field."""
    config = tiny().config
    assert config.get_text_config() is config and config.get_text_config(decoder=True) is config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 3)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 48)
    assert "hidden_size" not in config.to_dict()  # delegated, not copied: the dense fields live in text_config
    with pytest.raises(AttributeError):
        _ = config.no_such_field
    config.vocab_size = 100  # what `resize_token_embeddings` does
    assert config.text_config.vocab_size == 100


def test_auto_model_is_the_decoder(tmp_path: Path) -> None:
    """`AutoModel` (what vLLM's Transformers backend builds) gives a `MoeifyModel` that is `MoeifyForCausalLM(config)
    .model` (the dense base class, same names and weights), and saves and reloads as the MoE, not as the dense model."""
    from transformers import AutoConfig, AutoModel

    from moeify import MoeifyConfig, MoeifyModel

    model = tiny(layers=[0, 2])
    model.save_pretrained(tmp_path / "lm")
    decoder = AutoModel.from_pretrained(tmp_path / "lm", dtype=torch.float32).eval()
    assert isinstance(decoder, MoeifyModel) and isinstance(decoder, type(model.model))
    assert isinstance(decoder.config, MoeifyConfig)
    assert decoder.layers[0].mlp.experts.config._experts_implementation == "moeify"  # moeify's default
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids).last_hidden_state, model.model(ids).last_hidden_state, atol=0, rtol=0)
    copied = copy.deepcopy(decoder)  # what accelerate / Trainer utilities do with a model
    assert isinstance(copied, MoeifyModel)
    with torch.no_grad():
        torch.testing.assert_close(copied(ids).last_hidden_state, decoder(ids).last_hidden_state, atol=0, rtol=0)
    decoder.save_pretrained(tmp_path / "decoder")
    saved = AutoConfig.from_pretrained(tmp_path / "decoder")
    assert isinstance(saved, MoeifyConfig) and saved.moe_layers == [0, 2]
    again = AutoModel.from_pretrained(tmp_path / "decoder", dtype=torch.float32).eval()
    assert isinstance(again, MoeifyModel)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).last_hidden_state, model.model(ids).last_hidden_state, atol=0, rtol=0)
    fresh = AutoModel.from_config(model.config)
    assert {n for n, _ in fresh.named_parameters()} == {n for n, _ in model.model.named_parameters()}
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


@pytest.mark.parametrize(
    ("hidden_act", "bias", "refused"),
    [("gelu_pytorch_tanh", False, True), ("gelu_pytorch_tanh", True, False), ("silu", False, False)],
)
def test_vllm_fused_experts_refused_for_non_silu(hidden_act: str, bias: bool, refused: bool) -> None:
    """vLLM's Transformers backend swaps 3-D experts for a SiLU-only kernel: building under its attention
    implementation must fail for unbiased non-SiLU experts instead of serving wrong tokens."""
    from moeify.modeling import MoeifySparseMoeBlock

    config = MoeifyConfig(
        text_config=LlamaConfig(**TEXT, mlp_bias=bias), num_experts=4, mlp_activation=hidden_act, mlp_bias=bias
    )
    MoeifySparseMoeBlock(config)  # outside vLLM: always fine
    config._attn_implementation_internal = "vllm"
    if refused:
        with pytest.raises(ValueError, match="SiLU only"):
            MoeifySparseMoeBlock(config)
    else:
        MoeifySparseMoeBlock(config)
