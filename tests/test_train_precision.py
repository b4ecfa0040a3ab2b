"""Mixed precision as users train: `compute_dtype: bfloat16` (the recipe default) keeps frozen weights in bfloat16
and every trained tensor (LoRA factors, routers, shared-expert gates, fully trained weights) as a float32 master
weight, under bfloat16 autocast; its losses track the float32 run's. float16 is refused with what to use instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model, training_recipe

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError
from moeify.train.recipe import load_recipe, trainer_settings

# (source architecture, convert options): a native Qwen2-MoE with a shared expert and its gate, and the moeify
# format (its own router, shared expert) from Llama.
CASES = {
    "qwen2-native": ("qwen2", {"shared_experts": 1}),
    "llama-moeify-format": ("llama", {"format": "moeify", "shared_experts": 1}),
}


def _moe(case: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    name, options = CASES[case]
    moe = tmp_path_factory.getbasetemp() / f"precision-{case}"
    if not moe.exists():
        dense = dense_model(name, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
        convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, **options), progress=False, log=print)
    return moe


def _recipe(tmp_path: Path, moe: Path, name: str, **quantization: object) -> Path:
    """30 steps of batch 4; `compute_dtype` is the recipe default (bfloat16) unless given."""
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = training_recipe(
        tmp_path, name, moe, {"path": str(tmp_path / "corpus.jsonl")}, per_device_train_batch_size=4, max_steps=30
    )
    raw = yaml.safe_load(recipe.read_text())
    raw["quantization"] = {"experts": "nf4", **quantization}
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def _losses(folder: Path) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize("overrides", [[], ["quantization.experts=none"], ["quantization.experts=none", "lora=null"]])
def test_trained_tensors_are_float32_and_frozen_ones_bfloat16(
    overrides: list[str], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from moeify.train.run import load_model

    moe = _moe("qwen2-native", tmp_path_factory)
    recipe = load_recipe(_recipe(tmp_path, moe, "dtypes"), overrides)
    assert recipe.quantization.compute_dtype == "bfloat16" and trainer_settings(recipe)["bf16"] is True
    model = load_model(recipe, str(moe))
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert trained and set(trained.values()) == {torch.float32}, {
        n: d for n, d in trained.items() if d != torch.float32
    }
    if "lora=null" in overrides:
        assert not frozen
        return
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    names = list(trained)
    for kind in ("lora_A", "mlp.gate.", "shared_expert_gate"):  # LoRA, the router, the shared expert's gate
        assert any(kind in n for n in names), kind


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_tracks_float32_over_thirty_steps(
    case: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    moe = _moe(case, tmp_path_factory)
    assert main(["train", str(_recipe(tmp_path, moe, "bf16"))]) == 0
    assert main(["train", str(_recipe(tmp_path, moe, "f32", compute_dtype="float32"))]) == 0
    bf16, f32 = _losses(tmp_path / "bf16"), _losses(tmp_path / "f32")
    assert len(bf16) == len(f32) == 30
    assert f32[-1] < f32[0] - 0.2  # the run learns, so tracking it means something
    # bfloat16 rounds activations to 8 bits of mantissa; over 30 steps at lr 1e-2 the runs stay within 1%.
    assert bf16 == pytest.approx(f32, rel=1e-2)
    adapter = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert any("gate" in k and "lora" not in k for k in adapter)  # the router is saved, trained in float32
    assert {t.dtype for t in adapter.values()} == {torch.float32}


def test_float16_is_refused_with_what_to_use(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _recipe(tmp_path, tmp_path, "fp16")
    for overrides in (["quantization.compute_dtype=float16"], ["training.fp16=true"]):
        with pytest.raises(MoeifyError, match="float16 training .* Use compute_dtype: bfloat16 .* or float32"):
            load_recipe(path, overrides)
    with pytest.raises(MoeifyError, match="training.bf16: false with quantization.compute_dtype: bfloat16"):
        load_recipe(path, ["training.bf16=false"])
