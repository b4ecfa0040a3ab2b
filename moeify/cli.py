"""The `moeify` command line: parses, reports, and hands work to the library (it converts nothing itself)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MoeifyError


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="upcycle a dense model into an MoE",
        description="Upcycle a dense causal LM (folder, Hub id org/name[@rev], or .gguf) into an MoE.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="checkpoint folder, Hub id org/name[@revision], or .gguf file (or give it as --base)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--num-experts", type=int, metavar="E", help="routed experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, metavar="K", help="experts used per token (default 2)")
    p.add_argument("--shared-experts", type=int, default=0, metavar="S", help="shared experts (default 0)")
    p.add_argument("--layers", default="all", metavar="SPEC", help="MoE layers: all, every:2, 0-11,14 (default all)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "native", "moeify"],
        help="native transformers class when exact, or moeify's own (default auto)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="output dtype (default: the source's)",
    )
    p.add_argument(
        "--router-init",
        default="random",
        choices=["random", "zeros", "kmeans", "prompts"],
        help="router weights: random (default), zeros, kmeans centroids of the router inputs on --calibration, or "
        "prompts (--expert-prompts)",
    )
    p.add_argument(
        "--calibration",
        metavar="DATA",
        help="with --router-init kmeans: text (Hub dataset, local text/json/jsonl/parquet/csv, folder of .txt, "
        "builtin:python-docstrings)",
    )
    p.add_argument("--calibration-tokens", type=int, default=2048, metavar="N", help="calibration tokens (2048)")
    p.add_argument(
        "--expert-prompts",
        metavar="FILE.yaml",
        help="with --router-init prompts: per expert, positive (and negative) prompts (mergekit style)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random router (default 0)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    p.add_argument(
        "--layout",
        default=None,
        choices=["per-expert", "fused"],
        help="native formats: tensors per expert (default; what serving engines read) or fused 3-D "
        "(faster to load); the moeify format is always fused",
    )
    p.add_argument("--revision", default=None, help="Hub revision of SOURCE")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the source's own code to run")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle (.bin/.pt) weights when there are no safetensors (unpickling can run code)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (kept until the new one is done)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload OUT to this Hub repository after")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--granularity",
        type=int,
        default=1,
        metavar="G",
        help="fine-grained experts: each is 1/G of the FFN, E/G replicas of the G slices (E, K multiples of G; exact)",
    )
    p.add_argument(
        "--shared-expert-size",
        type=int,
        metavar="N",
        help="each shared expert is the FFN's first N neurons and the routed experts share the rest (exact; default: "
        "shared experts are full copies and the routed output is halved)",
    )
    p.add_argument(
        "--method",
        choices=["copy", "lora-experts"],
        default="copy",
        help="copy: each expert a full copy of the FFN (default); lora-experts: the experts share the frozen FFN and "
        "each adds its own LoRA delta, B = 0 (MixLoRA; exact; moeify format)",
    )
    p.add_argument("--expert-lora-rank", type=int, default=16, metavar="R", help="lora-experts: delta rank (16)")
    p.add_argument("--expert-lora-alpha", type=float, metavar="A", help="lora-experts: LoRA alpha (default 2 * R)")
    p.add_argument(
        "--lora-expert",
        dest="lora_expert_sources",
        action="append",
        default=[],
        metavar="ADAPTER",
        help="lora-experts, repeat: expert e's delta starts as the e-th peft LoRA adapter's FFN LoRA (same base)",
    )
    x = p.add_argument_group("experts from several models (Branch-Train-MiX / FrankenMoE; not exact)")
    x.add_argument(
        "--expert",
        dest="expert_sources",
        action="append",
        default=[],
        metavar="SOURCE",
        help="repeat: expert e's FFN from the e-th fine-tune of the base (--num-experts defaults to their number)",
    )
    x.add_argument("--base", metavar="SOURCE", help="the base model: config, tokenizer and non-FFN weights (= SOURCE)")
    x.add_argument(
        "--merge-non-ffn",
        choices=["base", "average"],
        default="base",
        help="non-FFN weights from the base (default) or averaged over the --expert sources",
    )
    g = p.add_argument_group("upcycling transforms (not exact at step 0: verify reports the deviation)")
    g.add_argument(
        "--split",
        choices=["random", "kmeans"],
        help="partition the FFN's neurons into E disjoint experts (MoEfication / LLaMA-MoE) instead of copying it",
    )
    g.add_argument(
        "--drop-upcycling",
        type=float,
        metavar="R",
        help="re-initialise round(R * d_ff) neurons of each expert (Drop-Upcycling; 0.5 in the paper)",
    )
    g.add_argument(
        "--drop-independent",
        action="store_true",
        help="with --drop-upcycling: draw the neurons of gate, up and down independently (the paper's code)",
    )
    g.add_argument("--expert-noise", type=float, default=0.0, metavar="STD", help="relative Gaussian noise per expert")
    _add_router_flags(p)


# `moeify convert` flag -> key of the router section (`moeify.RouterConfig`); unset flags keep its defaults.
ROUTER_FLAGS = {
    "router_scoring": "scoring",
    "normalize_top_k": "normalize",
    "routed_scaling_factor": "scaling_factor",
    "router_network": "network",
    "router_hidden_size": "mlp_hidden_size",
    "noisy_top_k": "noisy_top_k",
    "router_jitter": "jitter",
    "capacity_factor": "capacity_factor",
    "aux_loss_coef": "aux_loss_coef",
    "z_loss_coef": "z_loss_coef",
    "bias_update_rate": "bias_update_rate",
    "null_experts": "null_experts",
    "gating_residual": "gating_residual",
}


def _add_router_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing (moeify format; --format auto picks it when one is set)")
    g.add_argument("--router-scoring", choices=["softmax", "sigmoid"], help="expert scores (default softmax)")
    g.add_argument(
        "--no-normalize-top-k",
        dest="normalize_top_k",
        action="store_const",
        const=False,
        help="keep the raw top-k scores instead of renormalising them to sum to 1 (not exact at step 0)",
    )
    g.add_argument("--routed-scaling-factor", type=float, metavar="F", help="scale routed weights (default 1)")
    g.add_argument("--router-network", choices=["linear", "mlp"], help="linear, or Linear-Tanh-Linear (default linear)")
    g.add_argument("--router-hidden-size", type=int, metavar="N", help="hidden width of the mlp router (default 256)")
    g.add_argument("--noisy-top-k", action="store_const", const=True, help="learned noise on the logits in training")
    g.add_argument("--router-jitter", type=float, metavar="EPS", help="training: router inputs * U(1-EPS, 1+EPS)")
    g.add_argument("--capacity-factor", type=float, metavar="CF", help="training: at most CF*k*T/E tokens per expert")
    g.add_argument("--aux-loss-coef", type=float, metavar="C", help="load-balancing loss weight (default 0.001)")
    g.add_argument("--z-loss-coef", type=float, metavar="C", help="router z-loss weight (default 0)")
    g.add_argument("--bias-update-rate", type=float, metavar="U", help="aux-loss-free balancing step (default off)")
    g.add_argument("--null-experts", metavar="SPEC", help="MoE++ zero-computation experts: zero=N,copy=N,constant=N")
    g.add_argument("--gating-residual", action="store_const", const=True, help="MoE++ gating residual between layers")


def router_options(args: argparse.Namespace) -> dict[str, Any]:
    """The router settings given on the command line (keys of `moeify.RouterConfig`)."""
    from .convert.options import parse_null_experts

    settings = {key: getattr(args, flag) for flag, key in ROUTER_FLAGS.items() if getattr(args, flag) is not None}
    if "null_experts" in settings:
        settings["null_experts"] = parse_null_experts(settings["null_experts"])
    return settings


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload a converted model to the Hugging Face Hub",
        description="Create the Hub repository REPO (if needed) and upload every file of OUT, model card included.",
    )
    p.add_argument("output", metavar="OUT", help="a folder written by moeify convert")
    p.add_argument("repo", metavar="REPO", help="Hub repository id, org/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (default main)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_verify(sub: argparse._SubParsersAction) -> None:
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


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="summarise a model: experts, total and active parameters, size",
        description="Architecture, MoE layers, experts, top-k, total and active parameters, sizes.",
    )
    p.add_argument("model", metavar="MODEL", help="folder, Hub id or .gguf")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def _add_merge(sub: argparse._SubParsersAction) -> None:
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


def _add_train(sub: argparse._SubParsersAction) -> None:
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss, perplexity and router statistics of a model",
        description="Loss and perplexity of MODEL (+ ADAPTER) on DATA (packed blocks), per MoE layer the expert "
        "load, its coefficient of variation and the router entropy; with --baseline the dense model's figures.",
    )
    _add_eval_data(p)
    p.add_argument("--baseline", default=None, metavar="DENSE", help="a dense model evaluated on the same tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_route_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "route-stats",
        help="how each MoE layer routes tokens: expert shares, load CV, entropy, drops; a heatmap",
        description="Run MODEL (+ ADAPTER) on DATA and print, per MoE layer, each expert's share of the assignments, "
        "the load's coefficient of variation, the busiest expert's share, the router entropy, dropped assignments "
        "and the share of MoE++ null experts. --plot draws the shares as a heatmap (layers x experts).",
    )
    _add_eval_data(p)
    p.add_argument("--plot", default=None, metavar="PNG", help="write a heatmap of expert shares (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_eval_data(p: argparse.ArgumentParser) -> None:
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
        help="evaluate the blocks moeify train held out with data.eval_fraction=FRACTION (and --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="training.seed of that run (default 0)")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `moeify` command."""
    parser = argparse.ArgumentParser(
        prog="moeify", description="Upcycle dense Hugging Face LMs into Mixture-of-Experts."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_verify(sub)
    _add_info(sub)
    _add_push(sub)
    _add_merge(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_route_stats(sub)
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    from .convert.converter import convert
    from .convert.options import ConvertOptions

    if args.base and args.source and args.base != args.source:
        raise MoeifyError(f"SOURCE {args.source} and --base {args.base} differ; give the base once.")
    source = args.source or args.base
    if source is None:
        raise MoeifyError("give the dense model to upcycle: SOURCE (or --base SOURCE with --expert).")
    num_experts = args.num_experts
    if args.expert_sources and num_experts is None:
        num_experts = len(args.expert_sources)
    options = ConvertOptions(
        num_experts=8 if num_experts is None else num_experts,
        top_k=args.top_k,
        shared_experts=args.shared_experts,
        layers=args.layers,
        format=args.format,
        dtype=args.dtype,
        router_init=args.router_init,
        calibration=args.calibration,
        calibration_tokens=args.calibration_tokens,
        expert_prompts=args.expert_prompts,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        layout=args.layout,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        router=router_options(args),
        granularity=args.granularity,
        shared_expert_size=args.shared_expert_size,
        method=args.method,
        expert_lora_rank=args.expert_lora_rank,
        expert_lora_alpha=args.expert_lora_alpha,
        lora_expert_sources=args.lora_expert_sources,
        split=args.split,
        expert_sources=args.expert_sources,
        merge_non_ffn=args.merge_non_ffn,
        drop_upcycling=args.drop_upcycling,
        drop_independent=args.drop_independent,
        expert_noise=args.expert_noise,
    )
    result = convert(source, args.output, options, progress=not args.quiet)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.summary())
    if args.push_to_hub:
        from .io.hub import push_to_hub

        print(
            f"Pushed to {push_to_hub(result.output, args.push_to_hub, private=args.private, progress=not args.quiet)}"
        )
    return 0


def _run_push(args: argparse.Namespace) -> int:
    from .io.hub import push_to_hub

    url = push_to_hub(args.output, args.repo, private=args.private, revision=args.revision, progress=not args.quiet)
    print(f"Pushed {args.output} to {url}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from .inspect.verify import verify

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


def _run_info(args: argparse.Namespace) -> int:
    from .inspect.info import format_info, model_info

    info = model_info(args.model, trust_remote_code=args.trust_remote_code)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from .merge.fold import merge

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


def _run_train(args: argparse.Namespace) -> int:
    from .train.recipe import defaults_yaml, load_recipe

    if args.print_defaults:
        print(defaults_yaml(), end="")
        return 0
    if args.recipe is None:
        raise MoeifyError("give a RECIPE file (see --print-defaults for every key).")
    overrides = [*args.overrides, *(["training.resume_from_checkpoint=true"] if args.resume else [])]
    recipe = load_recipe(args.recipe, overrides)
    if args.dry_run:
        from .train.dry_run import describe

        print(describe(recipe), end="")
        return 0
    from .train.run import train

    metrics = train(recipe)
    print(f"Trained: adapter, checkpoints and train_results.json in {recipe.output.dir}")
    print(json.dumps(metrics, indent=2))
    return 0


def _evaluate(args: argparse.Namespace, baseline: str | None = None) -> dict[str, Any]:
    """`moeify.train.evaluate.evaluate` with the arguments `eval` and `route-stats` share."""
    from .train.evaluate import evaluate

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
        experts=args.experts,
        linear=args.linear,
    )


def _run_eval(args: argparse.Namespace) -> int:
    from .train.evaluate import format_report

    result = _evaluate(args, baseline=args.baseline)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _run_route_stats(args: argparse.Namespace) -> int:
    from .inspect.router_stats import format_table, plot_heatmap

    result = _evaluate(args)["model"]
    if "layers" not in result:
        raise MoeifyError(f"{args.model} has no MoE layers (no router was found): nothing to show.")
    print(json.dumps(result) if args.json else format_table(result["layers"]))
    if args.plot:
        adapter = f" + {Path(args.adapter).name}" if args.adapter else ""
        title = f"{Path(args.model).name}{adapter}: {Path(args.data).name}"
        print(f"heatmap: {plot_heatmap(result['layers'], args.plot, title)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moeify` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE overrides after an option: `moeify train R.yaml --dry-run lora.r=8`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    runners = {
        "convert": _run_convert,
        "verify": _run_verify,
        "info": _run_info,
        "push": _run_push,
        "merge": _run_merge,
        "train": _run_train,
        "eval": _run_eval,
        "route-stats": _run_route_stats,
    }
    try:
        return runners[args.command](args)
    except MoeifyError as err:
        print(f"moeify {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moeify {args.command}: interrupted; nothing was left half-written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
