"""One MoE block, forward + backward: transformers' Mixtral block against moeify's, every implementation, side by side.

    python benchmarks/moe_block.py [--grid cpu|full] [--shapes H,I,E,K,T ...] [--dtype float32|bfloat16]
                                   [--reps 3] [--variants ...] [--ratios A/B,...] [--memory] [--faults] [--decode]
                                   [--profile N]

For each shape (hidden H, expert intermediate I, experts E, top-k K, tokens T), each variant times
`y = block(x); (y * g).sum().backward()` with a fixed random `g`, in interleaved rounds (below); the median of
`--reps` rounds. Variants:

  tf-eager, tf-grouped_mm   transformers' `MixtralSparseMoeBlock`, `experts_implementation` eager / grouped_mm
  moeify                    moeify's `MoeifySparseMoeBlock` as it runs by default: `experts_implementation="moeify"`
                            (one expert's GEMMs at a time on the CPU, transformers' grouped_mm elsewhere)
  moeify-moeify_grouped     the same block with moeify's opt-in `experts_implementation="moeify_grouped"`: one
                            autograd function of grouped GEMMs on every device (the candidate for accelerators)
  moeify-<impl>             the same block with transformers' experts implementation <impl> (eager, grouped_mm,
                            batched_mm: the same fused weights, dispatched by transformers)
  moeify-nf4                moeify's block with its 4-bit experts (`Experts4bit`, NF4, double quant)
  moeify-nf4-dequant        the same with `cpu_fused_rows=0`: every expert dequantized, even for a few rows (the
                            baseline of bitsandbytes' fused CPU kernel in `--decode`; not run unless named)
  tf-grouped_mm+peft-lora   peft `target_parameters` LoRA (r16) on the transformers block's experts (peft forms
                            `W + delta` for every expert every forward)
  moeify-nf4+lora           moeify's 4-bit experts with per-expert LoRA (r16) inside the grouped dispatch
  moeify-frozen+lora        moeify's full-precision frozen experts (`ExpertsFrozen`) with the same in-dispatch LoRA:
                            the counterpart of tf-grouped_mm+peft-lora (same weights, same trainable factors)
  ideal                     the compute floor: T*K rows through one dense FFN of the expert's shape (two matmuls
                            forward and their backward), no routing, no dispatch

Every variant routes with its own router (a linear layer, softmax top-k) and trains what its setting trains: all
weights for the full-precision blocks, the LoRA factors (and input) with LoRA, the input and router for 4-bit.
Printed: time per fwd+bwd, its ratio to tf-grouped_mm and to ideal (where they run), the max |output difference| from
tf-eager (the
same function: float noise for the full-precision variants, quantization error for 4-bit, 0 for LoRA at init; not
applicable to ideal. In bf16 / fp16 it can reach the size of an expert's output: moeify's router scores in float32,
transformers' gate in the model dtype, so a few near-tied tokens pick different experts, e.g. 5 of 4096 at E 8 / K 2);
with `--memory`, the peak of live tensor bytes during one more run (`torch.cuda.max_memory_allocated` on CUDA; the
profiler's memory timeline on CPU); with `--faults`, the process's minor page faults during one more run
(`getrusage`, Unix): on the CPU, memory the C allocator mapped afresh and the kernel zero-filled page by page, the
cost the CPU dispatch is built to avoid; with `--profile N`, after the table, each variant's N costliest operators
in one more fwd+bwd (`torch.profiler`, by self time on the device: where a variant spends what the table sums up).
`--ratios A/B,C/D` adds a second table, one row per dtype and shape, with the ratio of variant A's median time to
variant B's, and so on (e.g. `moeify/tf-grouped_mm,moeify/ideal`): the first table's medians, side by side per shape.
The cpu grid is the issue's grid cut to what 2 cores finish in minutes (H 1024); `--grid full` is the issue's.
`--decode`: generation's case instead, forward only under `torch.no_grad()` for 1 and 4 tokens (the grid's T is
ignored), timed over 20 calls per rep. Every shape builds all its variants first and then times them in rounds, each
round running every variant once in turn (after one warm-up round), so a machine whose speed drifts during the run
moves all variants alike; the median of `--reps` rounds is printed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402

LORA_RANK = 16
ALL_VARIANTS = (
    "tf-eager",
    "tf-grouped_mm",
    "moeify",
    "moeify-moeify_grouped",
    "moeify-eager",
    "moeify-grouped_mm",
    "moeify-batched_mm",
    "moeify-nf4",
    "tf-grouped_mm+peft-lora",
    "moeify-nf4+lora",
    "moeify-frozen+lora",
    "ideal",
)


def grid(name: str) -> list[tuple[int, int, int, int, int]]:
    """(H, I, E, K, T) shapes; I is Mixtral's ratio (3.5 H) and the fine-grained quarter of it."""
    hidden = [1024] if name == "cpu" else [1024, 2048, 4096]
    shapes = []
    for h, fine, e, k, t in itertools.product(hidden, (False, True), (8, 64), (2, 8), (256, 4096)):
        shapes.append((h, int(3.5 * h) // (4 if fine else 1), e, k, t))
    return shapes


def mixtral_block(h: int, i: int, e: int, k: int, impl: str, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=k)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block.to(device=device, dtype=dtype)


def moeify_block(reference: nn.Module, impl: str) -> nn.Module:
    """moeify's block with `reference`'s router and expert weights (the same function as the Mixtral block)."""
    from transformers import LlamaConfig

    from moeify.modeling import MoeifyConfig
    from moeify.modeling.modeling_moeify import MoeifySparseMoeBlock

    experts = reference.experts
    e, two_i, h = experts.gate_up_proj.shape
    text = LlamaConfig(hidden_size=h, intermediate_size=two_i // 2, num_hidden_layers=1, num_attention_heads=8)
    config = MoeifyConfig(text_config=text, num_experts=e, num_experts_per_tok=reference.top_k)
    config._experts_implementation = impl
    block = MoeifySparseMoeBlock(config).to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
    with torch.no_grad():
        block.router.weight.copy_(reference.gate.weight)
        block.experts.gate_up_proj.copy_(experts.gate_up_proj)
        block.experts.down_proj.copy_(experts.down_proj)
    return block


class _DispatchBlock(nn.Module):
    """moeify's router and 4-bit (or frozen full-precision) experts, optionally with per-expert LoRA factors handed
    to the dispatch."""

    def __init__(self, full: nn.Module, lora: bool, frozen: bool = False, fused_rows: int | None = None) -> None:
        super().__init__()
        from moeify.quant import ExpertQuantization, Experts4bit, ExpertsFrozen
        from moeify.quant.dispatch import LoraFactors

        self.router = full.router
        self.router.requires_grad_(not lora)
        settings = ExpertQuantization() if fused_rows is None else ExpertQuantization(cpu_fused_rows=fused_rows)
        self.experts = ExpertsFrozen(full.experts) if frozen else Experts4bit.from_experts(full.experts, settings)
        self.factors: dict[str, LoraFactors] = {}
        if lora:
            e = self.experts.num_experts
            for name, (out_dim, in_dim) in self.experts.shapes.items():
                a = nn.Parameter(torch.randn(e * LORA_RANK, in_dim, device=full.router.weight.device) * in_dim**-0.5)
                b = nn.Parameter(torch.zeros(out_dim, e * LORA_RANK, device=a.device))
                self.register_parameter(f"{name}_lora_A", a)
                self.register_parameter(f"{name}_lora_B", b)
                self.factors[name] = LoraFactors(a, b, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = self.router(flat)
        factors = {
            n: f._replace(lora_A=f.lora_A.to(x.dtype), lora_B=f.lora_B.to(x.dtype)) for n, f in self.factors.items()
        }
        return self.experts(flat, index, weights, factors).view_as(x)


class _PeftLoraBlock(nn.Module):
    """peft's `target_parameters` LoRA on a transformers block: only the LoRA factors train."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        holder = nn.Module()
        holder.block = block
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            target_modules=[],
            target_parameters=["block.experts.gate_up_proj", "block.experts.down_proj"],
        )
        self.model = get_peft_model(holder, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.base_model.model.block(x)


class _Ideal(nn.Module):
    """T*K rows through one dense FFN of an expert's shape: what the experts compute, without routing."""

    def __init__(self, h: int, i: int, k: int, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        self.k = k
        self.gate_up = nn.Parameter(torch.randn(2 * i, h, dtype=dtype, device=device) * 0.02)
        self.down = nn.Parameter(torch.randn(h, i, dtype=dtype, device=device) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).repeat_interleave(self.k, dim=0)
        gate, up = (rows @ self.gate_up.T).chunk(2, dim=-1)
        return ((nn.functional.silu(gate) * up) @ self.down.T).view(*x.shape[:-1], self.k, -1).sum(-2)


def build(variant: str, reference: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> nn.Module:
    h, i, e, k, _ = shape
    if variant.startswith("tf-"):
        impl = variant.removeprefix("tf-").removesuffix("+peft-lora")
        block = copy.deepcopy(reference)
        block.experts.config = copy.copy(block.experts.config)
        block.experts.config._experts_implementation = impl
        return _PeftLoraBlock(block) if variant.endswith("+peft-lora") else block
    if variant == "ideal":
        return _Ideal(h, i, k, dtype, device)
    per_token_weights = shape[4] * k * 3 * h * i * reference.experts.gate_up_proj.element_size()
    if variant == "moeify-batched_mm" and per_token_weights > 4 << 30:
        raise ValueError("batched_mm would materialise > 4 GiB of per-token expert weights (it is for decoding)")
    if variant.startswith(("moeify-nf4", "moeify-frozen")):
        full = moeify_block(reference, "grouped_mm")
        return _DispatchBlock(
            full,
            lora=variant.endswith("+lora"),
            frozen=variant.startswith("moeify-frozen"),
            fused_rows=0 if variant == "moeify-nf4-dequant" else None,
        )
    return moeify_block(reference, variant.removeprefix("moeify-"))


def output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = module(x)
    return y[0] if isinstance(y, tuple) else y


def decode_seconds(module: nn.Module, x: torch.Tensor, sync: Callable[[], None], calls: int = 20) -> float:
    """Seconds per forward call without autograd, as generation runs the block."""
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            output(module, x)
        sync()
    return (time.perf_counter() - start) / calls


def fwd_bwd_seconds(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, sync: Callable[[], None]) -> float:
    """Seconds of one forward + backward; gradients are dropped after, so no variant holds any between runs."""
    sync()
    start = time.perf_counter()
    output(module, x).backward(grad)
    sync()
    seconds = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    x.grad = None
    return seconds


def interleaved_medians(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """Median seconds of each variant over `reps` rounds after a warm-up round, every round running each variant
    once in turn: a machine that speeds up or slows down during the benchmark moves every variant alike, so the
    ratios hold better than with all of one variant's runs back to back."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps + 1):  # the first round is a warm-up
        for name, run in runs.items():
            seconds = run()
            if rep:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_bytes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Live tensor bytes at the peak of one fwd+bwd (parameters included)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        output(module, x).backward(grad)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    # The profiler's memory timeline is the CPU's only account of every live tensor (no max_memory_allocated).
    with torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        output(module, x).backward(grad)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(s) for s in sizes)


def page_faults(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Minor page faults of this process during one fwd+bwd (a 2 MiB huge page counts once)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fwd_bwd_seconds(module, x, grad, lambda: None)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=["cpu", "full"], default=None, help="default: cpu without a GPU, else full")
    parser.add_argument("--shapes", nargs="*", help="explicit shapes H,I,E,K,T (replace the grid)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: fp32 CPU, bf16 GPU")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument(
        "--ratios",
        default="",
        metavar="A/B,...",
        help="also a table of these ratios of median times per shape (A and B among --variants)",
    )
    parser.add_argument("--memory", action="store_true", help="also the peak of live tensor bytes")
    parser.add_argument("--faults", action="store_true", help="also the minor page faults of one fwd+bwd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", action="store_true", help="forward only, 1 and 4 tokens (generation)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also each variant's N costliest ops")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shapes]
        if args.shapes
        else grid(args.grid or ("full" if device == "cuda" else "cpu"))
    )
    variants = args.variants.split(",")
    if args.decode:  # generation: no LoRA training variants, T of 1 and 4
        variants = [v for v in variants if "lora" not in v]
        shapes = list(dict.fromkeys((h, i, e, k, t) for h, i, e, k, _ in shapes for t in (1, 4)))
    ratios = [tuple(pair.split("/")) for pair in args.ratios.split(",") if pair]
    for pair in ratios:
        if len(pair) != 2 or not set(pair) <= set(variants):
            parser.error(f"--ratios: {'/'.join(pair)} is not A/B with A and B among the variants run")
    print(machine_summary(), f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {dtype}")
    if (args.faults or args.profile) and args.decode:
        parser.error("--faults and --profile look at a fwd+bwd; --decode times forward only")
    profiles: list[str] = []
    baselines = [name for name in ("tf-grouped_mm", "ideal") if name in variants]
    extra_columns = [name for name, on in (("peak MiB", args.memory), ("minor faults", args.faults)) if on]
    columns = ["forward ms" if args.decode else "fwd+bwd ms", *(f"/ {b}" for b in baselines), "max diff"]
    columns += extra_columns
    print("\n| H | I | E | K | T | variant | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|" + "---:|" * len(columns))
    per_shape: list[tuple[tuple[int, ...], dict[str, float]]] = []
    for shape in shapes:
        h, i, e, k, t = shape
        torch.manual_seed(args.seed)
        reference = mixtral_block(h, i, e, k, "grouped_mm", dtype, device)
        x = torch.randn(1, t, h, dtype=dtype, device=device, requires_grad=True)
        grad = torch.randn(1, t, h, dtype=dtype, device=device)
        with torch.no_grad():
            expected = output(build("tf-eager", reference, shape, dtype, device), x)
        modules: dict[str, nn.Module] = {}
        diffs: dict[str, float] = {}
        for variant in variants:
            try:
                modules[variant] = module = build(variant, reference, shape, dtype, device)
            except Exception as err:  # noqa: BLE001 (a variant this shape or device cannot build: say so, go on)
                failed = f"n/a: {type(err).__name__}: {err}"
                print(f"| {h} | {i} | {e} | {k} | {t} | {variant} | {failed} |" + " |" * (len(columns) - 1))
                continue
            with torch.no_grad():
                diffs[variant] = float((output(module, x) - expected).abs().max()) if variant != "ideal" else math.nan
        runs = {
            variant: (
                functools.partial(decode_seconds, module, x.detach(), sync)
                if args.decode
                else functools.partial(fwd_bwd_seconds, module, x, grad, sync)
            )
            for variant, module in modules.items()
        }
        medians = interleaved_medians(runs, args.reps)
        results: dict[str, tuple[float, float, list[str]]] = {}
        for variant, module in modules.items():
            extra = [f"{peak_bytes(module, x, grad) / 2**20:.0f}"] if args.memory else []
            extra += [f"{page_faults(module, x, grad)}"] if args.faults else []
            results[variant] = medians[variant], diffs[variant], extra
            if args.profile:
                profiles.append(f"\n{shape} {variant}\n{operator_table(module, x, grad, sync, args.profile)}")
        del modules, runs
        for variant, (seconds, diff, extra) in results.items():
            cells = [f"{seconds * 1e3:.1f}", *(_ratio(seconds, medians.get(b, math.nan)) for b in baselines)]
            cells += [f"{diff:.1e}", *extra]
            print(f"| {h} | {i} | {e} | {k} | {t} | {variant} | " + " | ".join(cells) + " |", flush=True)
        per_shape.append((shape, medians))
    if ratios:
        print("\n| dtype | H | I | E | K | T | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
        print("|---|---|---|---|---|---|" + "---:|" * len(ratios))
        name = str(dtype).removeprefix("torch.")
        for shape, medians in per_shape:
            cells = [_ratio(medians.get(a, math.nan), medians.get(b, math.nan)) for a, b in ratios]
            print(f"| {name} | " + " | ".join(map(str, (*shape, *cells))) + " |", flush=True)
    print(*profiles, sep="\n")


def operator_table(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, sync: Callable[[], None], rows: int) -> str:
    """The `rows` operators of one fwd+bwd with the most self time on the device (the CPU's own time on a CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        output(module, x).backward(grad)
        sync()
    module.zero_grad(set_to_none=True)
    x.grad = None
    key = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _ratio(seconds: float, baseline: float) -> str:
    """`seconds / baseline` as a table cell; "-" where either was not run (a variant this shape cannot build)."""
    return "-" if math.isnan(baseline) or math.isnan(seconds) else f"{seconds / baseline:.2f}x"


if __name__ == "__main__":
    main()
