"""`moeify merge`: fold a trained LoRA adapter into full-precision weights."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into a model's full-precision weights",
        description="Merge the LoRA adapter ADAPTER (peft format) into BASE, tensor by tensor, and write OUT in "
        "BASE's own format. BASE is the full-precision MoE, or the 4-bit checkpoint written by save_4bit (experts "
        "are then dequantized, so OUT equals the trained model). Prints the max |logit difference| between OUT "
        "and the adapter model.",
    )
    p.add_argument("base", metavar="BASE", help="the model the adapter was trained on: folder or Hub id")
    p.add_argument("adapter", metavar="ADAPTER", help="peft LoRA adapter folder or Hub id")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="dtype of the merged weights (default: the base's)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip loading both models to compare logits (for models that do not fit in memory twice)",
    )
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (kept until the new one is done)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..merge import merge

    result = merge(
        args.base,
        args.adapter,
        args.output,
        dtype=args.dtype,
        overwrite=args.overwrite,
        check=not args.no_check,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
    )
    print(result.summary())
    return 0
