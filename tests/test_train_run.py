"""`moeify train RECIPE` on a tiny upcycled MoE: transformers' Trainer with 4-bit experts + LoRA, loss falls, the
adapter lands in peft's layout, and `moeify merge` turns it into a full-precision model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model

from moeify.cli import main
from moeify.converter import convert
from moeify.plan import ConvertOptions


def test_thirty_steps_lower_the_loss_and_save_a_peft_adapter(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = {
        "model": {"path": str(moe)},
        "quantization": {"experts": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"path": str(corpus), "max_length": 16, "eval_fraction": 0.1},
        "training": {
            "per_device_train_batch_size": 4,
            "max_steps": 30,
            "learning_rate": 3e-2,
            "seed": 0,
            "logging_steps": 5,
            "save_steps": 15,
            "report_to": "none",
            "disable_tqdm": True,
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0

    run = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_results.json", "trainer_state.json"):
        assert (run / name).exists(), name
    assert (run / "checkpoint-30" / "trainer_state.json").exists()
    losses = [
        entry["loss"]
        for entry in json.loads((run / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    # A random tiny model's frozen LM head bounds its logits (|logit| < ~0.5): near ln(vocab) = 5.77 every drop counts.
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.05, losses
    results = json.loads((run / "train_results.json").read_text())
    assert "eval_loss" in results and results["train_runtime"] > 0
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["modules_to_save"] == ["gate", "shared_expert_gate"]
    assert sorted(adapter["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    capsys.readouterr()
    assert main(["merge", str(moe), str(run), "-o", str(tmp_path / "merged"), "--quiet"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out


def test_data_sources_and_their_errors(tmp_path: Path) -> None:
    from tiny_models import build_tokenizer
    from transformers import PreTrainedTokenizerFast

    from moeify.errors import MoeifyError
    from moeify.train.corpus import python_docstrings
    from moeify.train.data import build_datasets
    from moeify.train.recipe import DataRecipe

    tokenizer: PreTrainedTokenizerFast = build_tokenizer()
    texts = python_docstrings()
    assert len(texts) > 300 and texts == python_docstrings()  # the same corpus every time
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in PROMPTS * 4))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("\n".join(PROMPTS * 4))
    for path, field in (
        (tmp_path / "a.jsonl", "body"),
        (tmp_path / "docs", "text"),
        ("builtin:python-docstrings", "text"),
    ):
        train_set, eval_set = build_datasets(
            DataRecipe(path=str(path), text_field=field, max_length=8, eval_fraction=0.25), tokenizer, 0
        )
        assert eval_set is not None and len(train_set) > len(eval_set) > 0
        row = train_set[0]
        assert len(row["input_ids"]) == 8 and row["labels"] == row["input_ids"]
    bad = [
        (
            DataRecipe(path=str(tmp_path / "a.jsonl"), text_field="text"),
            "data.text_field 'text' is not a column; columns: body",
        ),
        (DataRecipe(path=str(tmp_path / "a.xlsx")), "does not exist"),
        (DataRecipe(path="builtin:poems"), "no such built-in corpus"),
        (
            DataRecipe(path=str(tmp_path / "a.jsonl"), text_field="body", max_length=100000),
            "no training block of 100000 tokens",
        ),
    ]
    for data, message in bad:
        with pytest.raises(MoeifyError, match=message):
            build_datasets(data, tokenizer, 0)
