"""`moeify route-stats`: how the routers spread tokens over experts, per layer (table or heatmap)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MoeifyError
from .evaluate import add_data_arguments, evaluate_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "route-stats",
        help="how each MoE layer routes tokens: expert shares, load CV, entropy, drops; a heatmap",
        description="Run MODEL (+ ADAPTER) on DATA and print, per MoE layer, each expert's share of the assignments, "
        "the load's coefficient of variation, the busiest expert's share, the router entropy, dropped assignments "
        "and the share of MoE++ null experts. --plot draws the shares as a heatmap (layers x experts).",
    )
    add_data_arguments(p)
    p.add_argument("--plot", default=None, metavar="PNG", help="write a heatmap of expert shares (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..inspect.router_stats import format_table, plot_heatmap

    result = evaluate_args(args)["model"]
    if "layers" not in result:
        raise MoeifyError(f"{args.model} has no MoE layers (no router was found): nothing to show.")
    print(json.dumps(result) if args.json else format_table(result["layers"]))
    if args.plot:
        adapter = f" + {Path(args.adapter).name}" if args.adapter else ""
        title = f"{Path(args.model).name}{adapter}: {Path(args.data).name}"
        print(f"heatmap: {plot_heatmap(result['layers'], args.plot, title)}", file=sys.stderr)
    return 0
