"""`moeify train RECIPE` for `accelerate launch` in tests, with a probe on the processes:

- `python launch_train.py RECIPE`: the plain run;
- `--nan-on-rank R --at-call N`: process R's loss is NaN from its N-th micro-batch on (the others stay finite);
- `--record FILE`: every process appends to FILE the rank that runs `convert`, and any file a process other than
  the main one writes into output.dir (train_results.json, recipe.yaml, the model card, the merged model).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moeify.cli import main


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _poison(rank: int, at_call: int) -> None:
    from moeify.train import run

    original = run.causal_lm_loss_terms
    calls = [0]

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        terms = original(*args, **kwargs)
        if kwargs.get("router_loss", True) and args[0].training:
            calls[0] += 1
        if _rank() == rank and calls[0] >= at_call:
            return terms._replace(token_loss_sum=terms.token_loss_sum * float("nan"))
        return terms

    run.causal_lm_loss_terms = poisoned


def _record(log: Path, output_dir: Path) -> None:
    import moeify.convert.converter
    from moeify import merge as merge_module
    from moeify.train import run

    def note(line: str) -> None:
        with open(log, "a") as handle:
            handle.write(line + "\n")

    convert = moeify.convert.converter.convert

    def recorded_convert(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        note(f"convert {_rank()}")
        return convert(*args, **kwargs)

    moeify.convert.converter.convert = recorded_convert
    if _rank() == 0:
        return
    write_text = Path.write_text

    def guarded_write_text(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if output_dir in self.resolve().parents:
            note(f"write {_rank()} {self.name}")
        return write_text(self, *args, **kwargs)

    Path.write_text = guarded_write_text  # type: ignore[method-assign]
    merge = merge_module.merge

    def recorded_merge(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        note(f"merge {_rank()}")
        return merge(*args, **kwargs)

    merge_module.merge = recorded_merge
    card = run._model_card

    def recorded_card(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        note(f"card {_rank()}")
        return card(*args, **kwargs)

    run._model_card = recorded_card


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--nan-on-rank", type=int)
    parser.add_argument("--at-call", type=int, default=3)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--output-dir", type=Path)
    args, overrides = parser.parse_known_args()
    if args.nan_on_rank is not None:
        _poison(args.nan_on_rank, args.at_call)
    if args.record is not None:
        _record(args.record, args.output_dir.resolve())
    sys.exit(main(["train", args.recipe, *overrides]))
