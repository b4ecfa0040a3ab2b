"""Frozen full-precision experts with per-expert LoRA in the grouped dispatch (`moeify.quant.ExpertsFrozen`, issue
12): the block equals the original experts with each expert's `W + s B_e A_e` folded in, in outputs and gradients;
nothing is copied; the adapter loads in stock peft onto the untouched model with the same logits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, MixtralConfig, MixtralForCausalLM

from moeify.modeling import MoeifyConfig
from moeify.modeling.experts import build_experts
from moeify.quant import ExpertLoraConfig, ExpertsFrozen, add_expert_lora, freeze_experts

H, I, E, K, T = 64, 128, 4, 2, 20  # noqa: E741


def experts_module(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4)
    config = MoeifyConfig(text_config=text, num_experts=E, num_experts_per_tok=K, mlp_bias=bias)
    config._experts_implementation = "eager"
    experts = build_experts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.1)
    return experts


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [4, 2])  # rank 2: rows too narrow for grouped_mm, the per-group fallback
@pytest.mark.parametrize("chunked", [False, True])  # experts run in chunks, one of several experts after the first
def test_frozen_experts_with_lora_equal_the_experts_with_the_deltas_folded_in(
    bias: bool, rank: int, chunked: bool, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunked:
        monkeypatch.setattr(ExpertsFrozen, "ranges", lambda self, ends, row_bytes: [(0, 1), (1, 3), (3, 4)])
    original = experts_module(bias).to(device)
    reference = copy.deepcopy(original)
    holder = nn.ModuleDict({"experts": ExpertsFrozen(original)})
    add_expert_lora(holder, ExpertLoraConfig(r=rank, alpha=3.0 * rank))
    lora = holder["experts"]
    frozen = lora.experts
    assert frozen.gate_up_proj is original.gate_up_proj and not frozen.gate_up_proj.requires_grad  # shared, frozen
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    factors = lora.factors()
    with torch.no_grad():  # each expert's W + scale * B_e A_e, in the reference's own weights
        for name in ("gate_up", "down"):
            weight = getattr(reference, f"{name}_proj")
            f = factors[name]
            a = f.lora_A.view(E, rank, -1)
            b = f.lora_B.view(weight.shape[1], rank, E)
            for e in range(E):
                weight[e] += f.scale * b[..., e] @ a[e]

    x = torch.randn(T, H).to(device).requires_grad_()
    logits = torch.randn(T, E).to(device).requires_grad_()
    weights, index = torch.softmax(logits, -1).topk(K, dim=-1)
    ours, want = lora(x, index, weights), reference(x, index, weights)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, [x, logits], grad, retain_graph=True)
    expected = torch.autograd.grad(want, [x, logits], grad)
    for g, w in zip(got, expected, strict=True):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # The LoRA factors get gradients, the frozen weights none.
    (lora(x, index.detach(), weights.detach()) * grad).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in lora.named_parameters() if "lora_" in n)
    assert original.gate_up_proj.grad is None and original.down_proj.grad is None


def test_chunks_are_whole_experts_under_the_cpu_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, consecutive experts are grouped while their gate_up output stays under CPU_CHUNK_BYTES (one expert
    at least), each chunk selecting its weights by slice; elsewhere all of them run as one chunk."""
    from moeify.quant import experts_frozen

    frozen = ExpertsFrozen(experts_module(False))
    ends = [11, 19, 30, 40]  # rows per expert: 11, 8, 11, 10
    row_bytes = 2 * I * 4
    for rows, expected in ((21, [(0, 2), (2, 4)]), (1, [(0, 1), (1, 2), (2, 3), (3, 4)]), (40, [(0, 4)])):
        monkeypatch.setattr(experts_frozen, "CPU_CHUNK_BYTES", rows * row_bytes)
        assert frozen.ranges(ends, row_bytes) == expected, rows
    monkeypatch.setattr(experts_frozen, "CPU_CHUNK_BYTES", 21 * row_bytes)
    index = torch.tensor([0] * 11 + [1] * 8 + [2] * 11 + [3] * 10)[torch.randperm(40)].view(20, 2)
    chunks = list(frozen.chunks(index, torch.float32))
    assert [c.selector for c in chunks] == [slice(0, 2), slice(2, 4)]
    assert [c.offsets.tolist() for c in chunks] == [[11, 19], [11, 21]]
    for chunk, (start, end) in zip(chunks, [(0, 2), (2, 4)], strict=True):  # the chunk's rows are its experts'
        assert sorted(set(index.reshape(-1)[chunk.rows].tolist())) == list(range(start, end))
        assert torch.equal(chunk.tokens, chunk.rows // 2)


def test_backward_keeps_only_the_gate_up_output_besides_the_inputs() -> None:
    """Like the 4-bit experts, the frozen ones save for backward their inputs, the LoRA factors and each chunk's
    gate_up output `(rows, 2I)`, nothing else (no gathered input, activation or product per chunk)."""
    holder = nn.ModuleDict({"experts": ExpertsFrozen(experts_module(False))})
    add_expert_lora(holder, ExpertLoraConfig(r=4, alpha=8.0))
    x = torch.randn(T, H, requires_grad=True)
    weights, index = torch.softmax(torch.randn(T, E, requires_grad=True), -1).topk(K, dim=-1)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = holder["experts"](x, index, weights)
    factors = [p for n, p in holder.named_parameters() if "lora_" in n]
    expected = [x, weights, index, *factors]
    inputs = {(tuple(t.shape), t.data_ptr()) for t in expected}
    kept = [t for t in saved if (tuple(t.shape), t.data_ptr()) not in inputs]
    assert [tuple(t.shape) for t in kept] == [(T * K, 2 * I)], [tuple(t.shape) for t in kept]
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in factors)


_CHILD = r"""
import json, sys
sys.modules["moeify"] = None  # `import moeify` raises ImportError from here on
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(torch.tensor(json.loads(sys.argv[3]))).logits, sys.argv[4])
"""


def test_adapter_of_frozen_experts_loads_in_stock_peft_with_the_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=96,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=K,
    )
    full = MixtralForCausalLM(config).eval()
    full.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(full)
    names = freeze_experts(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert add_expert_lora(model, ExpertLoraConfig(r=2, alpha=4.0)) == names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    ids = [[5, 17, 42, 3, 77, 12, 9, 60], [1, 2, 3, 4, 5, 6, 7, 8]]
    with torch.no_grad():
        expected = model.eval()(torch.tensor(ids)).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    result = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "base"), str(tmp_path / "adapter"), json.dumps(ids), str(result)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(result), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["frozen", "4bit"])
def test_unrouted_assignments_enter_no_chunk_and_get_no_gradient(kind: str) -> None:
    """On the CPU the dispatch leaves out an index >= E (a MoE++ null expert, a capacity drop; the block hands them
    over): no chunk takes their rows, and outputs and gradients (input, routing, LoRA) equal the same routing with
    those slots sent to expert 0 at weight zero."""
    from moeify.quant import Experts4bit

    original = experts_module(bias=True)
    base = ExpertsFrozen(original) if kind == "frozen" else Experts4bit.from_experts(original)
    holder = nn.ModuleDict({"experts": base})
    add_expert_lora(holder, ExpertLoraConfig(r=4, alpha=8.0))
    lora = holder["experts"]
    assert lora.accepts_unrouted(torch.zeros(1, 4))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    torch.manual_seed(1)
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    weights, index = torch.softmax(logits, -1).topk(K, dim=-1)
    unrouted = torch.zeros_like(index, dtype=torch.bool)
    unrouted[::3, 0] = unrouted[1::4, 1] = unrouted[5] = True
    sentinel = index.masked_fill(unrouted, E).masked_fill(unrouted & (torch.arange(T)[:, None] % 2 == 0), E + 3)
    routed = int((~unrouted).sum())
    assert sum(len(chunk.rows) for chunk in base.chunks(sentinel, x.dtype)) == routed

    def step(index: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        lora.zero_grad(set_to_none=True)
        inputs, top = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = lora(inputs, index, top if mask is None else top.masked_fill(mask, 0.0))
        (out * torch.linspace(-1, 1, H)).sum().backward()
        factors = [p.grad for name, p in sorted(lora.named_parameters()) if "lora" in name]
        return [out.detach(), inputs.grad, top.grad, *factors]

    got = step(sentinel, None)
    expected = step(index.masked_fill(unrouted, 0), unrouted)
    assert got[0][5].eq(0).all(), "a token with no routed expert gets nothing"
    for g, w in zip(got, expected, strict=True):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
