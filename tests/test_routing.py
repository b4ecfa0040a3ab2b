"""The router section of moeify's format: each routing feature does what the literature's formula says, survives
save -> load, and stays out of the way where it must (eval mode, step 0)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moeify  # noqa: F401
from moeify import MoeifyConfig, MoeifyForCausalLM
from moeify.kernels import cpu_experts
from moeify.modeling.router import MoeifyTopKRouter, load_balancing_loss, router_z_loss

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
E, K = 4, 2


def config(**router: object) -> MoeifyConfig:
    return MoeifyConfig(
        text_config=LlamaConfig(**TEXT), num_experts=E, num_experts_per_tok=K, num_shared_experts=1, router=router
    )


def tiny(**router: object) -> MoeifyForCausalLM:
    torch.manual_seed(0)
    return MoeifyForCausalLM(config(**router)).eval()


def block(model: MoeifyForCausalLM, layer: int = 0) -> torch.nn.Module:
    return model.model.layers[layer].mlp


def test_a_moeify_0_1_checkpoint_loads_with_its_flat_router_fields() -> None:
    folder = FIXTURES / "moeify-0.1-tiny"  # written by moeify 0.1: flat norm_topk_prob=false, router_aux_loss_coef
    saved = json.loads((folder / "config.json").read_text())
    assert saved["norm_topk_prob"] is False and "router" not in saved
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.router["normalize"] is False and model.config.router["aux_loss_coef"] == 0.02
    assert model.config.norm_topk_prob is False and model.config.router_aux_loss_coef == 0.02
    expected = load_file(folder / "expected.safetensors")
    torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], atol=1e-6, rtol=1e-6)


def test_import_moeify_then_its_config_in_a_fresh_interpreter() -> None:
    code = "import moeify; from moeify import MoeifyConfig; from transformers import AutoConfig; "
    code += "print(AutoConfig.for_model('moeify').__class__.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "MoeifyConfig"


def test_router_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="scoring"):
        config(scoring="tanh")
    with pytest.raises(ValueError, match="unknown router settings"):
        config(capacity=1.0)
    with pytest.raises(ValueError, match="unknown null experts"):
        config(null_experts={"one": 1})


def _route(router: MoeifyTopKRouter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return router(x)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, lambda z: F.softmax(z, -1)),
        ({"normalize": False}, lambda z: F.softmax(z, -1)),
        ({"scoring": "sigmoid", "scaling_factor": 2.5}, torch.sigmoid),
        ({"scoring": "sigmoid", "normalize": False}, torch.sigmoid),
    ],
)
def test_scoring_follows_its_formula_in_float32(settings: dict, expected) -> None:  # noqa: ANN001
    router = block(tiny(**settings)).router.to(torch.bfloat16)
    x = torch.randn(10, 32).to(torch.bfloat16)
    logits, weights, index = _route(router, x)
    assert logits.dtype == torch.float32
    reference = F.linear(x.float(), router.weight.float())
    torch.testing.assert_close(logits, reference)
    scores = expected(reference)
    top = scores.topk(K, dim=-1)
    assert torch.equal(index, top.indices)
    want = top.values
    if settings.get("normalize", True):
        want = want / want.sum(-1, keepdim=True)
    want = want * settings.get("scaling_factor", 1.0)
    torch.testing.assert_close(weights.float(), want, atol=1e-2, rtol=1e-2)  # weights leave in the model dtype


def test_mlp_router_is_linear_tanh_linear() -> None:
    router = block(tiny(network="mlp", mlp_hidden_size=20)).router
    assert router.input_proj.weight.shape == (20, 32) and router.weight.shape == (E, 20)
    x = torch.randn(6, 32)
    logits, _, _ = _route(router, x)
    torch.testing.assert_close(logits, torch.tanh(x @ router.input_proj.weight.T) @ router.weight.T)


@pytest.mark.parametrize("settings", [{"noisy_top_k": True}, {"jitter": 0.1}])
def test_noise_and_jitter_act_in_training_only(settings: dict) -> None:
    plain, noisy = tiny(), tiny(**settings)
    noisy.load_state_dict(plain.state_dict(), strict=False)  # same weights; noise weights stay at their init
    ids = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(noisy(ids).logits, plain(ids).logits, atol=0, rtol=0)
    router = block(noisy).router.train()
    x = torch.randn(64, 32)
    first, second = _route(router, x)[0], _route(router, x)[0]
    assert not torch.equal(first, second), "training routes with fresh noise each call"


def test_capacity_drops_exactly_the_overflow_assignments_in_token_order() -> None:
    model = tiny(capacity_factor=1.0)
    router = block(model).router.train()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0, then expert 1
        router.weight[1, 0] = 5.0
    x = torch.randn(16, 32)
    x[:, 0] = 1.0
    logits, weights, index = _route(router, x)
    capacity = router.capacity(16)
    assert capacity == math.ceil(1.0 * K * 16 / E) == 8
    # All 16 tokens chose experts 0 and 1: the first 8 in token order keep each, the other 8 are dropped.
    assert torch.equal(index[:8].sort(-1).values, torch.tensor([[0, 1]] * 8))
    assert (index[8:] == router.dropped_index).all() and (weights[8:] == 0).all()
    router.eval()
    assert (_route(router, x)[2] < E).all(), "evaluation is dropless"


def test_dropped_tokens_pass_through_the_residual_only() -> None:
    model = tiny(capacity_factor=0.25)
    moe = block(model).train()
    x = torch.randn(12, 32)
    with torch.no_grad():
        out = moe(x)
        _, weights, index = moe.router(x)  # the same routing: no noise
        dropped = (index == moe.router.dropped_index).all(-1)
        assert dropped.any()
        shared = torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_experts(x)
    torch.testing.assert_close(out[dropped], shared[dropped])


def test_aux_loss_equals_k_under_uniform_routing_with_padding_excluded() -> None:
    tokens = 8
    logits = torch.zeros(tokens, E)
    index = torch.stack([torch.arange(tokens) % E, (torch.arange(tokens) + 1) % E], dim=-1)
    torch.testing.assert_close(load_balancing_loss(logits, index, E), torch.tensor(float(K)))
    # Padding with skewed routing changes nothing once masked.
    padded_logits = torch.cat([logits, torch.tensor([[9.0, 0, 0, 0]] * 4)])
    padded_index = torch.cat([index, torch.tensor([[0, 1]] * 4)])
    mask = torch.cat([torch.ones(tokens), torch.zeros(4)]).long().reshape(2, 6)
    masked = load_balancing_loss(padded_logits, padded_index, E, attention_mask=mask)
    torch.testing.assert_close(masked, torch.tensor(float(K)))
    assert load_balancing_loss(padded_logits, padded_index, E) > K
    # Unpadded, random: transformers' Mixtral loss of one layer.
    logits = torch.randn(20, E)
    index = logits.topk(K, -1).indices
    torch.testing.assert_close(load_balancing_loss(logits, index, E), load_balancing_loss_func((logits,), E, K))


def test_z_loss_is_the_mean_squared_logsumexp_over_real_tokens() -> None:
    logits = torch.randn(6, E) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    expected = (torch.logsumexp(logits[:4], -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits, mask), expected)


def test_model_losses_are_the_layer_means_of_the_formulas() -> None:
    model = tiny(aux_loss_coef=0.1, z_loss_coef=0.01).train()
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    routing = []
    hooks = [block(model, i).router.register_forward_hook(lambda m, _i, o: routing.append(o)) for i in range(3)]
    out = model(ids, attention_mask=mask, labels=ids)
    for hook in hooks:
        hook.remove()
    aux = torch.stack([load_balancing_loss(z, i, E, attention_mask=mask) for z, _, i in routing]).mean()
    z = torch.stack([router_z_loss(z, mask) for z, _, _ in routing]).mean()
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.z_loss, z)


def test_bias_balancing_moves_a_skewed_load_toward_uniform() -> None:
    model = tiny(bias_update_rate=0.01)
    router = block(model).router.train()
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.weight[0, 0] = 1.5  # the stream below has x[0] = 2 + noise: expert 0 wins most tokens
    generator = torch.Generator().manual_seed(0)

    def load_cv(steps: int, update: bool) -> float:
        """CV of the load summed over `steps` batches of 256 tokens (updating the bias after each, if asked)."""
        total = torch.zeros(E)
        for _ in range(steps):
            x = torch.randn(256, 32, generator=generator)
            x[:, 0] += 2.0
            total += torch.bincount(_route(router, x)[2].flatten(), minlength=E)
            if update:
                router.update_bias()
        return float(total.std(unbiased=False) / total.mean())

    before = load_cv(10, update=False)
    router.load = None
    load_cv(60, update=True)
    after = load_cv(10, update=True)
    assert before > 0.3 and after < before / 5, (before, after)
    bias = router.e_score_correction_bias
    assert bias[0] < 0 < bias[1:].min()
    torch.testing.assert_close(bias, bias.round(decimals=2), atol=1e-5, rtol=0)  # whole steps of +-u


class _ExpertGemmRows(TorchDispatchMode):
    """Counts the rows that enter a GEMM against the experts' `(E, 2I, H)` gate_up weights, whichever the
    implementation (per-expert `mm`, transformers' `_grouped_mm`, eager's `linear`)."""

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.shape = tuple(experts.gate_up_proj.shape[1:])  # (2I, H)
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "_grouped_mm"):
            left, right = args[1:3] if name == "addmm" else args[:2]
            if tuple(right.shape[-2:]) == self.shape[::-1]:
                self.rows += left.shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("implementation", ["moeify", "moeify-pieces", "grouped_mm", "eager"])
def test_null_experts_are_picked_and_cost_no_expert_gemm(implementation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever the experts implementation (moeify's takes the whole routing and leaves null assignments out
    itself, the others get the FFN assignments compacted), only FFN assignments reach a GEMM."""
    if implementation == "moeify-pieces":
        monkeypatch.setattr(cpu_experts, "CPU_PIECEWISE_ROWS", 1)
    model = tiny(null_experts={"zero": 1, "copy": 1, "constant": 1})
    model.set_experts_implementation(implementation.removesuffix("-pieces"))
    moe = block(model)
    router = moe.router
    assert router.weight.shape == (E + 3, 32)
    with torch.no_grad():
        router.weight[E:] += torch.randn(3, 32)  # make the null experts competitive
    x = torch.randn(64, 32)
    gemm = _ExpertGemmRows(moe.experts)
    with torch.no_grad():
        with gemm:
            out = moe(x)
        _, weights, index = router(x)
    ffn_per_token = (index < E).sum(-1)
    assert set(ffn_per_token.tolist()) >= {0, 1, 2}, "tokens use a varying number of FFN experts"
    assert gemm.rows == int(ffn_per_token.sum()), "only FFN assignments reach the experts' GEMMs"
    # The output by hand: FFN experts, zero (nothing), copy (w x), constant (w (a1 x + a2 v)), shared.
    with torch.no_grad():
        expected = torch.zeros_like(x)
        for t in range(len(x)):
            for w, e in zip(weights[t], index[t].tolist(), strict=True):
                if e < E:
                    gate, up = (x[t] @ moe.experts.gate_up_proj[e].T).chunk(2)
                    expected[t] += w * (moe.experts.act_fn(gate) * up) @ moe.experts.down_proj[e].T
                elif e == E + 1:
                    expected[t] += w * x[t]
                elif e == E + 2:
                    a = F.softmax(moe.constant_experts.mix(x[t]), -1)
                    expected[t] += w * (a[0] * x[t] + a[1] * moe.constant_experts.vectors[0])
        expected += torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_experts(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gating_residual_changes_routing_and_survives_save_load(tmp_path: Path) -> None:
    model = tiny(gating_residual=True)
    ids = torch.randint(0, 96, (2, 10))
    before = model(ids, output_router_logits=True).router_logits
    with torch.no_grad():
        block(model, 1).router.residual.weight.normal_(0, 2.0)
    after = model(ids, output_router_logits=True).router_logits
    torch.testing.assert_close(after[0], before[0])  # the first MoE layer has no previous layer
    assert not torch.allclose(after[1], before[1])
    expected = before[1] + after[0] @ block(model, 1).router.residual.weight.T
    torch.testing.assert_close(after[1], expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


ALL_FEATURES = dict(
    scoring="sigmoid",
    network="mlp",
    mlp_hidden_size=16,
    noisy_top_k=True,
    jitter=0.05,
    capacity_factor=1.5,
    bias_update_rate=0.01,
    null_experts={"zero": 1, "copy": 1, "constant": 2},
    gating_residual=True,
)

_REMOTE = r"""
import sys, torch
sys.modules["moeify"] = None  # `import moeify` raises ImportError from here on
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
torch.save({"logits": model(ids).logits, "class": type(model).__module__}, sys.argv[3])
"""


def test_every_feature_survives_save_load_with_and_without_moeify_and_generates_with_cache(tmp_path: Path) -> None:
    model = tiny(**ALL_FEATURES)
    with torch.no_grad():  # trained-looking values for what starts at zero
        for i in range(3):
            router = block(model, i).router
            router.noise.weight.normal_(0, 0.1)
            router.residual.weight.normal_(0, 0.5)
            router.e_score_correction_bias.normal_(0, 0.1)
    ids = torch.randint(0, 96, (2, 10))
    reference = model(ids).logits
    model.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    torch.testing.assert_close(loaded(ids).logits, reference, atol=0, rtol=0)

    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-c", _REMOTE, str(tmp_path / "moe"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["class"].startswith("transformers_modules")
    torch.testing.assert_close(remote["logits"], reference, atol=1e-6, rtol=1e-6)

    prompt = ids[:1, :6]
    generated = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    tokens = prompt
    for _ in range(5):
        next_token = loaded(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"noisy_top_k": True, "jitter": 0.1, "capacity_factor": 1.0},
        {"scoring": "sigmoid"},
        {"bias_update_rate": 0.01},
        {"gating_residual": True},
        {"aux_loss_coef": 0.5, "z_loss_coef": 0.1},
    ],
)
def test_inference_neutral_features_keep_copied_experts_exact(settings: dict) -> None:
    model = tiny(**settings)
    moe = block(model)
    with torch.no_grad():  # every expert a copy of expert 0: the block must equal that one FFN (+ shared)
        moe.experts.gate_up_proj.copy_(moe.experts.gate_up_proj[:1].expand_as(moe.experts.gate_up_proj))
        moe.experts.down_proj.copy_(moe.experts.down_proj[:1].expand_as(moe.experts.down_proj))
        x = torch.randn(20, 32)
        gate, up = (x @ moe.experts.gate_up_proj[0].T).chunk(2, dim=-1)
        dense = (moe.experts.act_fn(gate) * up) @ moe.experts.down_proj[0].T
        dense += torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_experts(x)
        torch.testing.assert_close(moe(x), dense, atol=1e-5, rtol=1e-5)


def test_bias_balancing_in_a_plain_accelerate_loop() -> None:
    from accelerate import Accelerator

    from moeify import update_routing_bias

    model = tiny(bias_update_rate=0.01).train()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    for _ in range(3):
        ids = torch.randint(0, 96, (2, 12))
        accelerator.backward(model(ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
        assert update_routing_bias(model) == 3  # every MoE layer's router
    for layer in range(3):
        bias = block(model, layer).router.e_score_correction_bias
        assert torch.count_nonzero(bias) > 0 and bias.abs().max() <= 0.03 + 1e-6
        assert block(model, layer).router.load is None, "the count restarts after each update"


def test_null_experts_under_peft_target_parameters_lora_match_eager() -> None:
    """Plain peft LoRA on the experts (`target_parameters`: peft wraps the experts module and forms W + delta) with
    null experts: the default implementation gives eager's logits and LoRA gradients (whichever way the block hands
    the routing to the wrapped experts)."""
    from peft import LoraConfig, get_peft_model

    base = tiny(null_experts={"zero": 1, "copy": 1, "constant": 1})
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.router.weight[E:] += torch.randn(3, 32)  # make the null experts competitive
    ids = torch.randint(0, 96, (2, 16))
    results = {}
    for implementation in ("eager", "moeify"):
        model = copy.deepcopy(base)
        model.set_experts_implementation(implementation)
        torch.manual_seed(1)
        targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        config = LoraConfig(r=4, target_modules=[], target_parameters=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        out = peft_model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        results[implementation] = out.logits.detach(), grads
    (want, want_grads), (got, got_grads) = results["eager"], results["moeify"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and any("lora_B" in n for n in got_grads)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
