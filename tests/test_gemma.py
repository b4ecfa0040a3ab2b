"""End to end on the one real model here: Gemma 3 270M (GGUF from PyPI), upcycled to E=8, K=2, S=1."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from moeify.inspect.info import model_info
from moeify.inspect.verify import verify

pytestmark = [pytest.mark.gemma, pytest.mark.slow]


def test_verify_passes_and_generation_identical(gemma_gguf: Path, gemma_moe: Path) -> None:
    report, samples = verify(str(gemma_gguf), str(gemma_moe), tolerance=1e-4, dtype="float32", generate_tokens=16)
    assert report.passed, str(report)
    assert report.top1_agreement == 1.0
    ((prompt, dense_text, moe_text),) = samples
    assert dense_text == moe_text
    assert len(dense_text.strip()) > 0


def test_info_counts_match_loaded_model(gemma_moe: Path) -> None:
    info = model_info(str(gemma_moe))
    assert info["architecture"] == "MoeifyForCausalLM"
    assert (info["num_experts"], info["top_k"], info["shared_experts"]) == (8, 2, 1)
    assert info["moe_layers"] == list(range(18))
    model = AutoModelForCausalLM.from_pretrained(gemma_moe)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert info["total_params"] == total
    assert info["active_params"] == total - routed + routed * 2 // 8
    assert info["size_4bit_bytes"] < info["size_bf16_bytes"]


def test_model_card_inherits_the_gguf_license(gemma_moe: Path) -> None:
    import yaml

    metadata = yaml.safe_load((gemma_moe / "README.md").read_text().split("---")[1])
    assert metadata["license"] == "gemma"  # from the GGUF's general.license
    assert {"moe", "moeify"} <= set(metadata["tags"])
