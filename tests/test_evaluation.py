"""`moeify eval` against a hand computation: the loss is the model's own mean loss over the blocks, the expert
loads are the top-k picks of the routers' logits (which Mixtral returns with `output_router_logits=True`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, DENSE_FOLDER, PROMPTS, build_dense, build_tokenizer, dense_model
from transformers import AutoModelForCausalLM

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.data.text import build_datasets
from moeify.train.recipe import DataRecipe


def test_eval_numbers_equal_a_hand_computation(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    dense = dense_model("llama", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2), progress=False, log=lambda _: None)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 3))

    capsys.readouterr()
    args = ["eval", str(moe), "--data", str(corpus), "--max-length", "12", "--max-blocks", "5", "--batch-size", "2"]
    assert main([*args, "--baseline", str(dense), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    blocks, _ = build_datasets(DataRecipe(path=str(corpus), max_length=12, eval_fraction=0.0), build_tokenizer())
    ids = torch.tensor(blocks["input_ids"][:5])
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(ids, labels=ids, output_router_logits=True)
        dense_loss = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(ids, labels=ids).loss
    ce = out.loss - model.router_aux_loss_coef * out.aux_loss  # the model adds its aux loss; eval reports CE
    assert result["model"]["loss"] == pytest.approx(float(ce), abs=1e-5)
    assert result["model"]["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert result["model"]["tokens"] == 5 * 11
    assert result["baseline"]["loss"] == pytest.approx(float(dense_loss), abs=1e-5)
    assert result["model"]["loss"] == pytest.approx(result["baseline"]["loss"], abs=1e-4)  # upcycling is exact

    layers = result["model"]["layers"]
    assert len(layers) == len(out.router_logits)
    for layer, logits in zip(layers, out.router_logits, strict=True):
        counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=4).double()
        assert layer["tokens_per_expert"] == [int(c) for c in counts]
        assert sum(layer["tokens_per_expert"]) == 5 * 12 * 2  # every token, k = 2 slots
        assert layer["load_cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()), abs=1e-6)
        assert layer["busiest_share"] == pytest.approx(float(counts.max() / counts.sum()), abs=1e-6)
        probs = torch.softmax(logits.float(), dim=-1)
        assert layer["entropy"] == pytest.approx(float(-(probs * probs.log()).sum(-1).mean()), abs=1e-5)
        assert 0 < layer["entropy"] <= math.log(4) + 1e-6

    assert main(args) == 0  # the table
    table = capsys.readouterr().out
    assert "perplexity" in table and "load CV" in table and "model.layers.0.mlp.gate" in table


def test_eval_of_a_trained_adapter_loads_4bit_experts_as_training_did(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """`moeify eval --adapter RUN` builds the model the run trained (4-bit experts and linears, LoRA, trained routers
    and shared-expert gate), so its held-out loss is the trainer's final `eval_loss`; `--experts none` is the
    full-precision base with the same adapter, which differs by the quantization error."""
    import yaml

    config = ARCHITECTURES["qwen2"]()
    config.initializer_range = 0.3  # logits of a few units, so 4-bit rounding moves the loss visibly
    dense = build_dense("qwen2", tmp_path / "dense", config=config)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = {
        "model": {"path": str(moe)},
        "quantization": {"experts": "nf4", "linear": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "expert_r": 2},
        "moe": {"aux_loss_coef": 0.0},  # eval_loss is then the cross-entropy alone, as `moeify eval` reports
        "data": {"path": str(corpus), "max_length": 16, "eval_fraction": 0.25, "eval_seed": 5},
        "training": {
            "per_device_train_batch_size": 2,
            "max_steps": 6,
            "learning_rate": 3e-2,
            "seed": 3,
            "report_to": "none",
            "disable_tqdm": True,
            "save_strategy": "no",
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    trained = json.loads((tmp_path / "run" / "train_results.json").read_text())["eval_loss"]

    capsys.readouterr()
    args = ["eval", str(moe), "--data", str(corpus), "--adapter", str(tmp_path / "run"), "--max-length", "16"]
    args += ["--held-out", "0.25", "--seed", "5", "--max-blocks", "1000", "--json"]
    assert main(args) == 0
    as_trained = json.loads(capsys.readouterr().out)["model"]
    assert as_trained["loss"] == pytest.approx(trained, abs=1e-5)

    assert main([*args, "--experts", "none", "--linear", "none"]) == 0
    full = json.loads(capsys.readouterr().out)["model"]
    assert full["tokens"] == as_trained["tokens"]
    assert abs(full["loss"] - as_trained["loss"]) > 1e-3  # 4-bit rounding of every expert and linear weight


def test_eval_storage_errors(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from moeify.quant import ExpertQuantization, load_for_training, save_4bit

    dense = dense_model("llama", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    data = ["--data", str(corpus), "--max-length", "12", "--max-blocks", "2"]
    capsys.readouterr()
    assert main(["eval", str(dense), *data, "--experts", "nf4"]) == 2
    assert "not an MoE with fused experts (LlamaForCausalLM)" in capsys.readouterr().err

    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2), progress=False, log=lambda _: None)
    saved = save_4bit(load_for_training(moe, ExpertQuantization(quant_type="nf4")), tmp_path / "moe-4bit")
    assert main(["eval", str(saved), *data]) == 2
    assert f"no tokenizer in {saved} (tokenizer_config.json)" in capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(moe / name, saved / name)
    assert main(["eval", str(saved), *data, "--experts", "fp4"]) == 2
    assert "stores its experts in nf4; they cannot be evaluated as fp4" in capsys.readouterr().err
    assert main(["eval", str(saved), *data, "--json"]) == 0  # a 4-bit checkpoint loads as stored
    assert json.loads(capsys.readouterr().out)["model"]["tokens"] == 2 * 11
