"""Where 4-bit experts stop using bitsandbytes' fused CPU kernel (`ExpertQuantization.cpu_fused_rows`): one
`Experts4bit` expert (H, I) without autograd, in bfloat16, for a number of rows, timed three ways:

- `dequantize`: `cpu_fused_rows=0`, the expert dequantized into the workspace and multiplied (the baseline, in the
  same run);
- `fused`: bitsandbytes' `gemv_4bit` on the packed-for-CPU layout, whatever the rows;
- `bf16`: the same expert in full precision through `experts_implementation="moeify"` (for scale: what 4-bit
  generation is measured against).

    python benchmarks/fused_4bit_rows.py [--rows 1 2 4 8 12 16 20 24 32] [--shapes H,I ...]

Printed: milliseconds of the dequantizing path, and `fused` and `bf16` as ratios to it (below 1.00x: faster), each
the median of `--repeats` rounds of `--calls` calls, the three alternating within each round; and whether the
default `cpu_fused_rows` takes the fused kernel at that row count. Then the same `fused / dequantize` ratios as one
row per expert shape, a column per row count. Needs a CPU with AVX512-BF16 (bitsandbytes registers the kernel there
only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402

# Mixtral-like (I = 3.5 H) and fine-grained (I / 4) experts at H 1024, and Gemma 3 270M's MLP.
SHAPES = ["1024,3584", "1024,896", "640,2048"]
NAMES = {(640, 2048): "Gemma 3 270M"}


def experts(h: int, i: int) -> dict[str, nn.Module]:
    """Two experts (H, I) three ways: 4-bit with `cpu_fused_rows=0`, 4-bit with every row count fused, and the
    same full-precision experts in bf16; the rows all go to the first."""
    from moeify.modeling import MoeifyConfig
    from moeify.modeling.experts import build_experts
    from moeify.quant import ExpertQuantization, Experts4bit

    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=1, num_attention_heads=8)
    config = MoeifyConfig(text_config=text, num_experts=2, num_experts_per_tok=1)
    config._experts_implementation = "moeify"
    full = build_experts(config)
    with torch.no_grad():
        for param in full.parameters():
            param.normal_(std=0.02)
    dequantize = Experts4bit.from_experts(full, ExpertQuantization(cpu_fused_rows=0)).bfloat16()
    fused = Experts4bit.from_experts(full, ExpertQuantization(cpu_fused_rows=1 << 30)).bfloat16()
    return {"dequantize": dequantize, "fused": fused, "bf16": full.bfloat16()}


def milliseconds(runs: dict[str, nn.Module], rows: int, calls: int, repeats: int) -> dict[str, float]:
    h = runs["bf16"].gate_up_proj.shape[-1]
    x = torch.randn(rows, h, dtype=torch.bfloat16)
    index, weights = torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1, dtype=torch.bfloat16)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the first round is a warm-up (and builds the fused layout)
            for name, module in runs.items():
                start = time.perf_counter()
                for _ in range(calls):
                    module(x, index, weights)
                if repeat:
                    times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 12, 16, 20, 24, 32])
    parser.add_argument("--shapes", nargs="*", default=SHAPES, help="H,I of one expert")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from moeify.quant.config import CPU_FUSED_ROWS
    from moeify.quant.experts_4bit import _cpu_fused_kernel

    if not _cpu_fused_kernel():
        parser.exit(1, "bitsandbytes has no fused 4-bit kernel on this CPU (it needs AVX512-BF16).\n")
    print(machine_summary(), f"bfloat16, default cpu_fused_rows {CPU_FUSED_ROWS}")
    print("\n| H | I | rows | dequantize ms | fused / dequantize | bf16 / dequantize | default takes fused |")
    print("|---|---|---:|---:|---:|---:|---|")
    fused: dict[tuple[int, int], list[str]] = {}
    for shape in args.shapes:
        h, i = (int(v) for v in shape.split(","))
        runs = experts(h, i)
        for rows in args.rows:
            ms = milliseconds(runs, rows, args.calls, args.repeats)
            base = ms["dequantize"]
            fused.setdefault((h, i), []).append(f"{ms['fused'] / base:.2f}x")
            print(
                f"| {h} | {i} | {rows} | {base:.3f} | {ms['fused'] / base:.2f}x | {ms['bf16'] / base:.2f}x | "
                f"{'yes' if rows <= CPU_FUSED_ROWS else 'no'} |",
                flush=True,
            )
    columns = [f"{rows} row{'s' if rows > 1 else ''}" if n == 0 else str(rows) for n, rows in enumerate(args.rows)]
    print("\nfused / dequantize:\n\n| H, I | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for (h, i), ratios in fused.items():
        name = f" ({NAMES[h, i]})" if (h, i) in NAMES else ""
        print(f"| {h}, {i}{name} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
