"""Gradient accumulation trains what one batch trains: batch 1 x accumulation 4 against batch 4 x accumulation 1
gives the same logged losses, grad norms and adapter, on the newest transformers and on the oldest moeify claims
(5.16.1, whose Trainer divides by the accumulation steps on other conditions than later releases). With chat data
and `assistant_only_loss` the turns hold unequal numbers of predicted tokens per block, so only a loss weighted by
tokens over the accumulated batch (as TRL's) matches one batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model, training_recipe

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

ROOT = Path(__file__).resolve().parents[1]
OLDEST = "5.16.1"

# Trains the recipe twice (batch 4, and batch 1 x 4 accumulation steps) and prints what both logged and saved.
_COMPARE = r"""
import json, sys
import yaml
from safetensors.torch import load_file
from moeify.cli import main

recipe = yaml.safe_load(open(sys.argv[1]))
result = {}
for name, batch, steps in (("batch", 4, 1), ("accumulated", 1, 4)):
    recipe["training"].update(per_device_train_batch_size=batch, gradient_accumulation_steps=steps)
    recipe["output"]["dir"] = f"{sys.argv[2]}/{name}"
    path = f"{sys.argv[2]}/{name}.yaml"
    open(path, "w").write(yaml.safe_dump(recipe))
    assert main(["train", path]) == 0
    history = json.load(open(f"{sys.argv[2]}/{name}/trainer_state.json"))["log_history"]
    adapter = load_file(f"{sys.argv[2]}/{name}/adapter_model.safetensors")
    result[name] = {
        "loss": [e["loss"] for e in history if "loss" in e],
        "grad_norm": [e["grad_norm"] for e in history if "loss" in e],
        "adapter": {k: v.flatten().tolist() for k, v in sorted(adapter.items())},
    }
print("RESULT " + json.dumps(result))
"""


def _moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    moe = tmp_path_factory.getbasetemp() / "accumulation-moe"
    if not moe.exists():
        dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
        convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    return moe


def _recipe(tmp_path: Path, moe: Path, data: dict) -> Path:
    # Adam turns float32 rounding in a near-zero gradient into a whole step of that element: at 1e-3 one such step
    # stays within the 1e-5 the adapters are compared at. The balancing loss is a per-batch statistic (as in
    # transformers and Megatron): a product of means, so a batch of 4 and four batches of 1 differ in it by
    # definition (it is weighed by the accumulation steps); it is off here.
    return training_recipe(tmp_path, "recipe", moe, data, max_steps=4, learning_rate=1e-3, moe={"aux_loss_coef": 0.0})


def _compare(python: Path | str, recipe: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [str(python), "-c", _COMPARE, str(recipe), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    batch, accumulated = result["batch"], result["accumulated"]
    assert len(batch["loss"]) == len(accumulated["loss"]) == 4
    assert accumulated["loss"] == pytest.approx(batch["loss"], rel=1e-5, abs=1e-5)
    assert accumulated["grad_norm"] == pytest.approx(batch["grad_norm"], rel=1e-5, abs=1e-5)
    assert batch["adapter"].keys() == accumulated["adapter"].keys() and batch["adapter"]
    for name, values in batch["adapter"].items():
        assert accumulated["adapter"][name] == pytest.approx(values, rel=1e-5, abs=1e-5), name


def _text(tmp_path: Path) -> dict:
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    return {"path": str(tmp_path / "corpus.jsonl")}


def _chat(tmp_path: Path, moe: Path) -> dict:
    """Conversations whose assistant turns run from one word to a whole prompt, packed into 16-token blocks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(moe)
    if not tokenizer.chat_template:
        tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        tokenizer.save_pretrained(moe)
    chats = []
    for i in range(40):
        reply = PROMPTS[(i + 1) % len(PROMPTS)]
        reply = reply.split()[0] if i % 3 == 0 else reply
        chats.append([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}, {"role": "assistant", "content": reply}])
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return {"path": str(tmp_path / "chat.jsonl"), "messages_field": "messages", "assistant_only_loss": True}


@pytest.mark.parametrize("data", ["text", "chat"])
def test_accumulation_equals_one_batch(data: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    moe = _moe(tmp_path_factory)
    recipe = _recipe(tmp_path, moe, _text(tmp_path) if data == "text" else _chat(tmp_path, moe))
    _compare(sys.executable, recipe, tmp_path)


@pytest.mark.slow
def test_accumulation_equals_one_batch_on_the_oldest_transformers(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from venvs import training_python

    moe = _moe(tmp_path_factory)
    _compare(training_python(OLDEST), _recipe(tmp_path, moe, _chat(tmp_path, moe)), tmp_path)
