"""What `convert` writes: files, card, shards, dtypes, router init, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moeify  # noqa: F401
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError
from moeify.inspect.info import model_info


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                out[name] = handle.get_tensor(name)
    return out


def card_metadata(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1])


def test_output_files_and_model_card(dense_llama: Path, tmp_path: Path) -> None:
    (dense_llama / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama\n")
    out = tmp_path / "moe"
    result = convert(str(dense_llama), out, ConvertOptions(num_experts=4, top_k=2), progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    meta = card_metadata(out)
    assert meta["license"] == "apache-2.0"
    assert {"moe", "moeify"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == dense_llama.name
    body = (out / "README.md").read_text()
    assert f"{result.params.total:,}" in body and f"{result.params.active:,}" in body
    assert "from_pretrained" in body
    assert result.params.active < result.params.total


def test_sharded_output_has_index_and_loads(dense_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "moe"
    convert(str(dense_llama), out, ConvertOptions(num_experts=4, top_k=2, max_shard_size="100KB"), progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(out))
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    for shard in shards:
        assert shard.stat().st_size <= 100_000 or len(json.loads(_header(shard))) == 2  # one tensor bigger than max
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"


def _header(path: Path) -> bytes:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return handle.read(size)


def test_dtype_and_router_init(dense_llama: Path, tmp_path: Path) -> None:
    bf16 = convert(
        str(dense_llama),
        tmp_path / "bf16",
        ConvertOptions(num_experts=4, top_k=2, dtype="bfloat16", layout="fused"),
        progress=False,
    )
    weights = tensors(bf16.output)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((bf16.output / "config.json").read_text())["dtype"] == "bfloat16"

    def router(folder: Path) -> torch.Tensor:
        return tensors(folder)["model.layers.0.mlp.gate.weight"]

    opts = {"num_experts": 4, "top_k": 2, "layout": "fused"}
    a = convert(str(dense_llama), tmp_path / "a", ConvertOptions(seed=1, **opts), progress=False).output
    b = convert(str(dense_llama), tmp_path / "b", ConvertOptions(seed=1, **opts), progress=False).output
    c = convert(str(dense_llama), tmp_path / "c", ConvertOptions(seed=2, **opts), progress=False).output
    z = convert(str(dense_llama), tmp_path / "z", ConvertOptions(router_init="zeros", **opts), progress=False).output
    assert torch.equal(router(a), router(b))
    assert not torch.equal(router(a), router(c))
    assert router(a).abs().max() > 0 and router(a).std() < 0.05
    assert torch.count_nonzero(router(z)) == 0


def test_fused_experts_are_copies_of_dense_mlp(dense_llama: Path, tmp_path: Path) -> None:
    out = convert(
        str(dense_llama), tmp_path / "moe", ConvertOptions(num_experts=3, top_k=1, layout="fused"), progress=False
    ).output
    dense, moe = tensors(dense_llama), tensors(out)
    gate_up = moe["model.layers.1.mlp.experts.gate_up_proj"]
    expected = torch.cat([dense["model.layers.1.mlp.gate_proj.weight"], dense["model.layers.1.mlp.up_proj.weight"]])
    assert gate_up.shape[0] == 3
    for e in range(3):
        assert torch.equal(gate_up[e], expected)
        assert torch.equal(moe["model.layers.1.mlp.experts.down_proj"][e], dense["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(moe["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])


def test_overwrite_keeps_old_output_until_new_is_complete(dense_llama: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "moe"
    out.mkdir()
    (out / "old.txt").write_text("old")

    from moeify.convert import converter

    def broken_writer(*args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(converter, "write_safetensors", broken_writer)
        with pytest.raises(OSError, match="simulated"):
            convert(str(dense_llama), out, ConvertOptions(num_experts=4, overwrite=True), progress=False)
    assert (out / "old.txt").read_text() == "old", "the old OUT must survive a failed overwrite"
    assert not list(tmp_path.glob(".moe.moeify-*"))

    convert(str(dense_llama), out, ConvertOptions(num_experts=4, overwrite=True), progress=False)
    assert not (out / "old.txt").exists()
    assert (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".moe.moeify-*"))


def test_failure_midway_leaves_nothing(dense_llama: Path, tmp_path: Path, monkeypatch) -> None:
    from moeify.convert.layers import LayerBuilder

    built: list[int] = []
    partial: dict[str, int] = {}  # the temporary output's files when the interrupt came: path -> bytes
    real_get = LayerBuilder.get

    def failing_get(self, layer):
        built.append(layer)
        if layer == 2:
            for folder in tmp_path.glob(".moe.moeify-*"):
                partial.update({str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()})
            raise KeyboardInterrupt
        return real_get(self, layer)

    monkeypatch.setattr(LayerBuilder, "get", failing_get)
    out = tmp_path / "moe"
    with pytest.raises(KeyboardInterrupt):
        convert(str(dense_llama), out, ConvertOptions(num_experts=4), progress=False)
    # Midway: layers 0 and 1 were built and the shard was open in the temporary output when layer 2 was interrupted.
    assert built[-1] == 2 and {0, 1} <= set(built), built
    assert "model.safetensors" in partial, partial
    assert not out.exists()
    assert not list(tmp_path.glob(".moe.moeify-*"))


def test_info_counts_match_loaded_model(dense_llama: Path, tmp_path: Path) -> None:
    out = convert(
        str(dense_llama),
        tmp_path / "moe",
        ConvertOptions(num_experts=4, top_k=2, shared_experts=1, layers="1-2"),
        progress=False,
    ).output
    info = model_info(str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert info["total_params"] == total
    assert info["active_params"] == total - routed + routed * 2 // 4
    assert info["num_experts"] == 4 and info["top_k"] == 2 and info["shared_experts"] == 1
    assert info["moe_layers"] == [1, 2]


def test_truncated_shard_is_reported(dense_llama: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dense_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeifyError, match="corrupt or truncated"):
        convert(str(broken), tmp_path / "out", ConvertOptions(num_experts=4), progress=False)
    assert not (tmp_path / "out").exists()


def test_copies_cost_one_read_and_one_build_per_layer(dense_llama: Path, tmp_path: Path, monkeypatch) -> None:
    """E experts from one FFN: each source tensor is read once and the fused [gate; up] is built once."""
    from collections import Counter

    from moeify.convert import layers
    from moeify.io.checkpoint import SafetensorsCheckpoint

    reads: Counter[str] = Counter()
    real_get = SafetensorsCheckpoint.get

    def counting_get(self, name: str) -> torch.Tensor:
        reads[name] += 1
        return real_get(self, name)

    concatenations = []

    class CountingTorch:
        def __getattr__(self, name: str):
            return getattr(torch, name)

        def cat(self, *args, **kwargs):
            concatenations.append(1)
            return torch.cat(*args, **kwargs)

    monkeypatch.setattr(SafetensorsCheckpoint, "get", counting_get)
    monkeypatch.setattr(layers, "torch", CountingTorch())
    convert(str(dense_llama), tmp_path / "moe", ConvertOptions(num_experts=8, top_k=2, layout="fused"), progress=False)
    assert set(reads) == set(tensors(dense_llama)) and set(reads.values()) == {1}
    assert len(concatenations) == json.loads((dense_llama / "config.json").read_text())["num_hidden_layers"]
