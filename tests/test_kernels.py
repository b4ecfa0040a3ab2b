"""`experts_implementation="moeify"` (the per-expert CPU dispatch) and `"moeify_grouped"` (one grouped autograd
function) against transformers' eager experts, on moeify's own experts and on native classes, and their fallback to
transformers' grouped_mm where they do not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import moeify  # noqa: F401  (registers the implementation)
from moeify.kernels import cpu_experts
from moeify.modeling import MoeifyConfig
from moeify.modeling.experts import (
    MoeifyExperts,
    MoeifyExpertsWithBias,
    expert_counts,
    grouped_linear,
    grouped_mm_runs,
)

TOKENS, HIDDEN, INNER, EXPERTS, K = 24, 16, 12, 6, 2
IMPLEMENTATIONS = ["moeify", "moeify_grouped"]


@pytest.fixture(autouse=True)
def pieces_of_three_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks run in pieces as large ones do: at most 3 rows of float32 gate_up output (2 * INNER) per piece,
    so experts with more rows span several pieces (their weight gradients add up across them)."""
    monkeypatch.setattr(cpu_experts, "CPU_CHUNK_BYTES", 3 * 2 * INNER * 4)


def moeify_experts(
    bias: bool, activation: str, dtype: torch.dtype = torch.float32, device: str = "cpu", inner: int = INNER
) -> torch.nn.Module:
    text = LlamaConfig(hidden_size=HIDDEN, intermediate_size=inner, num_hidden_layers=1, num_attention_heads=2)
    config = MoeifyConfig(
        text_config=text, num_experts=EXPERTS, num_experts_per_tok=K, mlp_bias=bias, mlp_activation=activation
    )
    experts = (MoeifyExpertsWithBias if bias else MoeifyExperts)(config)
    assert type(experts.act_fn) is type(ACT2FN[activation])
    return randomised(experts).to(dtype=dtype, device=device)


def randomised(experts: torch.nn.Module) -> torch.nn.Module:
    """`experts` with seeded N(0, 0.3) weights (and biases): large enough that every gradient is far from zero."""
    torch.manual_seed(0)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return experts


def routing(dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and a top-k routing that leaves experts 1 and 4 without tokens (their gradients must be zero)."""
    torch.manual_seed(1)
    hidden = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    logits = torch.randn(TOKENS, EXPERTS)
    logits[:, [1, 4]] = -1e4
    weights, index = logits.softmax(-1).topk(K, dim=-1)
    return hidden.to(device), index.to(device), weights.to(dtype=dtype, device=device)


def run(experts: torch.nn.Module, implementation: str, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Output and gradients (input, routing weights, every parameter) of a weighted sum of the output."""
    experts.config._experts_implementation = implementation
    hidden, index, weights = (t.detach().clone() for t in inputs)
    hidden.requires_grad_(), weights.requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = experts(hidden, index, weights)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    grads = {name: p.grad for name, p in experts.named_parameters()}
    return {"output": out.detach(), "hidden": hidden.grad, "weights": weights.grad, **grads}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize(
    "implementation, gathering",
    [("moeify", False), ("moeify_grouped", False), ("moeify_grouped", True)],
    ids=["moeify", "moeify_grouped-index_add", "moeify_grouped-gathering"],
)
def test_moeify_experts_equal_eager_in_output_and_gradients(
    bias: bool, activation: str, implementation: str, gathering: bool, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sums of each token's rows that "moeify_grouped" has (`index_add_` on the CPU, gathering elsewhere) are
    run on every device."""
    monkeypatch.setattr(cpu_experts, "_sums_by_gathering", lambda device: gathering)
    experts = moeify_experts(bias, activation, device=device)
    inputs = routing(device=device)
    expected, got = run(experts, "eager", inputs), run(experts, implementation, inputs)
    assert expected.keys() == got.keys() and len(expected) == 5 + 2 * bias
    for name, value in expected.items():
        assert value.abs().max() > 0, name
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
    for name in ("gate_up_proj", "down_proj"):  # experts without tokens: exactly zero, not left uninitialised
        assert got[name][[1, 4]].eq(0).all(), name


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_native_mixtral_experts_run_it_too(implementation: str) -> None:
    """`import moeify` registers the implementations for transformers' own classes (what a native export loads as)."""
    assert implementation in ALL_EXPERTS_FUNCTIONS
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_local_experts=EXPERTS)
    config.num_experts_per_tok = K
    experts = randomised(MixtralExperts(config))
    inputs = routing()
    expected, got = run(experts, "eager", inputs), run(experts, implementation, inputs)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_frozen_weights_and_no_grad(implementation: str) -> None:
    """Weights that do not train get no gradient (and cost none); under no_grad the output is the same."""
    experts = moeify_experts(bias=True, activation="silu")
    inputs = routing()
    expected = run(experts, "eager", inputs)
    experts.requires_grad_(False)
    got = run(experts, implementation, inputs)
    assert all(got[name] is None for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"))
    for name in ("output", "hidden", "weights"):
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(experts(*inputs), expected["output"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_weights_train_from_inputs_without_gradients(implementation: str) -> None:
    """Neither the input nor the routing weights want a gradient: the expert weights still get the eager ones."""
    experts = moeify_experts(bias=True, activation="silu")
    inputs = routing()
    expected = run(experts, "eager", inputs)
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    out = experts(*inputs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    for name, parameter in experts.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("row_major", [True, False], ids=["row-major", "transposed"])
def test_bfloat16_follows_the_float32_reference(row_major: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with the weight gradients' left operands copied row-major (a tiny block's columns let them)."""
    monkeypatch.setattr(cpu_experts, "CPU_ROW_MAJOR_COLUMNS", 1 if row_major else 1 << 30)
    experts = moeify_experts(bias=False, activation="silu")
    inputs = routing()
    expected = run(experts, "eager", inputs)
    low = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs)
    got = run(experts.to(torch.bfloat16), "moeify", low)
    for name, value in expected.items():
        error = (got[name].float() - value).norm() / value.norm()
        assert got[name].dtype == torch.bfloat16 and error < 2e-2, (name, float(error))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_short_weight_gradient_products_take_a_row_major_left_in_bfloat16(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A piece's weight gradient (`left`: the transpose of its `(rows, out)` gradient) is written, then added to, with
    the same values whatever memory `left` is copied into; bfloat16 products over at most `CPU_ROW_MAJOR_ROWS` rows
    into at least `CPU_ROW_MAJOR_COLUMNS` columns get a row-major `left`; longer or narrower ones, and float32, the
    transposed view as it came."""
    seen = []
    mm, addmm_ = torch.mm, torch.Tensor.addmm_
    monkeypatch.setattr(torch, "mm", lambda left, *a, **kw: seen.append(left.is_contiguous()) or mm(left, *a, **kw))
    monkeypatch.setattr(
        torch.Tensor,
        "addmm_",
        lambda self, left, *a, **kw: seen.append(left.is_contiguous()) or addmm_(self, left, *a, **kw),
    )
    torch.manual_seed(0)
    most, fewest = cpu_experts.CPU_ROW_MAJOR_ROWS, cpu_experts.CPU_ROW_MAJOR_COLUMNS
    for rows, columns in ((most, fewest), (most + 1, fewest), (most, fewest - 1)):
        gradient, right = torch.randn(rows, 24).to(dtype), torch.randn(rows, columns).to(dtype)
        expected = gradient.double().T @ right.double()
        target = torch.full((24, columns), float("nan"), dtype=dtype)
        cpu_experts._write_or_add(target, gradient.T, right, first=True)
        torch.testing.assert_close(target.double(), expected, atol=0.5, rtol=1e-2)
        cpu_experts._write_or_add(target, gradient.T, right, first=False)
        torch.testing.assert_close(target.double(), 2 * expected, atol=1.0, rtol=1e-2)
    row_major = dtype == torch.bfloat16
    assert seen == [row_major, row_major, False, False, False, False]


def test_pieces_split_experts_under_the_budget() -> None:
    offsets = torch.tensor([4, 4, 5, 11], dtype=torch.int32)  # expert 1 has no rows, expert 3 six
    pieces = cpu_experts._pieces(offsets, row_bytes=2 * INNER * 4)
    assert pieces == [(0, 0, 2), (0, 2, 4), (2, 4, 5), (3, 5, 8), (3, 8, 11)]


def test_small_blocks_run_grouped_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block whose whole gate_up output fits the budget, with fewer rows than `CPU_PIECEWISE_ROWS` and experts
    smaller than `CPU_PIECEWISE_EXPERT_BYTES` or not training, runs transformers' grouped_mm, bit for bit."""
    calls = []
    piecewise = cpu_experts._PiecewiseExperts.apply
    monkeypatch.setattr(cpu_experts._PiecewiseExperts, "apply", lambda *a: calls.append(1) or piecewise(*a))
    monkeypatch.setattr(cpu_experts, "CPU_CHUNK_BYTES", TOKENS * K * 2 * INNER * 4)
    experts = moeify_experts(bias=False, activation="silu")
    inputs = routing()
    expected, got = run(experts, "grouped_mm", inputs), run(experts, "moeify", inputs)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert not calls
    monkeypatch.setattr(cpu_experts, "CPU_CHUNK_BYTES", TOKENS * K * 2 * INNER * 4 - 1)  # one byte over: pieces
    run(experts, "moeify", inputs)
    assert len(calls) == 1
    monkeypatch.setattr(cpu_experts, "CPU_CHUNK_BYTES", TOKENS * K * 2 * INNER * 4)
    monkeypatch.setattr(cpu_experts, "CPU_PIECEWISE_ROWS", TOKENS * K)  # as many rows as the threshold: pieces
    run(experts, "moeify", inputs)
    assert len(calls) == 2
    monkeypatch.setattr(cpu_experts, "CPU_PIECEWISE_ROWS", TOKENS * K + 1)
    expert_bytes = 3 * INNER * HIDDEN * 4  # gate_up and down of one expert, float32
    monkeypatch.setattr(cpu_experts, "CPU_PIECEWISE_EXPERT_BYTES", expert_bytes + 1)
    run(experts, "moeify", inputs)
    assert len(calls) == 2
    monkeypatch.setattr(cpu_experts, "CPU_PIECEWISE_EXPERT_BYTES", expert_bytes)  # training experts this large
    got = run(experts, "moeify", inputs)
    assert len(calls) == 3
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():  # no weight gradient at stake: grouped_mm
        experts(*inputs)
    experts.requires_grad_(False)
    run(experts, "moeify", inputs)
    assert len(calls) == 3


@pytest.mark.parametrize("path", ["pieces", "grouped_mm", "moeify_grouped"])
def test_unrouted_assignments_add_nothing_and_get_no_gradient(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index >= E (a MoE++ null expert, an assignment dropped for capacity; block.py hands them over on the CPU)
    is left out on every path: output and gradients equal eager's with those slots' weights masked to zero (their
    weight gradient is then zero), and no GEMM sees their rows."""
    if path == "grouped_mm":  # a block this small runs transformers' grouped_mm on the routed assignments
        monkeypatch.setattr(cpu_experts, "CPU_CHUNK_BYTES", TOKENS * K * 2 * INNER * 4)
        monkeypatch.setattr(cpu_experts, "CPU_PIECEWISE_EXPERT_BYTES", 1 << 40)
    pieces, grouped_rows, function_rows = [], [], []
    piecewise, grouped = cpu_experts._PiecewiseExperts.apply, cpu_experts.grouped_mm_experts_forward
    function = cpu_experts._GroupedExperts.apply
    monkeypatch.setattr(cpu_experts._PiecewiseExperts, "apply", lambda *a: pieces.append(a[3]) or piecewise(*a))
    monkeypatch.setattr(
        cpu_experts, "grouped_mm_experts_forward", lambda m, h, *a: grouped_rows.append(len(h)) or grouped(m, h, *a)
    )
    monkeypatch.setattr(
        cpu_experts._GroupedExperts, "apply", lambda *a: function_rows.append(len(a[2])) or function(*a)
    )
    experts = moeify_experts(bias=True, activation="silu")
    hidden, index, weights = routing()
    unrouted = torch.zeros_like(index, dtype=torch.bool)
    unrouted[::3, 0] = unrouted[1::4, 1] = True
    unrouted[5] = True  # a token with no routed expert at all
    index = index.masked_fill(unrouted, EXPERTS).masked_fill(unrouted & (torch.arange(TOKENS)[:, None] % 2 == 0), 99)
    got = run(experts, "moeify_grouped" if path == "moeify_grouped" else "moeify", (hidden, index, weights))
    expected = run(experts, "eager", (hidden, index.masked_fill(unrouted, 0), weights.masked_fill(unrouted, 0)))
    expected["weights"] = expected["weights"].masked_fill(unrouted, 0)
    routed = int((~unrouted).sum())
    if path == "pieces":
        assert len(pieces) == 1 and sum(end - start for _, start, end in pieces[0]) == routed
    elif path == "grouped_mm":
        assert grouped_rows == [routed]
    else:
        assert function_rows == [routed]
    assert len(pieces) + len(grouped_rows) + len(function_rows) == 1
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert got["output"][5].eq(0).all() and got["weights"][unrouted].eq(0).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_layouts_it_does_not_cover_fall_back_to_grouped_mm(implementation: str) -> None:
    """gpt-oss experts (transposed weights, clamped custom gate): both are transformers' grouped_mm, bit for bit."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_local_experts=EXPERTS, num_experts_per_tok=K)
    experts = randomised(GptOssExperts(config))
    inputs = routing()
    expected, got = run(experts, "grouped_mm", inputs), run(experts, implementation, inputs)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_model_equals_eager_with_and_without_checkpointing(checkpointing: bool, implementation: str) -> None:
    """A MoeifyForCausalLM runs "moeify" by default; its logits and every gradient equal the eager experts', also
    when gradient checkpointing runs each layer's forward again in backward (and so with "moeify_grouped")."""
    from moeify import MoeifyForCausalLM

    text = LlamaConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(0)
    model = MoeifyForCausalLM(MoeifyConfig(text_config=text, num_experts=EXPERTS, num_experts_per_tok=K))
    assert model.config._experts_implementation == "moeify"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    results = {}
    for name in ("eager", implementation):
        model.set_experts_implementation(name)
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results[name] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    (logits, grads), (expected_logits, expected) = results[implementation], results["eager"]
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert any("experts.gate_up_proj" in n for n in expected) and all(g is not None for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_accelerators_run_grouped_mm() -> None:
    """Off the CPU "moeify" is transformers' grouped_mm, bit for bit, whatever the block's size."""
    experts = moeify_experts(bias=True, activation="silu", device="cuda")
    inputs = routing(device="cuda")
    expected, got = run(experts, "grouped_mm", inputs), run(experts, "moeify", inputs)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype, inner", [(torch.float32, 13), (torch.bfloat16, 12)], ids=["float32-I13", "bf16-I12"])
def test_sizes_grouped_mm_does_not_take_run_in_pieces(
    implementation: str, dtype: torch.dtype, inner: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of I elements that are not a multiple of 16 bytes (torch's grouped_mm, and so transformers' path, refuses
    them): both implementations run them in pieces on the CPU, even a block small enough for grouped_mm otherwise,
    and equal eager."""
    assert inner * torch.empty((), dtype=dtype).element_size() % 16
    monkeypatch.setattr(cpu_experts, "CPU_CHUNK_BYTES", 1 << 40)
    monkeypatch.setattr(cpu_experts, "CPU_PIECEWISE_EXPERT_BYTES", 1 << 40)
    experts = moeify_experts(bias=True, activation="silu", dtype=dtype, inner=inner)
    inputs = routing(dtype=dtype)
    with pytest.raises(RuntimeError, match="16 bytes"):
        run(experts, "grouped_mm", inputs)
    expected, got = run(experts, "eager", inputs), run(experts, implementation, inputs)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=tolerance, rtol=tolerance, msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype, inner", [(torch.float32, 13), (torch.bfloat16, 12)], ids=["float32-I13", "bf16-I12"])
def test_sizes_grouped_mm_does_not_take_run_eager_off_the_cpu(
    implementation: str, dtype: torch.dtype, inner: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the pieces do not run (accelerators, `torch.compile`; here the CPU made to look like one), such sizes
    are not handed to transformers' grouped_mm, which refuses them: both implementations run the class's own eager
    forward, bit for bit."""
    monkeypatch.setattr(cpu_experts, "accepts_unrouted", lambda hidden_states: False)
    calls = []
    eager = type(moeify_experts(bias=True, activation="silu")).forward.__wrapped__
    monkeypatch.setattr(cpu_experts, "_eager_forward", lambda experts: lambda *a: calls.append(1) or eager(*a))
    experts = moeify_experts(bias=True, activation="silu", dtype=dtype, inner=inner)
    inputs = routing(dtype=dtype)
    expected, got = run(experts, "eager", inputs), run(experts, implementation, inputs)
    assert calls == [1]
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_the_eager_forward_is_the_class_own_through_every_wrapper() -> None:
    """The eager forward those sizes take is the experts class's undecorated one, also for a subclass that
    transformers' decorator wrapped again (one level of `__wrapped__` would be the dispatching wrapper: a loop)."""
    from transformers.integrations import use_experts_implementation

    from moeify.modeling.experts import MoeifyExpertsBase

    @use_experts_implementation
    class WrappedAgain(MoeifyExperts):
        pass

    for experts in (moeify_experts(bias=False, activation="silu"), WrappedAgain.__new__(WrappedAgain)):
        assert cpu_experts._eager_forward(experts) is MoeifyExpertsBase.forward
    assert cpu_experts._eager_forward(torch.nn.Linear(2, 2)) is cpu_experts.grouped_mm_experts_forward


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sizes_grouped_mm_does_not_take_run_on_cuda(implementation: str) -> None:
    """The same on a real accelerator: I 12 in bfloat16 equals eager there, where transformers' path refuses it."""
    experts = moeify_experts(bias=True, activation="silu", dtype=torch.bfloat16, device="cuda", inner=12)
    inputs = routing(dtype=torch.bfloat16, device="cuda")
    expected, got = run(experts, "eager", inputs), run(experts, implementation, inputs)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_block_with_every_assignment_unrouted_still_backpropagates(implementation: str) -> None:
    """All of a block's assignments on MoE++ null experts (or dropped): its output is zero and still on the graph,
    so a backward through the block alone reaches its inputs, with zero gradients."""
    experts = moeify_experts(bias=True, activation="silu")
    hidden, index, weights = routing()
    got = run(experts, implementation, (hidden, torch.full_like(index, EXPERTS), weights))
    assert got["output"].eq(0).all()
    assert got["hidden"].eq(0).all() and got["weights"].eq(0).all()


def test_grouped_compiles_through_transformers_path() -> None:
    """Under `torch.compile` (whose grouped_mm takes bfloat16 only) "moeify_grouped" is transformers' compilable
    path: a float32 block compiles, and its output and gradients equal eager's."""
    experts = moeify_experts(bias=False, activation="silu")
    inputs = routing()
    expected = run(experts, "eager", inputs)
    experts.config._experts_implementation = "moeify_grouped"
    hidden = inputs[0].clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = torch.compile(experts)(hidden, *inputs[1:])
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    torch.testing.assert_close(out, expected["output"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, expected["hidden"], atol=1e-5, rtol=1e-5)
    for name, parameter in experts.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_grouped_hands_over_where_grouped_mm_does_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU torch before 2.11 (its grouped_mm wants aligned weights): "moeify_grouped" runs "moeify" instead, and
    the grouped function is not called."""
    calls = []
    function = cpu_experts._GroupedExperts.apply
    monkeypatch.setattr(cpu_experts._GroupedExperts, "apply", lambda *a: calls.append(1) or function(*a))
    experts = moeify_experts(bias=True, activation="silu")
    inputs = routing()
    expected = run(experts, "moeify", inputs)
    run(experts, "moeify_grouped", inputs)
    assert len(calls) == 1
    monkeypatch.setattr(torch, "__version__", "2.10.0+cpu")
    got = run(experts, "moeify_grouped", inputs)
    assert len(calls) == 1
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_forward_and_backward_never_wait_for_the_gpu() -> None:
    """ "moeify_grouped" on CUDA asks the device for nothing on the host (no `.item()`, no `bincount` sizing): torch's
    sync debug mode raises on any synchronizing call, so a CUDA graph or an overlapped stream can hold the block."""
    experts = moeify_experts(bias=False, activation="silu", device="cuda")
    experts.config._experts_implementation = "moeify_grouped"
    hidden, index, weights = routing(device="cuda")
    hidden.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        experts(hidden, index, weights).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hidden.grad is not None and experts.gate_up_proj.grad is not None


def test_expert_counts_leave_out_unrouted_indices() -> None:
    """Counts per expert without `bincount` (which syncs on accelerators): indices >= E, one past or far past, count
    for none."""
    index = torch.tensor([[0, 5], [5, 6], [2, 99], [0, 0]])
    assert expert_counts(index, 6).tolist() == [3, 0, 1, 0, 0, 2]


@pytest.mark.parametrize(
    "case, grouped",
    [("runs", True), ("cpu torch 2.10", False), ("rank 2 in float32", False), ("under torch.compile", False)],
)
def test_grouped_linear_loops_where_grouped_mm_does_not_run(
    case: str, grouped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4-bit dispatch's and the LoRA's grouped products take torch's `grouped_mm` only where it runs and takes
    the sizes; elsewhere one matmul per group, with the same result and gradients."""
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    if case == "cpu torch 2.10":
        monkeypatch.setattr(torch, "__version__", "2.10.0+cpu")
    if case == "under torch.compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    out_dim = 2 if case == "rank 2 in float32" else 8
    inputs = torch.randn(10, 4, requires_grad=True)
    weight = torch.randn(3, out_dim, 4, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # the second group is empty
    grad = torch.randn(10, out_dim)
    got = grouped_linear(inputs, weight, offsets)
    got.backward(grad)
    assert bool(calls) == grouped
    expected = torch.cat([inputs[:4] @ weight[0].T, inputs[4:] @ weight[2].T])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(inputs.grad, torch.cat([grad[:4] @ weight[0], grad[4:] @ weight[2]]))
    torch.testing.assert_close(weight.grad[0], grad[:4].T @ inputs[:4])
    assert weight.grad[1].eq(0).all()


@pytest.mark.parametrize("capability, runs", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_grouped_mm_runs_on_cuda_from_ampere(
    capability: tuple[int, int], runs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A T4 (7.5) has no `grouped_mm`: the grouped products and "moeify_grouped" loop or hand over there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert grouped_mm_runs(torch.device("cuda")) is runs


def test_no_grad_keeps_no_gate_up_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad (generation, a reentrant checkpoint's first pass) the pieces' gate_up outputs are not held to
    the end of the forward, although the weights want gradients."""
    kept = []
    forward = cpu_experts._PiecewiseExperts.forward

    def spy(ctx: object, *args: object) -> torch.Tensor:
        out = forward(ctx, *args)
        kept.append(len(ctx.to_save) - 7)  # besides the inputs, weights and biases
        return out

    monkeypatch.setattr(cpu_experts._PiecewiseExperts, "forward", staticmethod(spy))
    experts = moeify_experts(bias=False, activation="silu")
    experts.config._experts_implementation = "moeify"
    with torch.no_grad():
        experts(*routing())
    experts(*routing())
    assert kept[0] == 0 and kept[1] > 1


def vm_flags(address: int) -> set[str]:
    """The `VmFlags` of this process's mapping that holds `address` (Linux's /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(), reason="needs Linux with transparent huge pages"
)
def test_weight_gradients_are_advised_for_huge_pages() -> None:
    """The weight gradients, fresh memory written in full every step, are marked `MADV_HUGEPAGE` (smaps flag `hg`)
    from their first whole 2 MiB page on, and hold the eager gradients."""
    text = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=2)
    config = MoeifyConfig(text_config=text, num_experts=4, num_experts_per_tok=2)
    experts = MoeifyExperts(config)  # gate_up gradient 8 MiB, down 4 MiB (float32)
    torch.manual_seed(0)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.05)  # `randomised`'s 0.3 at this width: outputs of 400, float noise 1e-4
    torch.manual_seed(1)
    hidden = torch.randn(TOKENS, 256)
    weights, index = torch.randn(TOKENS, 4).softmax(-1).topk(2, dim=-1)
    expected = run(experts, "eager", (hidden, index, weights))
    got = run(experts, "moeify", (hidden, index, weights))
    for name in ("gate_up_proj", "down_proj"):
        grad = got[name]
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-5, msg=name)
        first_huge_page = -(-grad.data_ptr() // (2 << 20)) * (2 << 20)
        assert "hg" in vm_flags(first_huge_page), name
