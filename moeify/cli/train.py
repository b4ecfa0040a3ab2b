"""`moeify train`: fine-tune from a recipe (or print its defaults, or a dry run)."""

from __future__ import annotations

import argparse
import json

from ..errors import MoeifyError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune an upcycled MoE from a YAML recipe",
        description="Fine-tune an MoE from RECIPE (YAML), with KEY=VALUE overrides (training.learning_rate=1e-4). "
        "--print-defaults shows every key with its default; --dry-run checks the recipe and estimates memory "
        "without loading weights.",
    )
    p.add_argument("recipe", metavar="RECIPE", nargs="?", help="recipe YAML file")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="dotted overrides, values parsed as YAML")
    p.add_argument("--print-defaults", action="store_true", help="print the whole recipe schema with defaults")
    p.add_argument("--dry-run", action="store_true", help="check the recipe, count parameters, estimate memory")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of output.dir")


def run(args: argparse.Namespace) -> int:
    from ..train.recipe import defaults_yaml, load_recipe

    if args.print_defaults:
        print(defaults_yaml(), end="")
        return 0
    if args.recipe is None:
        raise MoeifyError("give a RECIPE file (see --print-defaults for every key).")
    overrides = [*args.overrides, *(["training.resume_from_checkpoint=true"] if args.resume else [])]
    recipe = load_recipe(args.recipe, overrides)
    if args.dry_run:
        from ..train.dry_run import describe

        print(describe(recipe), end="")
        return 0
    from ..train.run import train

    try:
        metrics = train(recipe)
    finally:
        _leave_process_group()
    print(f"Trained: adapter, checkpoints and train_results.json in {recipe.output.dir}")
    print(json.dumps(metrics, indent=2))
    return 0


def _leave_process_group() -> None:
    """End this process's part in a distributed run before the interpreter exits: a gloo or NCCL process group
    left to the interpreter's teardown can abort the process ("terminate called without an active exception") while
    the main process is still writing results or merging."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
