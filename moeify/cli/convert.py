"""`moeify convert`: upcycle a dense model into an MoE (flags, routing flags, the run)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import MoeifyError


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    from ..convert.options import parse_null_experts

    settings = {key: getattr(args, flag) for flag, key in ROUTER_FLAGS.items() if getattr(args, flag) is not None}
    if "null_experts" in settings:
        settings["null_experts"] = parse_null_experts(settings["null_experts"])
    return settings


def run(args: argparse.Namespace) -> int:
    from ..convert.converter import convert
    from ..convert.options import ConvertOptions

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
        from ..io.hub import push_to_hub

        print(
            f"Pushed to {push_to_hub(result.output, args.push_to_hub, private=args.private, progress=not args.quiet)}"
        )
    return 0
