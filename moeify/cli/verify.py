"""`moeify verify`: does the MoE compute what its dense source computes."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check an MoE against its dense model",
        description="Run both models on fixed real prompts; exit 0 if max |logit diff| <= tolerance.",
    )
    p.add_argument("dense", metavar="DENSE", help="dense model: folder, Hub id or .gguf")
    p.add_argument("moe", metavar="MOE", help="MoE model: folder or Hub id")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |logit difference| (default 1e-4)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["bfloat16", "float16", "float32"],
        help="dtype both models run in (default float32)",
    )
    p.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="also greedy-decode N tokens with both models and print them side by side",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the models' own code to run")


def run(args: argparse.Namespace) -> int:
    from ..inspect.verify import verify

    report, samples = verify(
        args.dense,
        args.moe,
        tolerance=args.tolerance,
        dtype=args.dtype,
        generate_tokens=args.generate,
        trust_remote_code=args.trust_remote_code,
    )
    print(report)
    for prompt, dense_text, moe_text in samples:
        print(f"\nprompt: {prompt!r}\n  dense: {dense_text!r}\n  moe:   {moe_text!r}")
        print("  greedy generations are identical" if dense_text == moe_text else "  greedy generations DIFFER")
    return 0 if report.passed or report.by_design else 1
