"""`moeify train` through accelerate's FSDP2 (recipes/accelerate/fsdp2.yaml) on the GPUs of this machine: a tiny
random Qwen2 upcycled to 4 experts, 4-bit experts + LoRA in bfloat16, a few steps; prints the logged losses.

accelerate turns FSDP on only over an accelerator backend, so the CPU tests shard with torch's `fully_shard`
directly (tests/test_quant_fsdp.py); this is the accelerate path, for scripts/device-checks.sh.

    python scripts/fsdp2_check.py [--processes N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=None, help="default: every visible GPU")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    import torch
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import PROMPTS, dense_model

    from moeify.convert.converter import convert
    from moeify.convert.options import ConvertOptions

    processes = args.processes or max(1, torch.cuda.device_count())
    work = args.work or Path(tempfile.mkdtemp(prefix="moeify-fsdp2-"))
    shutil.rmtree(work / "run", ignore_errors=True)
    dense = dense_model("qwen2", work / "dense")
    moe = work / "moe"
    if not (moe / "config.json").exists():
        convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False)
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = {
        "model": {"path": str(moe)},
        "quantization": {"experts": "nf4", "compute_dtype": "bfloat16"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(work / "corpus.jsonl"), "max_length": 16, "eval_fraction": 0.0},
        "training": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_steps": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "report_to": "none",
            "save_strategy": "no",
        },
        "output": {"dir": str(work / "run")},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate/fsdp2.yaml"), "--num_processes", str(processes),
        "-m", "moeify.train", str(work / "recipe.yaml"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(command, env=env)
    if proc.returncode != 0:
        return proc.returncode
    history = json.loads((work / "run" / "trainer_state.json").read_text())["log_history"]
    print("FSDP2 losses:", [entry["loss"] for entry in history if "loss" in entry])
    return 0


if __name__ == "__main__":
    sys.exit(main())
