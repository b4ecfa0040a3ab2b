"""Where `experts_implementation="moeify"`'s CPU pieces copy a weight gradient's left operand row-major
(`moeify.kernels.cpu_experts._write_or_add`): one `grad.T @ rows` product per expert, as backward forms it,
timed three ways against the transposed view it gets as it comes (the baseline, measured in the same run):

- `row-major`: the same product on a row-major copy made beforehand (what the layout alone is worth);
- `with copy`: the copy made inside the timing, as `_write_or_add` does (what moeify gets);
- `rule`: whether `_write_or_add` takes the copy at this dtype, row count and column count.

    python benchmarks/weight_grad_layout.py [--dtype bfloat16] [--rows 32 128 256 512] [--shapes OUT,COLUMNS ...]

Printed as time ratios to the transposed view (below 1.00x: faster), each the median of `--repeats` rounds over
`--experts` products, the variants alternating within each round. CPU only: the pieces run on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402

# gate_up (2I, H) and down (H, I) weight gradients at H 1024 for I 896 / 3584, and narrower ones (H 640, H 512).
SHAPES = ["1792,1024", "7168,1024", "1024,896", "1024,3584", "4096,640", "1536,512"]


def ratios(out: int, columns: int, rows: int, dtype: torch.dtype, experts: int, repeats: int) -> dict[str, float]:
    """Median seconds of `row-major` and `with copy` over the transposed view, for products `(out, rows) @ (rows,
    columns)` written into one `(out, columns)` target."""
    torch.manual_seed(0)
    grads = [torch.randn(rows, out, dtype=dtype) for _ in range(experts)]  # each left operand is grads[e].T
    copies = [g.T.contiguous() for g in grads]
    rights = [torch.randn(rows, columns, dtype=dtype) for _ in range(experts)]
    target = torch.empty(out, columns, dtype=dtype)

    def transposed() -> None:
        for grad, right in zip(grads, rights, strict=True):
            torch.mm(grad.T, right, out=target)

    def row_major() -> None:
        for copy, right in zip(copies, rights, strict=True):
            torch.mm(copy, right, out=target)

    def with_copy() -> None:
        for grad, right in zip(grads, rights, strict=True):
            copy = torch.empty(out, rows, dtype=dtype)
            copy.T.copy_(grad)  # as `_write_or_add` writes it
            torch.mm(copy, right, out=target)

    runs = {"transposed": transposed, "row-major": row_major, "with copy": with_copy}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats + 1):  # the first round is a warm-up
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["transposed"])
    return {name: statistics.median(values) / base for name, values in times.items() if name != "transposed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="*", default=[32, 128, 256, 512], help="the inner dimension")
    parser.add_argument("--shapes", nargs="*", default=SHAPES, help="OUT,COLUMNS of the weight gradient")
    parser.add_argument("--experts", type=int, default=16, help="products per round")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    from moeify.kernels import cpu_experts as expert_kernels

    dtype = getattr(torch, args.dtype)
    print(machine_summary(), f"device cpu, {dtype}")
    print(
        f"\nrule (`_write_or_add`): copies in bfloat16 over <= {expert_kernels.CPU_ROW_MAJOR_ROWS} rows into >= "
        f"{expert_kernels.CPU_ROW_MAJOR_COLUMNS} columns"
    )
    print("\n| out x columns | rows | row-major / transposed | with copy / transposed | rule copies |")
    print("|---|---:|---:|---:|---|")
    for shape in args.shapes:
        out, columns = (int(v) for v in shape.split(","))
        for rows in args.rows:
            got = ratios(out, columns, rows, dtype, args.experts, args.repeats)
            copies = expert_kernels._row_major_pays(dtype, rows, columns)
            print(
                f"| {out} x {columns} | {rows} | {got['row-major']:.2f}x | {got['with copy']:.2f}x | "
                f"{'yes' if copies else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
