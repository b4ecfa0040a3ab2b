"""What each routing feature costs, and what MoE++ null experts save: one MoE block, timed in one run.

    python benchmarks/routing.py [--hidden 512] [--intermediate 1024] [--experts 8] [--top-k 2] [--tokens 2048]
                                 [--dtype float32] [--implementation grouped_mm] [--expert-kind full]
                                 [--skip-features]

Part 1: forward + backward (training mode) of one `MoeifySparseMoeBlock` with each router feature switched on,
relative to the plain softmax top-k block of the same shape (experts through transformers' experts
`--implementation`, the same input and upstream gradient, median of `--repeats` after warm-up).

Part 2, MoE++ throughput: the same block with E FFN experts plus null experts (1 zero, 1 copy, 1 constant) against
the block with the same E and K and no null experts, on routings where a measured share of the assignments goes to
null experts (their router rows are scaled up to make them more or less attractive). Tokens that pick a null
expert never enter the expert GEMMs, so the block gets faster as that share grows (MoE++ reports 1.1-2.1x expert
throughput). Both forward (inference) and forward + backward are timed. The last two columns time forward +
backward again with the block made to compact the FFN assignments (gather them, run the experts on those, scatter
back), what it does for experts that cannot skip null assignments themselves; moeify's experts implementation and
its 4-bit / frozen training experts (`--expert-kind nf4+lora`, `frozen+lora`: LoRA r16, only LoRA trains) get the
whole routing instead on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402

FEATURES: dict[str, dict[str, Any]] = {
    "softmax top-k (baseline)": {},
    "sigmoid scoring": {"scoring": "sigmoid"},
    "MLP router (256)": {"network": "mlp", "mlp_hidden_size": 256},
    "noisy top-k": {"noisy_top_k": True},
    "input jitter 0.01": {"jitter": 0.01},
    "capacity factor 1.25": {"capacity_factor": 1.25},
    "bias balancing": {"bias_update_rate": 0.001},
    "gating residual": {"gating_residual": True},
    "null experts (1 zero, 1 copy, 1 constant)": {"null_experts": {"zero": 1, "copy": 1, "constant": 1}},
}


def build_block(args: argparse.Namespace, router: dict[str, Any]) -> torch.nn.Module:
    """A `MoeifySparseMoeBlock` of the benchmark's shape, random weights (seed 0), grouped_mm experts."""
    from transformers import LlamaConfig

    from moeify.modeling import MoeifyConfig
    from moeify.modeling.modeling_moeify import MoeifySparseMoeBlock, init_moe_weights
    from moeify.modeling.router import RoutingState

    text = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=2, num_attention_heads=8
    )
    config = MoeifyConfig(
        text_config=text, num_experts=args.experts, num_experts_per_tok=args.top_k, moe_layers=[1], router=router
    )
    config._experts_implementation_internal = args.implementation
    torch.manual_seed(0)
    block = MoeifySparseMoeBlock(config)
    block.apply(lambda module: init_moe_weights(module, 0.02))
    block.to(getattr(torch, args.dtype))
    if router.get("gating_residual"):  # a previous layer's logits for the residual to read
        block.router.layer_index, block.router.previous_layer, block.router.state = 1, 0, RoutingState()
        block.router.state.logits[0] = torch.randn(args.tokens, block.router.num_choices)
        torch.nn.init.normal_(block.router.residual.weight, std=0.1)
    return block


def time_block(block: torch.nn.Module, x: torch.Tensor, backward: bool, repeats: int) -> float:
    """Median seconds of one forward (+ backward) of `block` on `x`."""
    grad = torch.randn_like(x)
    times = []
    for i in range(repeats + 2):
        inputs = x.detach().requires_grad_(backward)
        start = time.perf_counter()
        if backward:
            block(inputs).backward(grad)
        else:
            with torch.no_grad():
                block(inputs)
        if i >= 2:  # two warm-up runs
            times.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
    return statistics.median(times)


def training_experts(block: torch.nn.Module, kind: str) -> torch.nn.Module:
    """`block` with its experts as `kind`: unchanged (`full`), or 4-bit / frozen with per-expert LoRA (r16) where
    only the LoRA factors train."""
    if kind == "full":
        return block
    from moeify.quant import ExpertLoraConfig, Experts4bit, ExpertsFrozen, add_expert_lora

    block.experts = Experts4bit.from_experts(block.experts) if kind == "nf4+lora" else ExpertsFrozen(block.experts)
    add_expert_lora(block, ExpertLoraConfig(r=16, alpha=32.0))
    for name, parameter in block.named_parameters():
        parameter.requires_grad_("lora" in name)
    return block


@contextlib.contextmanager
def compacted() -> Iterator[None]:
    """The block compacts the FFN assignments for any experts, as for those that cannot skip null ones."""
    from moeify.modeling import modeling_moeify

    skips = modeling_moeify._skips_unrouted
    modeling_moeify._skips_unrouted = lambda experts, hidden_states: False
    try:
        yield
    finally:
        modeling_moeify._skips_unrouted = skips


def handed_over_and_compacted(block: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward of `block` as it runs and with `compacted()`, alternating run by run
    (a machine whose speed drifts moves both alike)."""
    grad = torch.randn_like(x)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 1):  # the first round warms up
        for compact, record in ((False, times[0]), (True, times[1])):
            inputs = x.detach().requires_grad_()
            with compacted() if compact else contextlib.nullcontext():
                start = time.perf_counter()
                block(inputs).backward(grad)
                if i:
                    record.append(time.perf_counter() - start)
            block.zero_grad(set_to_none=True)
    return statistics.median(times[0]), statistics.median(times[1])


def null_share(block: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of the assignments that go to null experts on `x`."""
    with torch.no_grad():
        _, _, index = block.router(x)
    return float((index >= block.router.num_experts).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024, help="one expert's intermediate size")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--implementation", default="grouped_mm", help="transformers experts implementation (moeify's: moeify)"
    )
    parser.add_argument(
        "--expert-kind", choices=["full", "nf4+lora", "frozen+lora"], default="full", help="part 2's experts"
    )
    parser.add_argument("--skip-features", action="store_true", help="part 2 only")
    args = parser.parse_args()
    print(machine_summary())
    print(
        f"block: H={args.hidden}, expert I={args.intermediate}, E={args.experts}, K={args.top_k}, "
        f"{args.tokens} tokens, {args.dtype}, {args.implementation} experts; median of {args.repeats}\n"
    )
    x = torch.randn(args.tokens, args.hidden, dtype=getattr(torch, args.dtype))
    time_block(build_block(args, {}).train(), x, backward=True, repeats=1)  # first-call costs (kernels, allocator)

    if not args.skip_features:
        print("| router feature | fwd+bwd ms | vs softmax top-k |")
        print("|---|---:|---:|")
        base = None
        for name, router in FEATURES.items():
            block = build_block(args, router).train()
            seconds = time_block(block, x, backward=True, repeats=args.repeats)
            base = base or seconds
            print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |", flush=True)

    print(
        f"\nMoE++ null experts (1 zero, 1 copy, 1 constant) vs the same E and K without them, {args.expert_kind} "
        "experts"
    )
    print(
        "| null rows scaled by | null share of assignments | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up "
        "| fwd+bwd compacted ms | fwd+bwd / compacted |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    vanilla = training_experts(build_block(args, {}), args.expert_kind).eval()
    plain_fwd = time_block(vanilla, x, backward=False, repeats=args.repeats)
    plain_train = time_block(vanilla.train(), x, backward=True, repeats=args.repeats)
    print(f"| (no null experts) | 0% | {plain_fwd * 1e3:.1f} | 1.00x | {plain_train * 1e3:.1f} | 1.00x | | |")
    for scale in (1.0, 4.0, 16.0):
        block = build_block(args, {"null_experts": {"zero": 1, "copy": 1, "constant": 1}})
        with torch.no_grad():
            block.router.weight[args.experts :] *= scale
        block = training_experts(block, args.expert_kind)
        share = null_share(block.eval(), x)
        fwd = time_block(block, x, backward=False, repeats=args.repeats)
        train, train_compacted = handed_over_and_compacted(block.train(), x, args.repeats)
        print(
            f"| {scale:g} | {share:.0%} | {fwd * 1e3:.1f} | {plain_fwd / fwd:.2f}x | {train * 1e3:.1f} | "
            f"{plain_train / train:.2f}x | {train_compacted * 1e3:.1f} | {train / train_compacted:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
