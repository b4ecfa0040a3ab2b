"""Qwen2-MoE as every engine computes it: `convert` writes a form that is exact at step 0 whether or not the top-k
weights are renormalised, with a shared-expert gate that is never all zeros.

llama.cpp's qwen2moe graph (the one Ollama and LM Studio run) ignores `norm_topk_prob` and computes the gate's
sigmoid as silu(y) / y; `llamacpp_block` below is that computation in torch, so these tests hold on any machine.
tests/serving runs llama.cpp itself (opt-in).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import DENSE_FOLDER, dense_model
from transformers import AutoModelForCausalLM

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

CASES = [
    ("qwen2", {}),  # the neutral shared expert Qwen2-MoE always has
    ("qwen2", {"shared_experts": 1}),
    ("llama", {"shared_experts": 1, "layers": "0,2"}),
    ("mistral", {"shared_experts": 1, "shared_expert_size": 32}),
    ("qwen2", {"num_experts": 8, "top_k": 2, "drop_upcycling": 0.5}),  # not exact, but the same in every engine
]


def llamacpp_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's qwen2moe feed-forward: softmax top-k weights used as they are, sigmoid as silu(y) / y."""
    probs = F.linear(x, block.gate.weight).softmax(-1)
    weights, experts = probs.topk(block.gate.top_k, dim=-1)
    out = torch.zeros_like(x)
    for k in range(experts.shape[1]):
        for e in experts[:, k].unique().tolist():
            rows = experts[:, k] == e
            gate, up = F.linear(x[rows], block.experts.gate_up_proj[e]).chunk(2, dim=-1)
            out[rows] += weights[rows, k, None] * F.linear(F.silu(gate) * up, block.experts.down_proj[e])
    y = F.linear(x, block.shared_expert_gate.weight)
    return out + F.silu(y) / y * block.shared_expert(x)


@pytest.mark.parametrize(
    ("arch", "options"), CASES, ids=[f"{a}-{'-'.join(map(str, o.values())) or 'plain'}" for a, o in CASES]
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_qwen2moe_blocks_compute_alike_with_and_without_renormalisation(
    arch: str, options: dict, dtype: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = tmp_path / "moe"
    settings = {"num_experts": 4, "top_k": 2, **options}
    result = convert(str(dense), out, ConvertOptions(dtype=dtype, **settings), progress=False, log=lambda _: None)
    assert result.output_class == "Qwen2MoeForCausalLM"
    assert not [note for note in result.notes if "renormalising" in note]
    assert json.loads((out / "config.json").read_text())["norm_topk_prob"] is False

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    blocks = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    assert blocks
    tolerance = 1e-5 if dtype == "float32" else 2e-3
    with torch.no_grad():
        for i, block in blocks:
            assert bool((block.shared_expert_gate.weight != 0).all())  # silu(0) / 0 would be NaN
            transformers_out = block(x[None])[0]
            llamacpp_out = llamacpp_block(block, x)
            assert torch.isfinite(llamacpp_out).all()
            assert torch.allclose(llamacpp_out, transformers_out, atol=tolerance, rtol=0), i
            if result.exact:  # and both equal the dense FFN
                dense_out = reference.model.layers[i].mlp(x[None])[0]
                assert torch.allclose(transformers_out, dense_out, atol=tolerance, rtol=0), i
            probs = F.linear(x, block.gate.weight).softmax(-1)
            picks = probs.topk(block.gate.top_k, dim=-1).indices
            assert len({tuple(sorted(p)) for p in picks.tolist()}) > 1  # the near-uniform router breaks ties per token


def test_a_router_that_needs_renormalisation_keeps_it_and_says_llamacpp_differs(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = tmp_path / "moe"
    result = convert(str(dense), out, ConvertOptions(num_experts=6, top_k=2), progress=False, log=lambda _: None)
    assert json.loads((out / "config.json").read_text())["norm_topk_prob"] is True
    assert result.notes == [
        "llama.cpp computes Qwen2MoeForCausalLM without renormalising the top-k weights, and E / K = 6 / 2 is not a "
        "power of two: it will not compute this output as transformers and vLLM do"
    ]


@pytest.mark.parametrize(
    ("arch", "expected_class"), [("llama", "Qwen2MoeForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")]
)
def test_a_layer_subset_says_llamacpp_cannot_convert_it(
    arch: str, expected_class: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    options = ConvertOptions(num_experts=4, top_k=2, layers="0,2")
    result = convert(str(dense), tmp_path / "moe", options, progress=False, log=lambda _: None)
    assert result.output_class == expected_class
    assert result.notes == [
        f"llama.cpp builds {expected_class} with an MoE block in every layer, so this output (dense layers besides MoE "
        "ones) does not convert there: upcycle every layer for it"
    ]
