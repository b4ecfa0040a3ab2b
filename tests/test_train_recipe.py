"""Training recipes: every mistake is caught before any model is loaded, with the key, the expected type and, for a
misspelled key, the nearest valid one; `--print-defaults` prints a recipe that reads back as the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moeify.cli import main
from moeify.errors import MoeifyError
from moeify.train.recipe import Recipe, defaults_yaml, load_recipe

GOOD = {"model": {"path": "out/moe"}, "data": {"path": "corpus.jsonl"}}


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"training": {"lerning_rate": 1e-4}},
            "training.lerning_rate: not a TrainingArguments field: did you mean `learning_rate`?",
        ),
        ({"lora": {"alhpa": 16}}, "`lora.alhpa`: unknown key: did you mean `alpha`?"),
        ({"modle": {"path": "x"}}, "`modle`: unknown key: did you mean `model`?"),
        ({"lora": {"r": "sixteen"}}, "lora.r: expected an integer, got a string 'sixteen'."),
        ({"lora": {"r": True}}, "lora.r: expected an integer, got a boolean True."),
        (
            {"quantization": {"experts": "int3"}},
            "quantization.experts: expected one of nf4, fp4, none, got a string 'int3'.",
        ),
        (
            {"lora": {"targets": ["attention", "mlp"]}},
            "lora.targets: expected a list of one of attention, experts, shared_experts",
        ),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate: expected a number, got a string 'fast'."),
        ({"training": {"max_steps": 1.5}}, "training.max_steps: expected an integer, got a number 1.5."),
        ({"training": {"lr_scheduler_type": "wobbly"}}, "training.lr_scheduler_type: wobbly is not a valid"),
        (
            {"model": {"path": None, "source": "dense", "convert": {"num_expert": 4}}},
            "model.convert.num_expert: not a `moeify convert` setting: did you mean `num_experts`?",
        ),
        ({"model": {"convert": {"num_experts": 4}}}, "model.convert: only used with model.source"),
        ({"data": {"path": ""}}, "data.path: missing"),
        ({"model": {"path": None}}, "model: give exactly one of `path`"),
        ({"data": {"eval_fraction": 1.5}}, "data.eval_fraction: must be in [0, 1)"),
        ({"data": {"eval_blocks": 0}}, "data.eval_blocks: must be at least 1"),
        ({"moe": {"router_warmup_steps": -1}}, "moe.router_warmup_steps: must be 0 or more"),
        ({"lora": None}, "lora: null (full fine-tuning) needs quantization.experts and .linear set to none."),
        (
            {"model": {"path": "/no/such/moe"}},
            "model.path '/no/such/moe' is neither a local folder nor a Hub id (org/name or org/name@revision).",
        ),
        (
            {"model": {"path": None, "source": "runs/dense/model"}},
            "model.source 'runs/dense/model' is neither a local folder nor a Hub id",
        ),
    ],
)
def test_recipe_errors_say_what_to_fix(change: dict, message: str, tmp_path: Path) -> None:
    recipe = {**GOOD}
    for section, values in change.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    with pytest.raises(MoeifyError) as caught:
        load_recipe(write(tmp_path, recipe))
    assert message in str(caught.value)


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, GOOD),
        [
            "training.learning_rate=1e-4",
            "lora.r=8",
            "lora=null",
            "quantization.experts=none",
            "quantization.linear=none",
            "output.push_to_hub=me/model",
        ],
    )
    assert recipe.training["learning_rate"] == 1e-4 and recipe.lora is None
    assert recipe.quantization.experts == "none" and recipe.output.push_to_hub == "me/model"
    recipe = load_recipe(write(tmp_path, GOOD), ["lora.alpha=16"])
    assert recipe.lora is not None and recipe.lora.alpha == 16.0 and isinstance(recipe.lora.alpha, float)
    with pytest.raises(MoeifyError, match="is not KEY=VALUE"):
        load_recipe(write(tmp_path, GOOD), ["learning_rate"])


def test_printed_defaults_read_back_as_the_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-defaults"]) == 0
    printed = capsys.readouterr().out
    assert printed == defaults_yaml()
    assert "learning_rate" in printed and "# rank" in printed
    path = tmp_path / "defaults.yaml"
    path.write_text(printed)
    recipe = load_recipe(path, ["model.path=out/moe", "data.path=corpus.jsonl"])
    expected = Recipe()
    expected.model.path, expected.data.path = "out/moe", "corpus.jsonl"
    assert recipe == expected


def test_cli_recipe_error_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {**GOOD, "training": {"lerning_rate": 1e-4}})
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeify train: error: training.lerning_rate") and len(err.splitlines()) == 1
    missing = tmp_path / "no" / "such" / "moe"
    path = write(tmp_path, {**GOOD, "model": {"path": str(missing)}, "output": {"dir": str(tmp_path / "run")}})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"model.path '{missing}' is neither a local folder nor a Hub id" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # nothing written


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_dry_run_counts_what_load_for_training_trains_and_reads_no_weight(
    arch: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch
    from tiny_models import DENSE_FOLDER, dense_model

    from moeify.convert.converter import convert
    from moeify.convert.options import ConvertOptions
    from moeify.io import checkpoint
    from moeify.quant import ExpertLoraConfig, load_for_training
    from moeify.train.dry_run import estimate

    dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = tmp_path / "moe"
    convert(str(dense), out, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    recipe = load_recipe(write(tmp_path, {**GOOD, "model": {"path": str(out)}}), ["lora.r=4", "lora.expert_r=2"])

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("--dry-run read a weight")

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.SafetensorsCheckpoint, "get", no_reading)
        patched.setattr(checkpoint.SafetensorsCheckpoint, "read_into", no_reading)
        result = estimate(recipe)
        path = write(tmp_path, {**GOOD, "model": {"path": str(out)}})
        assert main(["train", str(path), "--dry-run", "lora.r=4"]) == 0
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "peak memory estimate" in printed and "learning_rate" in printed
    # The fused CPU kernel's layouts: the packed experts' bytes and their bfloat16 scales, within the budget.
    from moeify.quant import Experts4bit

    loaded = load_for_training(out, gradient_checkpointing=False)
    stored = [t for m in loaded.modules() if isinstance(m, Experts4bit) for n, t in m.named_parameters()]
    packed = sum(t.numel() * t.element_size() for t in stored)
    assert packed < result.fused_layout_bytes <= 2 * packed and "fused 4-bit kernel's layouts" in printed

    from peft import LoraConfig

    from moeify.quant.loading import _default_targets

    model = load_for_training(
        out,
        lora=ExpertLoraConfig(r=2, alpha=32),
        gradient_checkpointing=False,
        dtype=torch.bfloat16,
        attention_lora=None,
    )
    del model  # the defaults give r=16 attention LoRA; build the r=4 one the recipe asks for
    base = load_for_training(
        out,
        lora=ExpertLoraConfig(r=2, alpha=32),
        gradient_checkpointing=False,
        dtype=torch.bfloat16,
        attention_lora=LoraConfig(r=4, lora_alpha=32, target_modules=_default_targets(_meta_model(out), "lora")),
    )
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    total = sum(
        p.numel()
        for n, p in base.get_base_model().named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    )
    assert result.trainable_params == trainable
    from moeify.inspect.info import model_info

    assert result.total_params == model_info(str(out))["total_params"]
    assert result.total_params > trainable
    stored = sum(
        t.numel() * t.element_size()
        for n, t in base.get_base_model().state_dict().items()
        if "lora_" not in n and "modules_to_save" not in n and "original_module" not in n
    )
    assert 0.8 < result.weights_bytes / stored < 1.25, (result.weights_bytes, stored, total)


def _meta_model(folder: Path):  # noqa: ANN202
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


LLAMA_31_8B = dict(  # meta-llama/Llama-3.1-8B's config.json (shape fields), so the test needs no download
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
)


def test_shipped_recipes_are_valid_and_the_qlora_one_fits_80_gb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import re

    root = Path(__file__).resolve().parents[1] / "recipes"
    for recipe in sorted(root.glob("*.yaml")):
        load_recipe(recipe)  # every shipped recipe passes validation as it is
    source = tmp_path / "llama-3.1-8b"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(LLAMA_31_8B))
    capsys.readouterr()
    assert main(["train", str(root / "qlora-single-gpu.yaml"), f"model.source={source}", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    total = int(re.search(r"of ([\d,]+) \(", printed).group(1).replace(",", ""))
    assert 46e9 < total < 48e9  # 8 experts of Llama 3.1 8B's MLP: about 47B parameters
    estimate = float(re.search(r"peak memory estimate\s+([\d.]+) GiB", printed).group(1))
    assert estimate < 80, printed


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({}, True),
        ({"gradient_checkpointing": False}, False),
        ({"activation_checkpointing": False}, False),  # the name transformers 5.25 gives it
        ({"activation_checkpointing": True, "gradient_checkpointing": False}, True),  # the new name wins
    ],
)
def test_checkpointing_key_under_either_name(training: dict, expected: bool) -> None:
    from moeify.train.recipe import wants_checkpointing

    assert wants_checkpointing(Recipe(training=training)) is expected


def test_evaluation_batch_defaults_to_the_training_batch(tmp_path: Path) -> None:
    """transformers evaluates 8 sequences at a time whatever the training batch: a run that trains with batch 1 to
    fit would then evaluate with 8 times its tokens."""
    from moeify.train.recipe import trainer_settings

    recipe = load_recipe(write(tmp_path, {**GOOD, "training": {"per_device_train_batch_size": 1}}))
    assert trainer_settings(recipe)["per_device_eval_batch_size"] == 1
    recipe = load_recipe(
        write(tmp_path, GOOD), ["training.per_device_train_batch_size=2", "training.per_device_eval_batch_size=6"]
    )
    assert trainer_settings(recipe)["per_device_eval_batch_size"] == 6
