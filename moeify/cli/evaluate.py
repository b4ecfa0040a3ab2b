"""`moeify eval`: held-out loss and perplexity of a model (with an adapter, against a baseline)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss, perplexity and router statistics of a model",
        description="Loss and perplexity of MODEL (+ ADAPTER) on DATA (packed blocks), per MoE layer the expert "
        "load, its coefficient of variation and the router entropy; with --baseline the dense model's figures.",
    )
    add_data_arguments(p)
    p.add_argument("--baseline", default=None, metavar="DENSE", help="a dense model evaluated on the same tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The model, adapter and data arguments `eval` and `route-stats` share."""
    p.add_argument("model", metavar="MODEL", help="model folder or Hub id")
    p.add_argument("--data", required=True, help="Hub dataset id, local text/json/jsonl/parquet/csv, or builtin:NAME")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a peft LoRA adapter to apply (moeify train's)")
    p.add_argument("--text-field", default="text", help="the data column holding text (default text)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per block (default 512)")
    p.add_argument("--max-blocks", type=int, default=64, help="blocks evaluated, the first of DATA (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per forward (default 4)")
    p.add_argument(
        "--held-out",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="evaluate the blocks moeify train held out with data.eval_fraction=FRACTION (and --seed, --eval-split)",
    )
    p.add_argument("--seed", type=int, default=0, help="data.eval_seed of that run (default 0)")
    p.add_argument(
        "--eval-split",
        default="documents",
        choices=["documents", "blocks"],
        help="data.eval_split of that run: held-out documents or blocks (default documents)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["bfloat16", "float16", "float32"],
        help="weights' dtype; with 4-bit experts, the compute dtype (default float32)",
    )
    for name, what in (("experts", "routed experts"), ("linear", "attention and other linear layers")):
        p.add_argument(
            f"--{name}",
            default=None,
            choices=["nf4", "fp4", "none"],
            help=f"{what}: 4-bit or full precision (default: as ADAPTER's moeify train run stored them, else none)",
        )


def evaluate_args(args: argparse.Namespace, baseline: str | None = None) -> dict[str, Any]:
    """`moeify.train.evaluate.evaluate` with the arguments `eval` and `route-stats` share."""
    from ..train.evaluate import evaluate

    return evaluate(
        args.model,
        args.data,
        adapter=args.adapter,
        baseline=baseline,
        text_field=args.text_field,
        max_length=args.max_length,
        max_blocks=args.max_blocks,
        batch_size=args.batch_size,
        dtype=args.dtype,
        held_out=args.held_out,
        seed=args.seed,
        eval_split=args.eval_split,
        experts=args.experts,
        linear=args.linear,
    )


def run(args: argparse.Namespace) -> int:
    from ..train.evaluate import format_report

    result = evaluate_args(args, baseline=args.baseline)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
