"""Whether a shared expert should run inside moeify's CPU experts dispatch: the shared expert as moeify's block runs
it (`MoeifySharedExperts`: three `nn.Linear` over every token) against the same FFN as one more group of the
dispatch (every row routed to it at weight 1, `experts_implementation="moeify"`'s per-expert loop), forward +
backward, steps alternating (median of `--repeats`).

    python benchmarks/shared_expert.py [--dtype bfloat16] [--shapes H,I,T ...] [--repeats 7]

Whether folding shared experts into the dispatch is faster: the ratio printed is dispatch / dense.
CPU only: the per-expert loop is the dispatch moeify runs on the CPU (accelerators run transformers' grouped_mm).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402

SHAPES = ["1024,3584,4096", "1024,896,4096", "1024,3584,256"]


def steps(hidden: int, inner: int, tokens: int, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One forward + backward of the shared FFN as a dense MLP and as a group of the dispatch (the same weights)."""
    from moeify.kernels.cpu_experts import _pieces, _PiecewiseExperts
    from moeify.modeling.experts import sort_by_expert

    torch.manual_seed(0)
    gate, up, down = (nn.Linear(*shape, bias=False).to(dtype) for shape in ((hidden, inner),) * 2 + ((inner, hidden),))
    act = nn.SiLU()
    gate_up = nn.Parameter(torch.cat([gate.weight, up.weight]).detach().unsqueeze(0).clone())
    down_stacked = nn.Parameter(down.weight.detach().unsqueeze(0).clone())
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, hidden, dtype=dtype)
    index, weights = torch.zeros(tokens, 1, dtype=torch.long), torch.ones(tokens, 1, dtype=dtype)
    parameters = [gate.weight, up.weight, down.weight, gate_up, down_stacked, x]

    def dense() -> None:
        down(act(gate(x)) * up(x)).backward(grad)

    def dispatch() -> None:
        order, offsets, rows = sort_by_expert(index, 1)
        pieces = _pieces(offsets, 2 * inner * gate_up.element_size())
        out = _PiecewiseExperts.apply(
            x, weights.reshape(-1)[order], rows, pieces, act, gate_up, down_stacked, None, None, True
        )
        out.backward(grad)

    def cleared(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            step()
            for parameter in parameters:
                parameter.grad = None

        return run

    return {"dense": cleared(dense), "dispatch": cleared(dispatch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="H,I,T: hidden, shared expert intermediate, tokens")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(machine_summary())
    print(f"{args.dtype}, median of {args.repeats} alternating steps\n")
    print("| dtype | H | I | T | dense ms | dispatch ms | dispatch / dense |")
    print("|---|---|---|---|---:|---:|---:|")
    for shape in args.shapes:
        hidden, inner, tokens = (int(v) for v in shape.split(","))
        runs = steps(hidden, inner, tokens, dtype)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(args.repeats + 1):  # the first round warms up
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if i:
                    times[name].append(time.perf_counter() - start)
        dense, dispatch = (statistics.median(times[name]) for name in ("dense", "dispatch"))
        print(
            f"| {args.dtype} | {hidden} | {inner} | {tokens} | {dense * 1e3:.1f} | {dispatch * 1e3:.1f} "
            f"| {dispatch / dense:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
