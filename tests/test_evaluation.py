"""`moeify eval` against a hand computation: the loss is the model's own mean loss over the blocks, the expert
loads are the top-k picks of the routers' logits (which Mixtral returns with `output_router_logits=True`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import DENSE_FOLDER, PROMPTS, build_tokenizer, dense_model
from transformers import AutoModelForCausalLM

from moeify.cli import main
from moeify.converter import convert
from moeify.plan import ConvertOptions
from moeify.train.data import build_datasets
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

    blocks, _ = build_datasets(DataRecipe(path=str(corpus), max_length=12, eval_fraction=0.0), build_tokenizer(), 0)
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
