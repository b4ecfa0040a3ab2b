"""Whole-process memory of `moeify train` (4-bit experts and linears, LoRA, bfloat16): loading, each training step,
the final evaluation and saving, against the model's own size; then `moeify eval --adapter` of the run.

    python benchmarks/train_memory.py --model mixtral-353m          # a random 353M Mixtral (qlora_memory.py's)
    python benchmarks/train_memory.py --model tinyllama-6.45b       # TinyLlama-1.1B shape upcycled to 8 experts
    python benchmarks/train_memory.py --model small                 # a smoke run
    options: --steps 10 --batch 1 --tokens 64 --eval-batch B --eval-fraction 0.02
             --compute-dtype bfloat16|float32 --work DIR --json FILE

The run is `moeify train` itself (in a child process), on the standard library's docstrings
(`builtin:python-docstrings`, 2% held out for the final evaluation), checkpointing on, a log every step. A thread
samples the child's anonymous resident memory (RssAnon: heap and tensors) every 5 ms; Trainer callbacks cut the
samples into phases: loading (until training starts), each step, the final evaluation, saving. Reported per phase:
its peak, and against the model's size (the bytes of every tensor of the loaded model: 4-bit experts and linears,
bfloat16 embeddings and norms, float32 LoRA and routers), the peak minus that size. The target is the whole run's
peak <= the model's size + 1 GiB, and no growth from step to step after the optimizer's state exists (step 2).
Last, the run in one table row, in GiB: the model's size, the peak of loading, of step 1, of step 2, the range of
the later steps' peaks, the final evaluation, saving, and `moeify eval`'s loading / evaluation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GiB = 1024**3
MODELS = {"mixtral-353m": "Mixtral 353M", "tinyllama-6.45b": "TinyLlama-shaped 6.45B MoE", "small": "small Mixtral"}

# Runs in the child: `moeify train RECIPE` with phase marks around it.
_CHILD = r"""
import json, resource, sys, threading, time
from moeify.cli import main
from moeify.train import run

def anonymous():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) * 1024 for l in status if l.startswith("RssAnon:"))

phases, state = [], {"name": "load", "peak": 0}
def sample():
    while True:
        state["peak"] = max(state["peak"], anonymous())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()

def mark(next_name):
    state["peak"] = max(state["peak"], anonymous())
    phases.append((state["name"], state["peak"]))
    state["name"], state["peak"] = next_name, anonymous()

class Marks(run.TrainerCallback):
    def on_train_begin(self, args, st, control, model=None, **kwargs):
        seen, size = set(), 0
        for t in [*model.parameters(), *model.buffers()]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                size += t.untyped_storage().nbytes()
        phases.append(("model size", size))
        mark("step 1")
    def on_step_end(self, args, st, control, **kwargs):
        mark(f"step {st.global_step + 1}" if st.global_step < st.max_steps else "end of training")

init = run.MoeTrainer.__init__
def patched_init(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(Marks())
run.MoeTrainer.__init__ = patched_init
evaluate, save = run.MoeTrainer.evaluate, run.MoeTrainer.save_model
def patched_evaluate(self, *a, **k):
    if state["name"] == "end of training":
        mark("final evaluation")
    return evaluate(self, *a, **k)
def patched_save(self, *a, **k):
    mark("saving")
    return save(self, *a, **k)
run.MoeTrainer.evaluate, run.MoeTrainer.save_model = patched_evaluate, patched_save
if sys.argv[1] == "eval":  # `moeify eval ARGS...`: loading, then the evaluation itself
    from moeify.train import evaluate as evaluation
    measure = evaluation._measure
    def patched_measure(*a, **k):
        mark("evaluation")
        return measure(*a, **k)
    evaluation._measure = patched_measure
    code = main(sys.argv[1:])
else:
    code = main(["train", sys.argv[1]])
mark("done")
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PHASES " + json.dumps({"phases": phases, "ru_maxrss": maxrss}))
sys.exit(code)
"""


def _model(name: str, work: Path) -> Path:
    if name == "mixtral-353m" or name == "small":
        from qlora_memory import build

        folder = work / ("mixtral-small" if name == "small" else "mixtral-353m")
        build(folder, small=name == "small")
        if not (folder / "tokenizer.json").exists():
            common.save_small_tokenizer(folder)
        return folder
    dense = common.build_dense_llama(work / "dense-llama-tinyllama", common.llama_config())
    out = work / "moe-llama-8x"
    if not (out / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "moeify", "convert", str(dense), "-o", str(out), "--num-experts", "8", "--quiet"],
            check=True,
        )
    if not (out / "tokenizer.json").exists():
        common.save_small_tokenizer(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mixtral-353m", "tinyllama-6.45b", "small"], default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=None, help="default: the training batch (moeify's)")
    parser.add_argument("--eval-fraction", type=float, default=0.02, help="share of the blocks held out")
    parser.add_argument(
        "--compute-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="float32 on CPUs without native bfloat16 (no AVX512-BF16 / AMX), where bfloat16 matmuls crawl",
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moeify-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = _model(args.model, args.work)
    import yaml

    run_dir = args.work / f"train-memory-{args.model}"
    recipe = {
        "model": {"path": str(model)},
        "quantization": {"experts": "nf4", "linear": "nf4", "compute_dtype": args.compute_dtype},
        "lora": {"r": 16, "alpha": 32},
        "data": {"path": "builtin:python-docstrings", "max_length": args.tokens, "eval_fraction": args.eval_fraction},
        "training": {
            "per_device_train_batch_size": args.batch,
            **({"per_device_eval_batch_size": args.eval_batch} if args.eval_batch else {}),
            "max_steps": args.steps,
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": 0,
        },
        "output": {"dir": str(run_dir)},
    }
    path = args.work / f"train-memory-{args.model}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PHASES ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    result = json.loads(line.removeprefix("PHASES "))
    phases = dict(result["phases"])
    evaluated = _moeify_eval(model, run_dir, args)
    if evaluated is None:
        return 1
    size = phases.pop("model size")
    phases.pop("done", None)
    steps = [phases[f"step {i}"] for i in range(1, args.steps + 1) if f"step {i}" in phases]
    print(
        f"moeify train, {args.model}: {args.steps} steps of {args.batch} x {args.tokens} tokens, {args.compute_dtype},"
    )
    evaluation = f"evaluation batch {args.eval_batch or args.batch} on {args.eval_fraction:.1%} of the blocks"
    print(f"4-bit experts and linears, LoRA r 16, checkpointing, {evaluation};")
    print(common.machine_summary())
    print(f"model size (every tensor of the loaded model): {size / GiB:.2f} GiB")
    print("| phase | peak RssAnon (GiB) | peak - model size (GiB) |\n|---|---|---|")
    for name, peak in phases.items():
        print(f"| {name} | {peak / GiB:.2f} | {(peak - size) / GiB:+.2f} |")
    whole = max(phases.values())
    growth = (steps[-1] / steps[1]) if len(steps) > 2 else float("nan")
    print(f"whole run: peak RssAnon {whole / GiB:.2f} GiB = model size + {(whole - size) / GiB:.2f} GiB (target <= +1)")
    print(f"ru_maxrss (with file-backed pages) {result['ru_maxrss'] / GiB:.2f} GiB")
    print(f"step {len(steps)} peak / step 2 peak: {growth:.3f}x (target: no growth after step 2)")
    training_peak = max(steps)
    print(
        "moeify eval --adapter (its own process; experts and linears as trained): "
        f"loading {evaluated['load'] / GiB:.2f} GiB, evaluation {evaluated['evaluation'] / GiB:.2f} GiB; "
        "its peak / the training steps' peak: "
        f"{max(evaluated.values()) / training_peak:.3f}x (target <= 1)"
    )
    print(f"\n{ROW_HEADER}")
    print(summary_row(f"{MODELS[args.model]}, {args.compute_dtype}, {args.steps} steps", size, phases, evaluated))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"model_size": size, "phases": phases, "ru_maxrss": result["ru_maxrss"], "moeify_eval": evaluated}
            )
        )
    return 0


ROW_HEADER = (
    "| model | model size | load | step 1 | step 2 | later steps | final evaluation | saving "
    "| `moeify eval`: load / evaluation |\n|---|---|---|---|---|---|---|---|---|"
)


def summary_row(label: str, size: int, phases: dict[str, int], evaluated: dict[str, int]) -> str:
    """The run as one row under `ROW_HEADER`, in GiB ("-" for a phase the run did not have)."""

    def cell(*values: int) -> str:
        texts = sorted({f"{v / GiB:.2f}" for v in values}, key=float)
        return "-" if not texts else texts[0] if len(texts) == 1 else f"{texts[0]}-{texts[-1]}"

    steps = [peak for name, peak in phases.items() if name.startswith("step ")]
    cells = [cell(size), *(cell(*([phases[n]] if n in phases else [])) for n in ("load", "step 1", "step 2"))]
    cells += [cell(*steps[2:]), *(cell(*([phases[n]] if n in phases else [])) for n in ("final evaluation", "saving"))]
    cells.append(f"{cell(evaluated['load'])} / {cell(evaluated['evaluation'])}")
    return f"| {label} | " + " | ".join(cells) + " |"


def _moeify_eval(model: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, int] | None:
    """Peak RssAnon of `moeify eval MODEL --adapter RUN` on the run's held-out blocks, per phase."""
    command = ["eval", str(model), "--adapter", str(run_dir), "--data", "builtin:python-docstrings"]
    command += ["--max-length", str(args.tokens), "--held-out", str(args.eval_fraction), "--max-blocks", "1000"]
    command += ["--batch-size", str(args.eval_batch or args.batch), "--dtype", args.compute_dtype]
    proc = subprocess.run([sys.executable, "-c", _CHILD, *command], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PHASES ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stderr[-4000:], file=sys.stderr)
        return None
    phases = dict(json.loads(line.removeprefix("PHASES "))["phases"])
    return {"load": phases["load"], "evaluation": phases["evaluation"]}


if __name__ == "__main__":
    sys.exit(main())
