"""`load_for_training`: experts quantized while loading, for every checkpoint layout `convert` writes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import DENSE_FOLDER, dense_model
from transformers import AutoModelForCausalLM

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError
from moeify.quant import Experts4bit, load_for_training, quantize_experts

E4K2 = {"num_experts": 4, "top_k": 2}
CASES = [  # (dense architecture, convert options, class written)
    ("llama", {**E4K2, "layout": "per-expert"}, "MixtralForCausalLM"),
    ("llama", {**E4K2, "layout": "fused"}, "MixtralForCausalLM"),
    ("qwen2", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM"),
    ("qwen3", {**E4K2, "format": "native"}, "Qwen3MoeForCausalLM"),
    ("llama_attn_bias", {**E4K2, "format": "native"}, "GraniteMoeSharedForCausalLM"),
    ("gemma3", {**E4K2, "shared_experts": 1}, "MoeifyForCausalLM"),
    ("llama_mlp_bias", {**E4K2, "layers": "0,2"}, "MoeifyForCausalLM"),
]


def converted(arch: str, options: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = tmp_path_factory.mktemp("training") / arch
    convert(str(dense), out, ConvertOptions(**options), progress=False, log=lambda _: None)
    return out


@pytest.mark.parametrize(("arch", "options", "expected_class"), CASES, ids=[f"{c[2]}-{c[0]}" for c in CASES])
def test_quantized_while_loading_equals_quantized_after_loading(
    arch: str, options: dict, expected_class: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = converted(arch, options, tmp_path_factory)
    model = load_for_training(out, dtype=torch.float32, gradient_checkpointing=False).eval()
    assert isinstance(model, PeftModel)
    assert type(model.get_base_model()).__name__ == expected_class
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    quantize_experts(reference)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)
    assert not any(p.is_meta for p in model.parameters())


def test_loads_onto_the_requested_device(device: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every weight is read onto `device` and the experts are quantized there: the model equals the one loaded
    and quantized there after `from_pretrained`, and a training step runs on it."""
    out = converted("qwen2", {**E4K2, "shared_experts": 1}, tmp_path_factory)
    model = load_for_training(out, dtype=torch.float32, device=device)
    placed = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert placed == {device}, placed
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    quantize_experts(reference)
    ids = torch.randint(0, 300, (2, 11)).to(device)
    exact = device == "cpu"  # CUDA's index_add_ sums in a run-dependent order (atomic adds)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(ids).logits, reference(ids).logits, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5
        )
    model.train()  # gradient checkpointing on (the default): the dispatch is recomputed on the device
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert any("experts.lora_B" in n for n in grads) and any("q_proj.lora_B" in n for n in grads)


def test_an_absent_device_is_refused_before_loading(tmp_path_factory: pytest.TempPathFactory) -> None:
    out = converted("llama", E4K2, tmp_path_factory)
    for device, message in (
        ("cuda:99", "device 'cuda:99' is not available here"),
        ("meta", "device 'meta' holds no weights"),
        ("banana", "device 'banana' is not a torch device"),
    ):
        with pytest.raises(MoeifyError, match=message):
            load_for_training(out, device=device)


def test_one_step_trains_lora_and_routers_and_leaves_the_4bit_base(tmp_path_factory: pytest.TempPathFactory) -> None:
    out = converted("qwen2", {**E4K2, "shared_experts": 1}, tmp_path_factory)
    model = load_for_training(out, dtype=torch.float32)  # gradient checkpointing on, as in training
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kinds = {("lora" if "lora_" in n else "router") for n in trainable}
    assert kinds == {"lora", "router"}
    assert any(".experts." in n and "lora_A" in n for n in trainable)
    assert any("self_attn.q_proj.lora_A" in n for n in trainable)
    assert any(n.endswith("mlp.gate.modules_to_save.default.weight") for n in trainable)
    assert any("mlp.shared_expert.down_proj.lora_A" in n for n in trainable)  # shared experts: LoRA by default
    assert any(n.endswith("mlp.shared_expert_gate.modules_to_save.default.weight") for n in trainable)
    experts = [m for m in model.modules() if isinstance(m, Experts4bit)]
    packed = [m.gate_up_packed.detach().view(torch.uint8).clone() for m in experts]
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(0, 300, (2, 11))
    for _ in range(2):  # LoRA A has no gradient while B is zero: the second step moves it
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    unchanged = [n for n, p in trainable.items() if torch.equal(before[n], p)]
    assert not unchanged, unchanged[:5]
    for module, bytes_before in zip(experts, packed, strict=True):
        assert torch.equal(module.gate_up_packed.view(torch.uint8), bytes_before)


def test_a_dense_model_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    dense = dense_model("llama", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    with pytest.raises(MoeifyError, match="is not an MoE with fused experts"):
        load_for_training(dense)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_4bit_checkpoint_reloads_without_quantizing_again(
    arch: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from moeify.quant import ExpertQuantization, save_4bit

    out = converted(arch, {**E4K2, "shared_experts": 1 if arch == "gemma3" else 0}, tmp_path_factory)
    model = load_for_training(out, dtype=torch.float32, gradient_checkpointing=False).eval()
    saved = save_4bit(model, tmp_path / "4bit")
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "moeify_experts_4bit",
        "quant_type": "nf4",
        "blocksize": 64,
        "double_quant": True,
        "storage_dtype": "bfloat16",
    }

    for remote in (False, True):  # plain transformers refuses, loads no garbage
        with pytest.raises(ValueError, match="moeify_4bit_experts"):
            AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=remote)
    assert "load_for_training" in (saved / "README.md").read_text()

    def no_quantizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the 4-bit checkpoint was quantized again")

    monkeypatch.setattr(Experts4bit, "quantize_", no_quantizing)
    reloaded = load_for_training(saved, dtype=torch.float32, gradient_checkpointing=False).eval()
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    with pytest.raises(MoeifyError, match="holds experts saved as .*quant_type='nf4'.* cannot be loaded as"):
        load_for_training(saved, quantization=ExpertQuantization(quant_type="fp4"))
    # The dequantization budget is a runtime setting, not part of the stored format: any budget loads the checkpoint.
    budget = ExpertQuantization(max_dequantized_bytes=1)
    small_chunks = load_for_training(saved, quantization=budget, dtype=torch.float32, gradient_checkpointing=False)
    assert {m.quantization for m in small_chunks.modules() if isinstance(m, Experts4bit)} == {
        ExpertQuantization(max_dequantized_bytes=1)
    }
    with torch.no_grad():
        torch.testing.assert_close(small_chunks.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)

    # `moeify info` counts the parameters the packed experts stand for, and the bytes they take.
    from moeify.inspect.info import model_info

    full, packed = model_info(str(out)), model_info(str(saved))
    for key in ("total_params", "active_params", "routed_expert_params", "num_experts", "moe_layers"):
        assert packed[key] == full[key], key
    assert packed["quantization"] == "experts nf4 4-bit, blocksize 64, double quant" and full["quantization"] is None
    assert packed["stored_bytes"] < full["stored_bytes"]


def test_save_4bit_needs_4bit_experts(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from moeify.quant import save_4bit

    out = converted("llama", E4K2, tmp_path_factory)
    with pytest.raises(MoeifyError, match="no 4-bit experts to save"):
        save_4bit(AutoModelForCausalLM.from_pretrained(out), tmp_path / "x")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quantization": "quant_type"}, "quant_type 'int3' is not one of nf4, fp4"),
        ({"quantization": "blocksize"}, "blocksize 4096 does not divide the expert sizes"),
        ({"lora": "rank"}, "LoRA rank r must be >= 1"),
        (
            {"attention_lora": "qkv_proj"},
            "LoRA target 'qkv_proj' matches no linear module of MixtralForCausalLM; "
            "its linear modules are: k_proj, o_proj, q_proj, v_proj",
        ),
    ],
)
def test_bad_settings_fail_before_loading_with_what_to_change(
    settings: dict, message: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import LoraConfig

    from moeify.quant import ExpertLoraConfig, ExpertQuantization, loading

    out = converted("llama", E4K2, tmp_path_factory)
    kwargs = {
        "quantization": {
            "quant_type": ExpertQuantization(quant_type="int3"),  # type: ignore[arg-type]
            "blocksize": ExpertQuantization(blocksize=4096),
        },
        "lora": {"rank": ExpertLoraConfig(r=0)},
        "attention_lora": {"qkv_proj": LoraConfig(target_modules=["q_proj", "qkv_proj"])},
    }
    ((key, value),) = settings.items()

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read before the settings were checked")

    monkeypatch.setattr(loading, "_load_weights", no_loading)
    with pytest.raises(MoeifyError) as caught:
        load_for_training(out, **{key: kwargs[key][value]})
    assert message in str(caught.value)


def test_linears_through_bitsandbytes_config_equal_transformers_own_path(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`linear_quantization` gives what `from_pretrained(quantization_config=...)` + `quantize_experts` give."""
    from transformers import BitsAndBytesConfig

    from moeify.quant import save_4bit

    out = converted("llama", E4K2, tmp_path_factory)  # Mixtral: transformers' path keeps no router in 4-bit here
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = load_for_training(out, dtype=torch.float32, gradient_checkpointing=False, linear_quantization=bnb)
    kinds = {name: type(module).__name__ for name, module in model.get_base_model().named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj.base_layer"] == "Linear4bit"  # under peft's LoRA layer
    assert kinds["model.layers.0.self_attn.o_proj.base_layer"] == "Linear4bit" and kinds["lm_head"] == "Linear"
    assert kinds["model.layers.0.mlp.gate"] == "ModulesToSaveWrapper"  # the router: trained, full precision
    assert kinds["model.layers.0.mlp.experts"] != "Linear4bit"
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=bnb).eval()
    quantize_experts(reference)
    for module in reference.modules():  # the same kernel as ours (no bf16 repacking for the fused CPU kernel)
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    ids = torch.randint(0, 300, (2, 11))
    never_evaluated = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits, atol=0, rtol=0)
    # Training after an evaluation backpropagates through the 4-bit linears as before it (bitsandbytes would have
    # repacked them for its fused CPU kernel, which has no backward).
    for trained in (model.train(), never_evaluated.train()):
        trained(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("q_proj.lora_A" in n for n in grads) and any("experts.lora_A" in n for n in grads)
    for name, param in never_evaluated.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, atol=0, rtol=0)
    with pytest.raises(MoeifyError, match="load it without linear_quantization"):
        save_4bit(model, tmp_path / "x")


@pytest.mark.parametrize("shared", ["full", "frozen"])
def test_shared_experts_train_in_full_or_stay_frozen(shared: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = converted("qwen2", {**E4K2, "shared_experts": 1}, tmp_path_factory)
    model = load_for_training(out, dtype=torch.float32, gradient_checkpointing=False, shared_experts=shared)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and ".shared_expert." in n]
    if shared == "full":
        assert sorted(n.split("modules_to_save.default.")[-1] for n in trainable if ".layers.0." in n) == [
            "down_proj.weight",
            "gate_proj.weight",
            "up_proj.weight",
        ]
    else:
        assert trainable == []
    with pytest.raises(MoeifyError, match="shared_experts must be"):
        load_for_training(out, shared_experts="lots")  # type: ignore[arg-type]


def test_checkpointing_is_enabled_under_the_installed_name_without_warnings(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """transformers 5.25 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` (the old name
    warns); `load_for_training` enables non-reentrant checkpointing under whichever name exists, silently."""
    import warnings

    out = converted("llama", {**E4K2, "layout": "fused"}, tmp_path_factory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_for_training(out, dtype=torch.float32)
    base = model.get_base_model()
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    assert checkpointing if checkpointing is not None else base.is_gradient_checkpointing
    # (peft 0.21 itself still reads `is_gradient_checkpointing`, which warns on 5.25: not ours to change.)
    deprecated = [str(w.message) for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    assert not deprecated, deprecated
