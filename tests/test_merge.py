"""`moeify merge`: a LoRA adapter (trained on 4-bit experts) folded into full-precision weights, in the base's format.

The reference is what users would otherwise run: stock peft's `PeftModel.from_pretrained` on the full-precision
base. Native outputs are loaded in a fresh interpreter where `import moeify` fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny_models import DENSE_FOLDER, dense_model
from transformers import AutoModelForCausalLM

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.io.checkpoint import open_checkpoint
from moeify.merge import merge
from moeify.quant import ExpertLoraConfig, load_for_training, save_4bit

E4K2 = {"num_experts": 4, "top_k": 2}
CASES = [  # (dense architecture, convert options, class written[, load_for_training settings])
    ("llama", {**E4K2, "layout": "per-expert"}, "MixtralForCausalLM"),
    ("qwen2", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM"),
    ("qwen3", {**E4K2, "format": "native"}, "Qwen3MoeForCausalLM"),
    ("qwen2", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM", {"shared_experts": "full"}),
    ("llama_attn_bias", {**E4K2, "format": "native"}, "GraniteMoeSharedForCausalLM"),
    ("gemma3", {**E4K2, "shared_experts": 1}, "MoeifyForCausalLM"),
    ("llama_mlp_bias", {**E4K2, "layers": "0,2"}, "MoeifyForCausalLM"),
]
IDS = [[5, 17, 42, 3, 77, 12, 9, 60, 33, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]

_CHILD = r"""
import json, sys
sys.modules["moeify"] = None  # `import moeify` raises ImportError from here on
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

merged, base, adapter, ids, out = sys.argv[1:]
ids = torch.tensor(json.loads(ids))
with torch.no_grad():
    got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    expected = model.eval()(ids).logits
torch.save({"got": got, "expected": expected, "class": type(model.get_base_model()).__name__}, out)
"""


def converted(arch: str, options: dict, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = root / "base"
    convert(str(dense), out, ConvertOptions(**options), progress=False, log=lambda _: None)
    return out


def trained_adapter(base: Path, adapter: Path, expert_rank: int = 2, seed: int = 0, **kwargs: object) -> PeftModel:
    """A 4-bit + LoRA model whose every LoRA factor and router is non-trivial (as after training), saved."""
    model = load_for_training(
        base,
        lora=ExpertLoraConfig(r=expert_rank, alpha=3.0 * expert_rank),
        dtype=torch.float32,
        gradient_checkpointing=False,
        **kwargs,  # type: ignore[arg-type]
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(adapter)
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.mark.parametrize("case", CASES, ids=[f"{c[2]}-{c[0]}" + ("-full-shared" if len(c) > 3 else "") for c in CASES])
def test_merged_model_matches_stock_peft_on_the_full_precision_base(
    case: tuple, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    arch, options, expected_class, settings = (*case, {})[:4]
    base = converted(arch, options, tmp_path, tmp_path_factory)
    trained_adapter(base, tmp_path / "adapter", **settings)
    result = merge(base, tmp_path / "adapter", tmp_path / "merged", progress=False, log=lambda _: None)
    assert result.max_rel_diff is not None and result.max_rel_diff < 1e-4
    assert result.targets > 0 and result.replaced > 0  # LoRA merged, routers copied

    # The base's own format: the same tensor names, shapes and dtypes (per-expert stays per-expert).
    before, after = open_checkpoint(base), open_checkpoint(tmp_path / "merged")
    assert {n: (before.shape(n), before.dtype(n)) for n in before} == {
        n: (after.shape(n), after.dtype(n)) for n in after
    }

    if expected_class == "MoeifyForCausalLM":  # loads through moeify's registered classes
        got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval())
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter"
        )
        expected, loaded_class = logits(reference.eval()), type(reference.get_base_model()).__name__
    else:  # plain transformers and stock peft, moeify not importable
        env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1")
        saved = tmp_path / "logits.pt"
        args = [str(tmp_path / "merged"), str(base), str(tmp_path / "adapter"), json.dumps(IDS), str(saved)]
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result_dict = torch.load(saved)
        got, expected, loaded_class = result_dict["got"], result_dict["expected"], result_dict["class"]
    assert loaded_class == expected_class
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.allclose(got, logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()))


def test_merge_into_a_4bit_base_equals_the_trained_model_in_the_released_layout(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = converted("llama", {**E4K2, "layout": "per-expert"}, tmp_path, tmp_path_factory)
    trained = trained_adapter(base, tmp_path / "adapter")
    save_4bit(trained, tmp_path / "base-4bit")
    result = merge(tmp_path / "base-4bit", tmp_path / "adapter", tmp_path / "merged", progress=False, log=print)
    assert result.from_4bit == "nf4, blocksize 64"

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(trained), atol=1e-5, rtol=1e-5)
    # Written as stock save_pretrained writes a Mixtral: per-expert w1/w3/w2 and the legacy router name.
    assert set(open_checkpoint(tmp_path / "merged")) == set(open_checkpoint(base))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## Merged LoRA adapter" in card and str(tmp_path / "adapter") in card and "dequantized" in card
    assert "4-bit training checkpoint" not in card
    assert f"{result.max_abs_diff:.3e}" in card


def test_bad_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    base = converted("llama", {**E4K2, "layout": "per-expert"}, tmp_path, tmp_path_factory)
    trained_adapter(base, tmp_path / "adapter")
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = converted("qwen2", {"num_experts": 2, "top_k": 1}, other_root, tmp_path_factory)
    trained_adapter(other, tmp_path / "other-adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")

    cases = [
        ([str(base), str(tmp_path / "other-adapter")], "the adapter does not fit this base"),
        ([str(base), str(tmp_path / "adapter"), "--overwrite", "-o", str(base)], "is the base or the adapter folder"),
        ([str(base), str(tmp_path)], "has no adapter_config.json"),
        ([str(base), str(tmp_path / "adapter"), "--max-shard-size", "lots"], "max-shard-size"),
    ]
    capsys.readouterr()
    for args, message in cases:
        out = [] if "-o" in args else ["-o", str(tmp_path / "out")]
        assert main(["merge", *args, *out, "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out.moeify-*"))

    assert main(["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "taken"), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_an_expert_lora_lands_on_its_own_expert(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Only expert 1 of layer 0's gate_up LoRA is non-zero: the merge changes that expert's w1 / w3 only."""
    base = converted("llama", {**E4K2, "layout": "per-expert"}, tmp_path, tmp_path_factory)
    model = load_for_training(
        base, lora=ExpertLoraConfig(r=2, alpha=2.0), dtype=torch.float32, gradient_checkpointing=False
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layers.0.mlp.experts.base_layer.lora_B.default.weight"):  # gate_up, (out, E * r)
                param.view(param.shape[0], 2, 4)[:, :, 1] = 0.5
    model.save_pretrained(tmp_path / "adapter")
    merge(base, tmp_path / "adapter", tmp_path / "merged", check=False, progress=False, log=lambda _: None)
    with (
        safe_open(base / "model.safetensors", "pt") as before,
        safe_open(tmp_path / "merged" / "model.safetensors", "pt") as after,
    ):
        changed = {n for n in sorted(before.keys()) if not torch.equal(before.get_tensor(n), after.get_tensor(n))}
    assert changed == {f"model.layers.0.block_sparse_moe.experts.1.{w}.weight" for w in ("w1", "w3")}
