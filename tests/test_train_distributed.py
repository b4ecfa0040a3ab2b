"""`accelerate launch` of `python -m moeify.train` on two CPU processes (gloo) with recipes/accelerate/ddp.yaml:
the same global batch gives the same losses as one process, 4-bit experts + LoRA included.

FSDP2 through accelerate is not tested here: accelerate 1.15 turns FSDP on only over an accelerator backend (its
state.py upgrades MULTI_GPU-like types to FSDP, never MULTI_CPU). `fully_shard` itself runs on CPU with 4-bit
experts in tests/test_quant_fsdp.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model

from moeify.cli import main
from moeify.converter import convert
from moeify.plan import ConvertOptions

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, moe: Path, name: str, batch: int) -> Path:
    recipe = {
        "model": {"path": str(moe)},
        "quantization": {"experts": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(tmp_path / "corpus.jsonl"), "max_length": 16, "eval_fraction": 0.0},
        "training": {
            "per_device_train_batch_size": batch,
            "max_steps": 6,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "report_to": "none",
            "disable_tqdm": True,
            "save_strategy": "no",
        },
        "output": {"dir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _losses(folder: Path) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not on PATH")
def test_ddp_on_two_processes_matches_one_process(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))

    assert main(["train", str(_recipe(tmp_path, moe, "one", batch=4))]) == 0
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))  # gloo: accelerate's multi-CPU mode
    command = [
        shutil.which("accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "recipes/accelerate/ddp.yaml"),
        "-m",
        "moeify.train",
        str(_recipe(tmp_path, moe, "two", batch=2)),
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):  # all-reduced gradients vs one batch: float32 rounding only
        assert b == pytest.approx(a, rel=1e-4)
    assert two[0] == pytest.approx(one[0], rel=1e-6)  # the same first global batch, before any update
    # Two processes of batch 2 went through the data as fast as one of batch 4: the data was sharded, not repeated.
    epochs = [json.loads((tmp_path / n / "trainer_state.json").read_text())["epoch"] for n in ("one", "two")]
    assert epochs[0] == pytest.approx(epochs[1])
    assert (tmp_path / "two" / "adapter_model.safetensors").exists()


@pytest.mark.skipif(
    not os.environ.get("MOEIFY_DEEPSPEED_PYTHON"),
    reason="needs MOEIFY_DEEPSPEED_PYTHON: a Python with deepspeed and moeify (deepspeed is not a dependency)",
)
def test_deepspeed_zero3_trains_4bit_experts_like_one_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """DeepSpeed ZeRO-3 on two CPU processes (its CPU accelerator): the losses of one process."""
    python = os.environ["MOEIFY_DEEPSPEED_PYTHON"]
    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    assert main(["train", str(_recipe(tmp_path, moe, "one", batch=4))]) == 0
    command = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate/deepspeed-zero3.yaml"),
        "-m",
        "moeify.train",
        str(_recipe(tmp_path, moe, "two", batch=2)),
    ]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        assert b == pytest.approx(a, rel=1e-4)
