"""Every output `convert` writes, served by vLLM, gives transformers' greedy tokens (or is refused, never wrong).

Skipped unless `MOEIFY_VLLM_PYTHON` names a Python with vLLM and moeify (`bash scripts/vllm-env.sh` builds one;
vLLM pins its own transformers, so it lives in its own venv). Tiny dense models with head_dim 32 (vLLM's CPU
attention supports 32 and up) are converted to every native target and to the moeify format; vLLM serves native
outputs with its own model classes and moeify-format ones with moeify's plugin class (`moeify.serving.vllm_model`,
vLLM's
Transformers backend with the experts its fused kernel gets wrong kept as moeify's); the greedy tokens of a batch of
token-id prompts must equal transformers' (float32). Without the plugin (vLLM's own Transformers backend class), an
output vLLM would compute wrongly must be refused with a message saying why.

`pytest -m serving tests/serving -s` also prints the table docs/serving.md quotes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, dense_model
from transformers import AutoModelForCausalLM

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

VLLM_PYTHON = os.environ.get("MOEIFY_VLLM_PYTHON")
pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(not VLLM_PYTHON, reason="set MOEIFY_VLLM_PYTHON to a Python with vLLM (scripts/vllm-env.sh)"),
]

PROMPTS = [[1, 45, 120, 33, 250, 17, 89], [1, 200, 14, 66, 7, 190, 201, 3, 44, 90, 12, 5, 61]]
MAX_TOKENS = 8
E4K2 = {"num_experts": 4, "top_k": 2}
NULL_EXPERTS = {"null_experts": {"zero": 1, "copy": 1}}
SIGMOID = {"scoring": "sigmoid"}

# (id, dense architecture, convert options, class written, what vLLM does: "serve" (transformers' tokens),
# "differs" (a known vLLM defect, documented in docs/serving.md), or a substring of its refusal)
CASES = [
    ("llama-mixtral", "llama", E4K2, "MixtralForCausalLM", "serve"),
    ("llama-qwen2moe-shared1", "llama", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM", "serve"),
    ("llama-qwen2moe-layers02", "llama", {**E4K2, "layers": "0,2"}, "Qwen2MoeForCausalLM", "serve"),
    ("mistral-qwen2moe-layers02", "mistral", {**E4K2, "layers": "0,2"}, "Qwen2MoeForCausalLM", "serve"),
    ("qwen2-qwen2moe", "qwen2", E4K2, "Qwen2MoeForCausalLM", "serve"),
    ("qwen2-qwen2moe-shared1", "qwen2", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM", "serve"),
    ("qwen3-qwen3moe", "qwen3", E4K2, "Qwen3MoeForCausalLM", "serve"),
    ("qwen3-qwen3moe-layers02", "qwen3", {**E4K2, "layers": "0,2"}, "Qwen3MoeForCausalLM", "serve"),
    # vLLM 0.32 builds GraniteMoe attention without biases, so `--format auto` writes the moeify format for a Llama
    # with attention biases; `--format native` still writes GraniteMoeShared, which vLLM serves wrongly.
    ("llama-attn-bias-auto", "llama_attn_bias", E4K2, "MoeifyForCausalLM", "serve"),
    (
        "llama-attn-bias-granite",
        "llama_attn_bias",
        {**E4K2, "format": "native"},
        "GraniteMoeSharedForCausalLM",
        "differs",
    ),
    (
        "llama-attn-bias-granite-shared1",
        "llama_attn_bias",
        {**E4K2, "shared_experts": 1, "format": "native"},
        "GraniteMoeSharedForCausalLM",
        "differs",
    ),
    ("llama-moeify", "llama", {**E4K2, "format": "moeify"}, "MoeifyForCausalLM", "serve"),
    ("phi3-moeify-shared1", "phi3", {**E4K2, "shared_experts": 1}, "MoeifyForCausalLM", "serve"),
    ("phi3-moeify-layers02", "phi3", {**E4K2, "layers": "0,2"}, "MoeifyForCausalLM", "serve"),
    ("llama-mlp-bias-moeify-shared1", "llama_mlp_bias", {**E4K2, "shared_experts": 1}, "MoeifyForCausalLM", "serve"),
    (
        "phi3-moeify-sigmoid-shared1",
        "phi3",
        {**E4K2, "shared_experts": 1, "router": SIGMOID},
        "MoeifyForCausalLM",
        "serve",
    ),
    ("gemma3-moeify-sigmoid", "gemma3", {**E4K2, "router": SIGMOID}, "MoeifyForCausalLM", "serve"),
    # GELU experts and MoE++ null experts: moeify's plugin keeps them out of vLLM's fused kernel...
    ("gemma3-moeify-shared1", "gemma3", {**E4K2, "shared_experts": 1}, "MoeifyForCausalLM", "serve"),
    ("llama-moeify-null-experts", "llama", {**E4K2, "router": NULL_EXPERTS}, "MoeifyForCausalLM", "serve"),
    # ... and vLLM's own Transformers backend class (no plugin) is refused by moeify's guard, as before it.
    ("gemma3-moeify-shared1-no-plugin", "gemma3", {**E4K2, "shared_experts": 1}, "MoeifyForCausalLM", "SiLU"),
    ("llama-moeify-null-experts-no-plugin", "llama", {**E4K2, "router": NULL_EXPERTS}, "MoeifyForCausalLM", "null"),
]

_TABLE: list[dict] = []


def serving_dense(name: str, root: Path) -> Path:
    """The tiny dense model `name` with 2 query heads, 1 KV head and head_dim 32 (what vLLM's CPU attention takes)."""
    config = ARCHITECTURES[name]()
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = 32
    if name == "gemma3":  # as Gemma 3 checkpoints: vLLM's CPU attention does not apply an attention-logit softcap
        config.attn_logit_softcapping = None
    return dense_model(f"{name}-serving", root, config=config)


def transformers_tokens(folder: Path) -> list[list[int]]:
    """Greedy tokens by transformers, end-of-sequence ignored like vLLM's `ignore_eos` (a plain argmax loop:
    `generate(min_new_tokens=...)` would mask the EOS token instead)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        tokens.append(ids[0, len(prompt) :].tolist())
    return tokens


def vllm_run(folder: Path, impl: str, adapter: Path | None = None) -> subprocess.CompletedProcess:
    script = Path(__file__).with_name("vllm_generate.py")
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1")
    args = [str(VLLM_PYTHON), str(script), str(folder), impl, json.dumps(PROMPTS), str(MAX_TOKENS)]
    args += [str(adapter)] if adapter else []
    return subprocess.run(args, cwd=folder.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("case", "arch", "options", "expected_class", "expect"), CASES, ids=[c[0] for c in CASES])
def test_vllm_serves_like_transformers(
    case: str, arch: str, options: dict, expected_class: str, expect: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dense = serving_dense(arch, tmp_path_factory.getbasetemp() / "serving-dense")
    out = tmp_path_factory.mktemp("serving") / case
    result = convert(str(dense), out, ConvertOptions(**options), progress=False, log=lambda _: None)
    assert result.output_class == expected_class
    # "auto": vLLM's own classes, and moeify's plugin class for the moeify format; "transformers": vLLM's
    # Transformers backend class itself, which is what runs moeify-format models without the plugin.
    impl = "transformers" if case.endswith("-no-plugin") else "auto"

    proc = vllm_run(out, impl)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if expect not in ("serve", "differs"):
        assert not lines and proc.returncode != 0, f"{case}: vLLM served an output it computes wrongly"
        assert expect in proc.stderr + proc.stdout, proc.stderr[-3000:]
        _TABLE.append({"case": case, "class": expected_class, "served": "refused", "equal": "-"})
        return
    assert proc.returncode == 0 and lines, f"{case}: vLLM failed:\n{proc.stderr[-4000:]}"
    served = json.loads(lines[-1][len("RESULT ") :])
    expected = transformers_tokens(out)
    _TABLE.append(
        {
            "case": case,
            "class": expected_class,
            "impl": impl,
            "served": f"vLLM {served['vllm']}",
            "equal": served["tokens"] == expected,
        }
    )
    if expect == "differs":  # fails once vLLM fixes it: then let `--format auto` pick the class again
        assert served["tokens"] != expected, f"{case}: vLLM now serves this correctly"
    else:
        assert served["tokens"] == expected, f"{case}: vLLM {served['tokens']} != transformers {expected}"


def teardown_module() -> None:
    if _TABLE:
        print("\n| output | class | vLLM | greedy tokens equal |", file=sys.stderr)
        for row in _TABLE:
            print(f"| {row['case']} | {row['class']} | {row['served']} | {row['equal']} |", file=sys.stderr)


def test_vllm_serves_a_merged_fine_tune_like_transformers(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`moeify train` (4-bit experts, LoRA, routers and the shared-expert gate trained) -> `moeify merge` -> vLLM.
    The adapter itself is refused by vLLM 0.32 (trained routers are `modules_to_save`, which its LoRA loader takes
    only for classifiers): merge first. It fails once vLLM takes it; then test its tokens instead."""
    from tiny_models import training_recipe

    from moeify.cli import main

    dense = serving_dense("qwen2", tmp_path_factory.getbasetemp() / "serving-dense")
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(64)))
    recipe = training_recipe(tmp_path, "run", moe, {"path": str(corpus)}, per_device_train_batch_size=2, max_steps=6)
    assert main(["train", str(recipe)]) == 0
    unmerged = vllm_run(moe, "auto", tmp_path / "run")
    assert unmerged.returncode != 0 and "modules_to_save" in unmerged.stderr, unmerged.stderr[-2000:]
    merged = tmp_path / "merged"
    assert main(["merge", str(moe), str(tmp_path / "run"), "-o", str(merged), "--quiet"]) == 0
    proc = vllm_run(merged, "auto")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    served = json.loads(lines[-1][len("RESULT ") :])
    expected = transformers_tokens(merged)
    _TABLE.append({"case": "qwen2-qwen2moe-shared1 trained + merged", "class": "Qwen2MoeForCausalLM",
                   "served": f"vLLM {served['vllm']}", "equal": served["tokens"] == expected})  # fmt: skip
    assert served["tokens"] == expected
