"""A native output's tensor names are exactly those stock transformers writes for the same class and config.

For each stock target (Mixtral; Qwen2-MoE with a shared expert, and with a layer subset and none; Qwen3-MoE
with all layers and with a subset), the converted folder's safetensors names must equal the names of
`AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).save_pretrained(...)`: the legacy
per-expert names by default, and the fused names (`save_original_format=False`) with `layout="fused"`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import DENSE_FOLDER, dense_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

hf_logging.disable_progress_bar()

# (dense architecture, options, stock class the conversion must write)
TARGETS = [
    ("llama", {"num_experts": 4, "top_k": 2}, "MixtralForCausalLM"),
    ("llama", {"num_experts": 4, "top_k": 2, "shared_experts": 1}, "Qwen2MoeForCausalLM"),
    ("qwen2", {"num_experts": 4, "top_k": 2, "layers": "0,2"}, "Qwen2MoeForCausalLM"),
    ("qwen3", {"num_experts": 4, "top_k": 2}, "Qwen3MoeForCausalLM"),
    ("qwen3", {"num_experts": 4, "top_k": 2, "layers": "1-2"}, "Qwen3MoeForCausalLM"),
    ("llama_attn_bias", {"num_experts": 4, "top_k": 2}, "GraniteMoeSharedForCausalLM"),
    ("llama_attn_bias", {"num_experts": 4, "top_k": 2, "shared_experts": 1}, "GraniteMoeSharedForCausalLM"),
]
IDS = [
    "llama-mixtral",
    "llama-qwen2moe-shared1",
    "qwen2-qwen2moe-layers02",
    "qwen3-qwen3moe",
    "qwen3-qwen3moe-layers12",
    "llama-attn-bias-granite",
    "llama-attn-bias-granite-shared1",
]


def tensor_names(folder: Path) -> set[str]:
    """Every tensor name in the folder's safetensors files (all shards)."""
    names: set[str] = set()
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize(("arch", "options", "stock_class"), TARGETS, ids=IDS)
def test_native_names_equal_stock_save(
    arch: str, options: dict, stock_class: str, layout: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = tmp_path / "moe"
    result = convert(
        str(dense), out, ConvertOptions(format="native", layout=layout, **options), progress=False, log=lambda _: None
    )
    assert result.output_class == stock_class
    assert result.layout == layout

    config = AutoConfig.from_pretrained(out)
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert type(stock).__name__ == stock_class
    stock_folder = tmp_path / "stock"
    if layout == "fused":
        stock.save_pretrained(stock_folder, save_original_format=False)
    else:
        stock.save_pretrained(stock_folder)

    ours, theirs = tensor_names(out), tensor_names(stock_folder)
    assert ours == theirs, (
        f"{stock_class} ({layout}): only in ours {sorted(ours - theirs)[:8]}, only in stock {sorted(theirs - ours)[:8]}"
    )
    # The expert tensors really are in the requested layout.
    if layout == "fused":
        assert any(name.endswith("experts.gate_up_proj") for name in ours)
    else:
        assert not any(name.endswith("experts.gate_up_proj") for name in ours)
        # GraniteMoe's released checkpoints keep experts 3-D under their own names; the others are per expert.
        legacy = "block_sparse_moe.input_linear.weight" if stock_class.startswith("Granite") else ".experts.0."
        assert any(legacy in name for name in ours)


SERVED_TARGETS = [
    *TARGETS,
    ("llama", {"num_experts": 4, "top_k": 2, "layers": "0,2"}, "Qwen2MoeForCausalLM"),
    ("mistral", {"num_experts": 4, "top_k": 2, "layers": "1-3"}, "Qwen2MoeForCausalLM"),
    ("qwen2", {"num_experts": 4, "top_k": 2}, "Qwen2MoeForCausalLM"),
]


@pytest.mark.parametrize(("arch", "options", "stock_class"), SERVED_TARGETS)
def test_native_outputs_hold_only_tensors_serving_engines_build(
    arch: str, options: dict, stock_class: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No zero-size tensor (vLLM builds no module for them and refuses the checkpoint); q/k/v biases wherever the
    class has them (vLLM's Qwen2-MoE always does); the whole state dict loads with nothing missing or unexpected."""
    dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = tmp_path / "moe"
    result = convert(str(dense), out, ConvertOptions(format="native", **options), progress=False, log=lambda _: None)
    assert result.output_class == stock_class
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    empty = [name for name, t in tensors.items() if t.numel() == 0]
    assert not empty, f"zero-size tensors: {empty[:4]}"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    if stock_class == "Qwen2MoeForCausalLM":
        for layer in range(4):
            for proj in ("q_proj", "k_proj", "v_proj"):
                assert f"model.layers.{layer}.self_attn.{proj}.bias" in tensors
        if not options.get("shared_experts"):
            # The neutral shared expert Qwen2-MoE always builds: all zeros, so its output is exactly 0, behind a
            # gate that is not all zeros (llama.cpp's sigmoid is silu(y) / y).
            shared = {n: t for n, t in tensors.items() if "shared_expert." in n}
            assert shared and all(not t.any() for t in shared.values())
            gates = [t for n, t in tensors.items() if n.endswith("shared_expert_gate.weight")]
            assert gates and all(bool((g != 0).all()) for g in gates)
            assert model.config.shared_expert_intermediate_size < model.config.moe_intermediate_size
