"""4-bit experts with per-expert LoRA (`moeify.quant`): exact against an eager reference, memory, routing, swap-in."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from tiny_models import NATIVE_MOE_CLASSES, native_moe
from torch import nn
from transformers import LlamaConfig, MixtralConfig, MixtralForCausalLM

from moeify.modeling import MoeifyConfig, MoeifyForCausalLM
from moeify.modeling.experts import build_experts
from moeify.quant import (
    ExpertLoraConfig,
    ExpertQuantization,
    Experts4bit,
    ExpertsLoraLayer,
    add_expert_lora,
    quantize_experts,
)
from moeify.quant.experts_4bit import _cpu_fused_kernel, _dequantize_4bit_cpu_into

H, I, E, K, T = 64, 128, 4, 2, 12  # noqa: E741


def full_precision_experts(bias: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = MoeifyConfig(
        text_config=LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4),
        num_experts=E,
        num_experts_per_tok=K,
        mlp_bias=bias,
    )
    experts = build_experts(config)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(std=0.1)
    return experts


def with_lora(module: Experts4bit, lora: ExpertLoraConfig, nonzero: bool = False) -> ExpertsLoraLayer:
    """`module` with per-expert LoRA; `nonzero`: B drawn at random (it starts at zero) so the LoRA path counts."""
    holder = nn.ModuleDict({"experts": module})
    add_expert_lora(holder, lora)
    wrapped = holder["experts"]
    assert isinstance(wrapped, ExpertsLoraLayer) and isinstance(wrapped.base_layer, ExpertsLoraLayer)
    if nonzero:
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
    return wrapped


def lora_parameters(module: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


def eager_reference(layer: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Dequantize every expert and loop over them: the definition the grouped 4-bit path must match."""
    module = layer.experts if isinstance(layer, ExpertsLoraLayer) else layer
    factors = layer.factors() if isinstance(layer, ExpertsLoraLayer) else {}
    out = torch.zeros_like(x)
    for e in range(module.num_experts):
        token, slot = torch.where(index == e)
        h = x[token]
        for name in ("gate_up", "down"):
            weight = module.dequantize(name, torch.tensor([e]), x.dtype)[0]
            y = h @ weight.T
            if module.has_bias:
                y = y + getattr(module, f"{name}_bias")[e]
            if name in factors:
                lora = factors[name]
                out_dim, r = weight.shape[0], lora.lora_A.shape[0] // module.num_experts
                a = lora.lora_A.view(module.num_experts, r, -1)[e]
                b = lora.lora_B.view(out_dim, r, module.num_experts)[:, :, e]
                y = y + lora.scale * (h @ a.T) @ b.T
            if name == "gate_up":
                gate, up = y.chunk(2, dim=-1)
                y = module.act_fn(gate) * up
            h = y
        out = out.index_add(0, token, h * weights[token, slot, None])
    return out


def routing(seed: int = 1, tokens: int = T, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(tokens, H).to(device).requires_grad_()
    logits = torch.randn(tokens, E).to(device).requires_grad_()
    return x, logits


def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights, index = torch.softmax(logits, -1).topk(K, dim=-1)
    return weights / weights.sum(-1, keepdim=True), index


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("lora", [None, ExpertLoraConfig(r=4, alpha=8)])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_eager_reference(
    double_quant: bool, lora: ExpertLoraConfig | None, chunked: bool, bias: bool, device: str
) -> None:
    quant = ExpertQuantization(double_quant=double_quant, max_dequantized_bytes=1 if chunked else 1 << 30)
    module: nn.Module = Experts4bit.from_experts(full_precision_experts(bias).to(device), quant)
    if lora is not None:
        module = with_lora(module, lora, nonzero=True)
    x, logits = routing(device=device)
    weights, index = route(logits)
    ours, reference = module(x, index, weights), eager_reference(module, x, index, weights)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    leaves = [x, logits, *lora_parameters(module)]
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, leaves, grad, retain_graph=True)
    reference_grads = torch.autograd.grad(reference, leaves, grad)
    for got, want in zip(ours_grads, reference_grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [None, ExpertLoraConfig(r=4, alpha=8)])
def test_one_chunk_of_every_expert_without_reading_the_counts(
    lora: ExpertLoraConfig | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every expert fits the budget on an accelerator, `chunks` gives one chunk of all experts (experts that
    got no token are empty groups) and reads nothing on the host; run here on the CPU, made to take that path."""
    from moeify.quant import experts_4bit

    module: nn.Module = Experts4bit.from_experts(full_precision_experts(bias=True))
    if lora is not None:
        module = with_lora(module, lora, nonzero=True)
    x, logits = routing()
    weights, _ = route(logits)
    index = torch.tensor([[1, 3]] * T)  # experts 0 and 2 get nothing
    monkeypatch.setattr(experts_4bit, "_counts_read_on_host", lambda device: False)
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or [])  # nothing may read the counts
    ours = module(x, index, weights)
    monkeypatch.undo()
    reference = eager_reference(module, x, index, weights)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    leaves = [x, logits, *lora_parameters(module)]
    grad = torch.randn_like(ours)
    monkeypatch.setattr(experts_4bit, "_counts_read_on_host", lambda device: False)
    ours_grads = torch.autograd.grad(ours, leaves, grad, retain_graph=True)
    monkeypatch.undo()
    for got, want in zip(ours_grads, torch.autograd.grad(reference, leaves, grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert reads == []


@pytest.mark.parametrize("lora", [None, ExpertLoraConfig(r=4, alpha=8)])
@pytest.mark.parametrize("bias", [False, True])
def test_router_only_gradient_matches_eager_reference(lora: ExpertLoraConfig | None, bias: bool, device: str) -> None:
    """Frozen inputs and LoRA: backward computes only the routing weights' gradient, from the expert outputs it
    never saved (W_down^T grad against the activations, plus the LoRA and bias terms)."""
    module: nn.Module = Experts4bit.from_experts(full_precision_experts(bias).to(device))
    if lora is not None:
        module = with_lora(module, lora, nonzero=True)
        for param in lora_parameters(module):
            param.requires_grad_(False)
    x, logits = routing(device=device)
    x = x.detach()
    weights, index = route(logits)
    grad = torch.randn(T, H).to(device)
    (ours,) = torch.autograd.grad(module(x, index, weights), logits, grad, retain_graph=True)
    (want,) = torch.autograd.grad(eager_reference(module, x, index, weights), logits, grad)
    assert want.abs().max() > 0
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(device: str) -> None:
    module = with_lora(Experts4bit.from_experts(full_precision_experts().to(device)), ExpertLoraConfig(r=4))
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(std=0.1)

    def block(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights, index = route(logits)  # routing recomputed in backward: must come out identical
        return module(x, index, weights)

    results = []
    for checkpointed in (False, True):
        x, logits = routing(device=device)
        out = (
            torch.utils.checkpoint.checkpoint(block, x, logits, use_reentrant=False)
            if checkpointed
            else block(x, logits)
        )
        out.square().sum().backward()
        results.append((out.detach(), x.grad, logits.grad, module.lora_A["default"].weight.grad.clone()))
        module.zero_grad()
    # Bit for bit on the CPU; CUDA's index_add_ sums in a run-dependent order (atomic adds).
    exact = device == "cpu"
    for plain, checkpointed in zip(*results, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)


def sorted_rows_reference(
    module: Experts4bit, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, lora: dict
) -> torch.Tensor:
    """Plain autograd over the rows sorted by expert, each projection's LoRA dropout drawn once on all of them (gate_up
    first): what a one-chunk dispatch draws, in the same order, with each expert's weights in a loop."""
    order = torch.sort(index.reshape(-1), stable=True).indices
    ids, tokens = index.reshape(-1)[order], order // index.shape[-1]

    def project(name: str, rows: torch.Tensor) -> torch.Tensor:
        factors, dropped = lora[name], lora[name].dropout(rows)
        r = factors.lora_A.shape[0] // E
        outputs = []
        for e in range(E):  # the rows are sorted, so expert by expert is their order
            mine = ids == e
            weight = module.dequantize(name, torch.tensor([e], device=x.device), x.dtype)[0]
            a, b = factors.lora_A.view(E, r, -1)[e], factors.lora_B.view(weight.shape[0], r, E)[..., e]
            outputs.append(rows[mine] @ weight.T + factors.scale * (dropped[mine] @ a.T) @ b.T)
        return torch.cat(outputs)

    gate, up = project("gate_up", x[tokens]).chunk(2, dim=-1)
    out = project("down", module.act_fn(gate) * up) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, tokens, out)


def test_lora_dropout_masks_in_backward_are_the_forward_ones(device: str) -> None:
    """Backward redraws the LoRA dropout masks from the saved RNG state: its gradients must be those of the forward
    that ran. Reference: the same 4-bit weights and factors through plain autograd (`sorted_rows_reference`), which
    draws the same masks in the same order from the same seed."""
    from moeify.quant.dispatch import LoraFactors

    quantized = Experts4bit.from_experts(full_precision_experts().to(device))
    torch.manual_seed(3)
    shapes = quantized.shapes
    factors = [(torch.randn(E * 4, shapes[n][1]) * 0.3).to(device) for n in shapes] + [
        (torch.randn(shapes[n][0], E * 4) * 0.1).to(device) for n in shapes
    ]
    # Small factors and a fixed random output gradient keep every gradient of order one, so 1e-5 means something for
    # all of them: with unit-scale lora_B they reach 1e3 and float32 rounding alone exceeds 1e-5 where terms cancel
    # (a squared loss is worse: logit gradients of 1e5 beside exact-zero cancellations).
    grad = torch.randn(T, H).to(device)
    results = []
    for reference in (False, True):
        x, logits = routing(device=device)
        weights, index = route(logits)
        assert len(list(quantized.chunks(index, x.dtype))) == 1  # the reference draws the masks as one chunk does
        leaves = [f.clone().requires_grad_() for f in factors]
        lora = {
            n: LoraFactors(leaves[i], leaves[2 + i], 0.5, nn.Dropout(0.5)) for i, n in enumerate(("gate_up", "down"))
        }
        torch.manual_seed(7)
        run = sorted_rows_reference if reference else Experts4bit.__call__
        out = run(quantized, x, index, weights, lora)
        (out * grad).sum().backward()
        results.append((out.detach(), x.grad, logits.grad, *(leaf.grad for leaf in leaves)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The masks did drop something: without dropout the output differs.
    x, logits = routing(device=device)
    weights, index = route(logits)
    plain = {n: LoraFactors(factors[i], factors[2 + i], 0.5) for i, n in enumerate(("gate_up", "down"))}
    assert not torch.allclose(quantized(x, index, weights, plain), results[0][0], atol=1e-3)


def test_only_experts_that_received_tokens_are_dequantized(monkeypatch: pytest.MonkeyPatch) -> None:
    module = Experts4bit.from_experts(full_precision_experts())
    calls: list[tuple[str, list[int]]] = []
    buffers: list[torch.Tensor | None] = []
    original = Experts4bit.dequantize

    def counting(
        self: Experts4bit,
        name: str,
        experts: torch.Tensor,
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
        ids: list[int] | None = None,
    ) -> torch.Tensor:
        calls.append((name, experts.tolist()))
        buffers.append(out)
        assert ids is None or ids == experts.tolist()  # the chunk's experts as read on the host
        return original(self, name, experts, dtype, out, ids)

    monkeypatch.setattr(Experts4bit, "dequantize", counting)
    x, _ = routing()
    index = torch.tensor([[1, 3]] * T)  # every token uses experts 1 and 3 only
    weights = torch.full((T, K), 0.5, requires_grad=True)
    module(x, index, weights).sum().backward()
    # Forward, then backward's input gradients (which dequantize again, in reverse order).
    assert calls == [("gate_up", [1, 3]), ("down", [1, 3]), ("down", [1, 3]), ("gate_up", [1, 3])]
    # On the CPU, into one workspace buffer per call (forward, backward) that both projections reuse.
    assert all(buffer is not None for buffer in buffers)
    assert buffers[0] is buffers[1] and buffers[2] is buffers[3]


def test_default_dequantization_budget_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """48 MiB on the CPU (chunks the C allocator recycles), 1 GiB on accelerators, unless set; the CPU default is
    what `chunks` cuts by."""
    from moeify.quant import config

    default, explicit = ExpertQuantization(), ExpertQuantization(max_dequantized_bytes=5)
    assert default.dequantized_budget(torch.device("cpu")) == 48 << 20
    assert default.dequantized_budget(torch.device("cuda")) == 1 << 30
    assert explicit.dequantized_budget(torch.device("cpu")) == explicit.dequantized_budget(torch.device("cuda")) == 5
    with pytest.raises(ValueError, match="max_dequantized_bytes must be >= 1"):
        Experts4bit.from_experts(full_precision_experts(), ExpertQuantization(max_dequantized_bytes=0))
    module = Experts4bit.from_experts(full_precision_experts())
    index = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    assert [c.experts.tolist() for c in module.chunks(index, torch.float32)] == [[0, 1, 2, 3]]
    one_expert = sum(o * i for o, i in module.shapes.values()) * 4
    monkeypatch.setattr(config, "CPU_DEQUANTIZED_BYTES", 2 * one_expert)
    assert [c.experts.tolist() for c in module.chunks(index, torch.float32)] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_experts_are_bitsandbytes_own_round_trip(double_quant: bool, device: str) -> None:
    """Any subset of experts, in any order or as a slice, dequantizes to what bitsandbytes' own per-expert round trip
    gives, for scales that fill whole nested blocks (gate_up: 256 blocks per expert, dequantized in one call) and not
    (down)."""
    import bitsandbytes.functional as bnb_functional

    experts = full_precision_experts().to(device)
    module = Experts4bit.from_experts(experts, ExpertQuantization(double_quant=double_quant))
    assert module.gate_up_absmax.shape[-1] == 256 and module.down_absmax.shape[-1] == 128
    subset = torch.tensor([3, 1, 2], device=device)
    for name, weight in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
        expected = []
        for e in subset.tolist():
            data, state = bnb_functional.quantize_4bit(
                weight[e].detach().contiguous(), compress_statistics=double_quant, quant_type="nf4"
            )
            expected.append(bnb_functional.dequantize_4bit(data, state))
        got = module.dequantize(name, subset, torch.float32)
        torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=0)
        # Consecutive experts (what a chunk of active experts usually is) are selected as a slice, not gathered.
        torch.testing.assert_close(module.dequantize(name, slice(1, 3), torch.float32), got[1:], rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantizing_into_a_workspace_gives_bitsandbytes_values(quant_type: str, dtype: torch.dtype) -> None:
    """On the CPU the dispatch dequantizes into a buffer it reuses (bitsandbytes' native kernel, called directly):
    the same values as bitsandbytes' allocating call, written in the buffer itself; any other buffer falls back."""
    module = Experts4bit.from_experts(full_precision_experts(), ExpertQuantization(quant_type=quant_type))
    for name, experts in (("gate_up", torch.tensor([3, 1])), ("down", slice(1, 4))):
        expected = module.dequantize(name, experts, dtype)
        buffer = torch.full((expected.numel() + 7,), float("nan"), dtype=dtype)
        got = module.dequantize(name, experts, dtype, out=buffer)
        assert got.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert buffer[expected.numel() :].isnan().all()  # nothing written past the weights
        wrong = torch.empty(expected.numel(), dtype=torch.float64)  # not the dtype asked for: bitsandbytes allocates
        fallback = module.dequantize(name, experts, dtype, out=wrong)
        assert fallback.data_ptr() != wrong.data_ptr()
        torch.testing.assert_close(fallback, expected, rtol=0, atol=0)
    # A kernel bitsandbytes does not have (no float64 one) is a fallback, not an error.
    packed, absmax = module.gate_up_packed[:1].view(torch.uint8), module.absmax("gate_up", slice(0, 1)).reshape(-1)
    wrong = torch.empty(2 * packed.numel(), dtype=torch.float64)
    assert not _dequantize_4bit_cpu_into(packed, absmax, module.quantization, wrong, module.hidden_dim)


def test_storage_is_under_three_tenths_of_bf16() -> None:
    experts = full_precision_experts()
    full_bytes = sum(p.numel() for p in experts.parameters()) * 2  # bf16
    for double_quant in (True, False):
        module = Experts4bit.from_experts(experts, ExpertQuantization(double_quant=double_quant))
        stored = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        assert stored <= 0.3 * full_bytes, (double_quant, stored / full_bytes)
        assert module.gate_up_packed.dtype == torch.bfloat16 and not module.gate_up_packed.requires_grad


def test_lora_starts_as_the_quantized_model_and_trains_only_lora() -> None:
    plain = Experts4bit.from_experts(full_precision_experts())
    adapted = with_lora(copy.deepcopy(plain), ExpertLoraConfig(r=4))
    x, logits = routing()
    weights, index = route(logits.detach())
    assert torch.equal(adapted(x, index, weights), plain(x, index, weights))
    packed = adapted.experts.gate_up_packed.detach().view(torch.uint8).clone()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
    for _ in range(2):  # A's gradient is 0 while B is 0: the second step moves it
        optimizer.zero_grad()
        adapted(x, index, weights).square().sum().backward()
        optimizer.step()
    assert set(before) == {f"{prefix}lora_{ab}.default.weight" for prefix in ("", "base_layer.") for ab in "AB"}
    params = dict(adapted.named_parameters())
    for name, value in before.items():
        assert not torch.equal(value, params[name]), f"{name} did not change"
    assert torch.equal(adapted.experts.gate_up_packed.view(torch.uint8), packed)


def test_quantized_model_swaps_every_experts_module_and_stays_close() -> None:
    torch.manual_seed(0)
    moeify_model = MoeifyForCausalLM(
        MoeifyConfig(
            text_config=LlamaConfig(
                vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4
            ),
            num_experts=E,
            num_experts_per_tok=K,
        )
    ).eval()
    mixtral = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=96,
            hidden_size=H,
            intermediate_size=I,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=E,
            num_experts_per_tok=K,
        )
    ).eval()
    ids = torch.randint(0, 96, (2, 9))
    for model in (moeify_model, mixtral):
        with torch.no_grad():
            reference = model(ids).logits
        names = quantize_experts(model)
        assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
        assert all(isinstance(model.get_submodule(n), Experts4bit) for n in names)
        assert add_expert_lora(model, ExpertLoraConfig(r=2)) == names
        logits = model(ids).logits
        relative = ((logits - reference).norm() / reference.norm()).item()
        assert 0 < relative < 0.05, relative  # NF4's error, not garbage
        logits.sum().backward()
        assert model.get_submodule(names[0]).lora_B["default"].weight.grad.abs().max() > 0


def test_casting_the_model_moves_but_never_casts_the_4bit_storage() -> None:
    module = with_lora(Experts4bit.from_experts(full_precision_experts(bias=True)), ExpertLoraConfig(r=4))
    x, logits = routing()
    weights, index = route(logits)
    before = module(x, index, weights)
    experts = module.experts
    packed = experts.down_packed.detach().view(torch.uint8).clone()
    module.to(torch.float64)
    assert experts.down_packed.dtype == torch.bfloat16 and torch.equal(experts.down_packed.view(torch.uint8), packed)
    assert experts.down_absmax.dtype == torch.uint8 and experts.down_nested_absmax.dtype == torch.float32
    assert experts.down_bias.dtype == module.lora_A["default"].weight.dtype == torch.float64  # these follow
    module.to(torch.float32)
    torch.testing.assert_close(module(x, index, weights), before, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moving_to_cuda_and_back_keeps_the_4bit_bytes() -> None:
    """`.to("cuda")` moves the packed bytes and scales as they are; the block computes the same there (within float
    noise) and, moved back, exactly what it computed before."""
    module = with_lora(Experts4bit.from_experts(full_precision_experts(bias=True)), ExpertLoraConfig(r=4))
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(std=0.1)
    x, logits = routing()
    weights, index = route(logits.detach())
    before = module(x, index, weights).detach()
    stored = {k: v.clone() for k, v in module.experts.state_dict().items()}
    module.to("cuda")
    for key, value in module.experts.state_dict().items():
        assert value.device.type == "cuda" and value.dtype == stored[key].dtype, key
        assert torch.equal(value.cpu(), stored[key]), key
    on_cuda = module(x.detach().cuda(), index.cuda(), weights.cuda())
    torch.testing.assert_close(on_cuda.cpu(), before, atol=1e-5, rtol=1e-5)
    module.to("cpu")
    torch.testing.assert_close(module(x, index, weights).detach(), before, atol=0, rtol=0)


def test_bad_settings_and_non_moe_models_fail_clearly() -> None:
    experts = full_precision_experts()
    with pytest.raises(ValueError, match="quant_type 'int4' is not one of nf4, fp4"):
        Experts4bit.from_experts(experts, ExpertQuantization(quant_type="int4"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blocksize 4096 does not divide the expert sizes"):
        Experts4bit.from_experts(experts, ExpertQuantization(blocksize=4096))
    with pytest.raises(ValueError, match="blocksize 100 is not one of"):
        Experts4bit.from_experts(experts, ExpertQuantization(blocksize=100))
    with pytest.raises(ValueError, match="LoRA rank r must be >= 1"):
        with_lora(Experts4bit.from_experts(experts), ExpertLoraConfig(r=0))
    with pytest.raises(ValueError, match="no 4-bit or frozen experts: call moeify.quant.quantize_experts or freeze_"):
        add_expert_lora(nn.ModuleDict({"experts": experts}), ExpertLoraConfig())
    dense = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="has no fused experts module"):
        quantize_experts(dense)


def test_model_with_gradient_checkpointing() -> None:
    """transformers' gradient checkpointing recomputes the routing and the 4-bit dispatch: same loss and grads."""
    from moeify.quant.loading import enable_checkpointing

    model = native_moe("mixtral")
    quantize_experts(model)
    add_expert_lora(model, ExpertLoraConfig(r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    ids = torch.randint(0, 96, (2, 10))
    results = []
    for checkpointing in (False, True):
        model.train()
        if checkpointing:
            enable_checkpointing(model)  # non-reentrant, under the installed transformers' name
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=1e-6)
    for plain, ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_matches_stock_bfloat16(device: str) -> None:
    """In bfloat16 the 4-bit model computes what stock Mixtral computes with the same (dequantized) weights."""
    stock = native_moe("mixtral").to(device).eval()
    ours = copy.deepcopy(stock)
    with torch.no_grad():
        for name in quantize_experts(ours):
            module, experts = ours.get_submodule(name), stock.get_submodule(name)
            everyone = torch.arange(E, device=device)
            experts.gate_up_proj.copy_(module.dequantize("gate_up", everyone, torch.float32))
            experts.down_proj.copy_(module.dequantize("down", everyone, torch.float32))
        ids = torch.randint(0, 96, (2, 10)).to(device)
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-5)
        stock.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        ours_logits, stock_logits = ours(ids).logits.float(), stock(ids).logits.float()
    assert ((ours_logits - stock_logits).norm() / stock_logits.norm()).item() < 0.02


def test_bfloat16_gradients_follow_the_float32_reference(device: str) -> None:
    """bf16 compute (activations, dequantized weights and LoRA factors cast to bf16 in the dispatch) gives the
    gradients of the float32 eager reference within bf16's precision: inputs, routing weights, LoRA factors."""
    module = with_lora(Experts4bit.from_experts(full_precision_experts(bias=True).to(device)), ExpertLoraConfig(r=4))
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(std=0.1)
        module.base_layer.lora_B["default"].weight.normal_(std=0.1)
    x, logits = routing(tokens=64, device=device)
    grad = torch.randn(64, H).to(device)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        leaves = [x.detach().to(dtype).requires_grad_(), logits.detach().clone().requires_grad_()]
        weights, index = route(leaves[1])
        run = module if dtype == torch.bfloat16 else (lambda *a: eager_reference(module, *a))
        module.experts.to(dtype)  # the biases follow the compute dtype; the 4-bit storage never casts
        out = run(leaves[0], index, weights.to(dtype))
        assert out.dtype == dtype
        params = lora_parameters(module)
        results.append(torch.autograd.grad(out, [*leaves, *params], grad.to(dtype)))
    for name, got, want in zip(["x", "logits"] + ["lora"] * 4, *results, strict=True):
        relative = ((got.float() - want).norm() / want.norm()).item()
        assert want.norm() > 0 and relative < 0.02, (name, relative)


@pytest.mark.parametrize("name", NATIVE_MOE_CLASSES)
def test_every_native_class_computes_its_dequantized_self(name: str) -> None:
    """Swapped into each stock class moeify writes, 4-bit experts compute exactly what the class computes with
    the dequantized weights (so the routing, weights and experts contract are honoured), LoRA at init included."""
    stock = native_moe(name).eval()
    ours = copy.deepcopy(stock)
    names = quantize_experts(ours)
    add_expert_lora(ours, ExpertLoraConfig(r=4))
    with torch.no_grad():
        for module_name in names:
            module, experts = ours.get_submodule(module_name).experts, stock.get_submodule(module_name)
            experts.gate_up_proj.copy_(module.dequantize("gate_up", torch.arange(E), torch.float32))
            experts.down_proj.copy_(module.dequantize("down", torch.arange(E), torch.float32))
        ids = torch.randint(0, 96, (2, 9))
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-5)


# Generation on the CPU: bitsandbytes' fused 4-bit kernel instead of dequantizing.

needs_fused_cpu_kernel = pytest.mark.skipif(
    not _cpu_fused_kernel(), reason="bitsandbytes registers its fused 4-bit CPU kernel on AVX512-BF16 CPUs only"
)


def spy_fused(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record the rows each call of bitsandbytes' `gemv_4bit` got, and every `Experts4bit.dequantize` call."""
    seen: dict[str, list] = {"fused": [], "dequantized": []}
    gemv, dequantize = bnb_functional.gemv_4bit, Experts4bit.dequantize

    def fused(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen["fused"].append(len(x))
        return gemv(x, *args, **kwargs)

    def dequantized(self: Experts4bit, name: str, *args: object, **kwargs: object) -> torch.Tensor:
        seen["dequantized"].append(name)
        return dequantize(self, name, *args, **kwargs)

    monkeypatch.setattr(bnb_functional, "gemv_4bit", fused)
    monkeypatch.setattr(Experts4bit, "dequantize", dequantized)
    return seen


@needs_fused_cpu_kernel
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("lora", [None, ExpertLoraConfig(r=4, alpha=8)])
@pytest.mark.parametrize("bias", [False, True])
def test_generation_runs_the_fused_cpu_kernel_on_the_stored_weights(
    quant_type: str, double_quant: bool, lora: ExpertLoraConfig | None, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under no_grad, bf16, a few rows per expert: no expert is dequantized, each expert's rows go through
    bitsandbytes' `gemv_4bit` on its packed-for-CPU layout, and the result is the float32 eager reference of the
    same 4-bit weights within bf16's precision (the stored layout given to that kernel is off by more than the
    outputs' own size)."""
    quant = ExpertQuantization(quant_type=quant_type, double_quant=double_quant)  # type: ignore[arg-type]
    module: nn.Module = Experts4bit.from_experts(full_precision_experts(bias), quant)
    if lora is not None:
        module = with_lora(module, lora, nonzero=True)
    x, logits = routing(tokens=3)
    weights, index = route(logits)
    reference = eager_reference(module, x.detach(), index, weights.detach())
    seen = spy_fused(monkeypatch)
    with torch.no_grad():
        ours = module.to(torch.bfloat16)(x.bfloat16(), index, weights.bfloat16())
    assert seen["dequantized"] == []
    experts = index.unique().numel()
    assert len(seen["fused"]) == 2 * experts and max(seen["fused"]) <= 3
    assert ours.dtype == torch.bfloat16
    error = ((ours.float() - reference).norm() / reference.norm()).item()
    assert error < 0.02


@needs_fused_cpu_kernel
def test_fused_cpu_kernel_only_for_few_bfloat16_rows_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows for one expert than `cpu_fused_rows`, autograd, float32, or `cpu_fused_rows=0`: dequantize as
    before, and build no second layout."""
    module = Experts4bit.from_experts(full_precision_experts(), ExpertQuantization(cpu_fused_rows=2)).bfloat16()
    seen = spy_fused(monkeypatch)
    x = torch.randn(4, H, dtype=torch.bfloat16)
    weights = torch.full((4, K), 0.5, dtype=torch.bfloat16)
    with torch.no_grad():
        module(x, torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]]), weights)  # expert 0: 3 rows
        module.float()(x.float(), torch.tensor([[0, 1], [2, 3]] * 2), weights.float())
        module.bfloat16()
    assert seen["fused"] == [] and module._cpu_fused == {}
    assert seen["dequantized"] == ["gate_up", "down"] * 2
    module(x.requires_grad_(), torch.tensor([[0, 1], [2, 3]] * 2), weights).sum().backward()
    assert seen["fused"] == [] and module._cpu_fused == {}
    assert x.grad is not None and x.grad.abs().max() > 0
    off = Experts4bit.from_experts(full_precision_experts(), ExpertQuantization(cpu_fused_rows=0)).bfloat16()
    with torch.no_grad():
        off(x.detach(), torch.tensor([[0, 1], [2, 3]] * 2), weights)
    assert seen["fused"] == [] and off._cpu_fused == {}
    with torch.no_grad():
        module(x.detach(), torch.tensor([[0, 1], [2, 3]] * 2), weights)  # 2 rows each: at the limit
    assert seen["fused"] == [2] * 8 and set(module._cpu_fused) == {"gate_up", "down"}


@needs_fused_cpu_kernel
def test_fused_layout_follows_new_weights_and_is_never_saved() -> None:
    """The kernel's layout is built once, dropped when the stored weights change (`load_state_dict`, quantizing
    again, moving), and never part of the state dict."""
    module = Experts4bit.from_experts(full_precision_experts(seed=0)).bfloat16()
    other = Experts4bit.from_experts(full_precision_experts(seed=1)).bfloat16()
    keys = set(module.state_dict())
    x, logits = routing(tokens=2)
    weights, index = route(logits)
    x, weights = x.detach().bfloat16(), weights.detach().bfloat16()

    def generate(experts: Experts4bit) -> torch.Tensor:
        with torch.no_grad():
            return experts(x, index, weights)

    first = generate(module)
    assert set(module._cpu_fused) == {"gate_up", "down"} and set(module.state_dict()) == keys
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(generate(module), generate(other), atol=0, rtol=0)
    assert not torch.equal(generate(module), first)
    module.store_(full_precision_experts(seed=0).gate_up_proj, full_precision_experts(seed=0).down_proj)
    torch.testing.assert_close(generate(module), first, atol=0, rtol=0)
    module.to("cpu")
    assert module._cpu_fused == {}
    with pytest.raises(ValueError, match="cpu_fused_rows must be >= 0"):
        ExpertQuantization(cpu_fused_rows=-1).validate(H, I)
    assert ExpertQuantization(cpu_fused_rows=0).storage == ExpertQuantization()


@needs_fused_cpu_kernel
def test_fused_layout_kept_through_evaluation_and_dropped_for_training() -> None:
    """The layout survives `eval()` and further generation (built once), and `train()` frees it: training never
    reads it, and it is as large as the stored experts."""
    module = Experts4bit.from_experts(full_precision_experts()).bfloat16().eval()
    x, logits = routing(tokens=2)
    weights, index = route(logits)
    with torch.no_grad():
        first = module(x.detach().bfloat16(), index, weights.detach().bfloat16())
    layout = module._cpu_fused["gate_up"]
    module.eval()
    with torch.no_grad():
        again = module(x.detach().bfloat16(), index, weights.detach().bfloat16())
    assert module._cpu_fused["gate_up"] is layout
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    module.train(False)
    assert module._cpu_fused["gate_up"] is layout
    nn.Sequential(module).train()
    assert module._cpu_fused == {} and module.training


def test_fused_layouts_stay_within_the_process_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layouts are as large as the stored experts: once the process's layouts fill `CPU_FUSED_LAYOUT_BYTES`, further
    layers get none (they dequantize, as in training) instead of holding the experts twice; a freed layout, or a
    model that is gone, makes room. (Built here directly: the kernel that reads them needs AVX512-BF16.)"""
    import gc

    from moeify.quant import experts_4bit

    first, second = (Experts4bit.from_experts(full_precision_experts()).bfloat16().eval() for _ in range(2))
    assert all(second._cpu_fused_layout(name) is not None for name in ("gate_up", "down"))
    one_module = experts_4bit.fused_layout_bytes()
    second.train()  # frees it
    assert one_module > 0 and experts_4bit.fused_layout_bytes() == 0
    monkeypatch.setattr(experts_4bit, "CPU_FUSED_LAYOUT_BYTES", one_module)
    assert all(first._cpu_fused_layout(name) is not None for name in ("gate_up", "down"))
    second.eval()
    assert second._cpu_fused_layout("gate_up") is None and second._cpu_fused == {}
    assert experts_4bit.fused_layout_bytes() == one_module
    del first
    gc.collect()
    assert experts_4bit.fused_layout_bytes() == 0
    assert second._cpu_fused_layout("gate_up") is not None
