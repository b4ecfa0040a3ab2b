"""A training step of 4-bit experts + LoRA with router statistics reads nothing back from the device that the
dispatch does not need: router statistics accumulate on the device (read when the trainer logs) and the loss
selects no tokens on the host.

On the CPU the step counts moeify's host reads (`.item()`, `.cpu()`, `.tolist()`, `.nonzero()` and tensor to
bool / int / float): the 4-bit dispatch reads each MoE layer's expert counts once per pass (forward, the
checkpoint's recompute, backward: 3 per layer), to skip inactive experts and cut chunks within the dequantization
budget. On CUDA (scripts/device-checks.sh) the same step runs under `torch.cuda.set_sync_debug_mode("error")`, where
experts that fit the budget run as one chunk without any read.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_models import DENSE_FOLDER, dense_model

import moeify
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.inspect.router_stats import RouterStats
from moeify.quant import load_for_training
from moeify.train.loss import causal_lm_loss

PACKAGE = str(Path(moeify.__file__).parent)
HOST_READS = ("item", "cpu", "tolist", "nonzero", "__bool__", "__int__", "__float__")


@contextmanager
def moeify_host_reads() -> Iterator[collections.Counter]:
    """Count the host reads of tensors called from moeify's own code, by (method, file, line)."""
    counted: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str):  # noqa: ANN202
        original = originals[name]

        def method(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                counted[(name, caller.removeprefix(PACKAGE), sys._getframe(1).f_lineno)] += 1
            return original(self, *args, **kwargs)

        return method

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counting(name))
        yield counted
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module", params=["qwen2-native", "llama-moeify-format"])
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    name, options = ("qwen2", {}) if request.param == "qwen2-native" else ("llama", {"format": "moeify"})
    out = tmp_path_factory.mktemp("syncs") / request.param
    dense = dense_model(name, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    convert(str(dense), out, ConvertOptions(num_experts=4, top_k=2, shared_experts=1, **options), progress=False)
    return out


def _step(model: torch.nn.Module, device: str) -> RouterStats:
    """Forward and backward as Trainer runs them with `bf16=True`: frozen weights bfloat16, trained ones float32."""
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with RouterStats(model) as stats:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = causal_lm_loss(model, ids)
        loss.backward()
    return stats


def test_a_training_step_reads_expert_counts_once_per_layer_and_pass(moe: Path) -> None:
    model = load_for_training(moe, dtype=torch.bfloat16)
    model.train()
    _step(model, "cpu")  # warm-up: lazily built state is not a step's cost
    with moeify_host_reads() as counted:
        stats = _step(model, "cpu")
    layers = len(stats.layers())
    assert layers == 4
    assert sum(counted.values()) == 3 * layers, counted
    assert {(name, file) for name, file, _ in counted} == {("tolist", "/quant/experts_4bit.py")}  # the chunking
    with moeify_host_reads() as counted:
        summary = stats.summary()  # what the trainer's log reads
    assert counted and 0 < summary["router/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_on_cuda_never_synchronises(moe: Path) -> None:
    model = load_for_training(moe, dtype=torch.bfloat16, device="cuda")
    model.train()
    _step(model, "cuda")  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = _step(model, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(stats.layers()) == 4
