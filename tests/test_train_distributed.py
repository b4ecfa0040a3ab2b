"""`accelerate launch` of `python -m moeify train` on two CPU processes (gloo) with recipes/accelerate/ddp.yaml:
the same global batch gives the same losses as one process (4-bit experts + LoRA, and full fine-tuning of a model
with a gating residual, null experts and capacity); a model to upcycle is converted once; only the main process
writes the run's results; a NaN on one process stops both, naming the step.

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
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model, training_recipe

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

pytestmark = pytest.mark.slow  # several processes

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(__file__).resolve().parent / "launch_train.py"


def _failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: the lines that name an error (the launcher's own traceback, printed last, hides
    them), then the end."""
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if any(word in line for word in ("Error", "error:", "terminate", "Exception"))]
    return "\n".join(errors[:40]) + "\n...\n" + proc.stderr[-2000:]


needs_accelerate = pytest.mark.skipif(
    shutil.which("accelerate") is None, reason="the accelerate command is not on PATH"
)


def _launch(tmp_path: Path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` of tests/launch_train.py on two CPU processes (gloo, recipes/accelerate/ddp.yaml)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))
    command = [shutil.which("accelerate"), "launch", "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml")]
    return subprocess.run(
        [*command, str(LAUNCH), *arguments], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def _recipe(tmp_path: Path, moe: Path, name: str, batch: int) -> Path:
    data = {"path": str(tmp_path / "corpus.jsonl")}
    return training_recipe(tmp_path, name, moe, data, per_device_train_batch_size=batch, max_steps=6)


def _losses(folder: Path) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@needs_accelerate
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
        "moeify",
        "train",
        str(_recipe(tmp_path, moe, "two", batch=2)),
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _failure(proc)

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
        "moeify",
        "train",
        str(_recipe(tmp_path, moe, "two", batch=2)),
    ]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, _failure(proc)
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        assert b == pytest.approx(a, rel=1e-4)


@needs_accelerate
def test_full_fine_tuning_with_residual_null_experts_and_capacity_matches_one_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every parameter trains under DDP: the first MoE layer's gating-residual map, which no forward uses, is frozen
    (DDP stops on a parameter without a gradient). Capacity is per batch, so a factor that drops nothing here keeps
    two processes of batch 2 equal to one of batch 4 while the capacity code runs; the aux loss (a per-batch
    statistic) is off for the same reason."""
    dense = dense_model("llama", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    moe = tmp_path / "moe"
    router = {"gating_residual": True, "null_experts": {"zero": 1, "copy": 1, "constant": 1}, "capacity_factor": 4.0}
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, format="moeify", router=router), progress=False)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    full = ["lora=null", "quantization.experts=none", "quantization.compute_dtype=float32", "moe.aux_loss_coef=0"]
    assert main(["train", str(_recipe(tmp_path, moe, "one", batch=4)), *full]) == 0
    proc = _launch(tmp_path, str(_recipe(tmp_path, moe, "two", batch=2)), *full)
    assert proc.returncode == 0, _failure(proc)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-4)
    assert len(set(one)) == 6  # it trained


@needs_accelerate
def test_upcycled_once_and_only_the_main_process_writes_results(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = yaml.safe_load(_recipe(tmp_path, dense, "run", batch=2).read_text())
    recipe["model"] = {"source": str(dense), "convert": {"num_experts": 4, "top_k": 2}}
    recipe["output"]["merge"] = True
    recipe["training"]["max_steps"] = 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
    log = tmp_path / "record.log"
    proc = _launch(tmp_path, str(tmp_path / "run.yaml"), "--record", str(log), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, _failure(proc)
    assert log.read_text().splitlines() == ["convert 0"]  # rank 1 waited, converted nothing and wrote nothing
    run = tmp_path / "run"
    for name in ("train_results.json", "recipe.yaml", "README.md", "upcycled/config.json", "merged/config.json"):
        assert (run / name).exists(), name


@needs_accelerate
def test_a_nan_on_one_process_stops_both_naming_the_step(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Process 1's loss turns NaN at its third micro-batch: both processes stop at that step's optimizer step
    (no process waits in an all-reduce for one that raised), naming the step and the last complete checkpoint."""
    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2), progress=False)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = _recipe(tmp_path, moe, "nan", batch=2)
    proc = _launch(
        tmp_path,
        str(recipe),
        "--nan-on-rank",
        "1",
        "--at-call",
        "3",
        "training.save_steps=2",
        "training.save_strategy=steps",
        timeout=300,
    )
    assert proc.returncode != 0
    checkpoint = tmp_path / "nan" / "checkpoint-2"
    assert f"the training loss is nan at step 3; the last good checkpoint is {checkpoint}" in proc.stderr
    assert "the training loss is not finite on another process at step 3" in proc.stderr
    assert not (tmp_path / "nan" / "checkpoint-4").exists()
