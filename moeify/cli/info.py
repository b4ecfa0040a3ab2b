"""`moeify info`: what a model is (dense or MoE), its experts and parameter counts."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="summarise a model: experts, total and active parameters, size",
        description="Architecture, MoE layers, experts, top-k, total and active parameters, sizes.",
    )
    p.add_argument("model", metavar="MODEL", help="folder, Hub id or .gguf")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def run(args: argparse.Namespace) -> int:
    from ..inspect.info import format_info, model_info

    info = model_info(args.model, trust_remote_code=args.trust_remote_code)
    print(json.dumps(info) if args.json else format_info(info))
    return 0
