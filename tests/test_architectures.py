"""Every supported architecture, converted in every format that applies, equals its dense model.

For each tiny dense model (see `tiny_models`: norms and biases perturbed) and each option set (E=4 K=2; with
one shared expert; with a layer subset), `--format native` either writes the stock class the design names
as exact or refuses with a message pointing at `--format moeify`; `--format moeify` always works. The MoE
must match the dense logits at 1e-5 (float32) on a left-padded batch of real tokenized prompts, and greedy
generation must give the same tokens. A last test loads a few outputs in a fresh interpreter where
`import moeify` fails: native ones with plain `from_pretrained`, moeify ones with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, DENSE_FOLDER, PROMPTS, build_tokenizer, dense_model
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moeify.convert.converter import ConversionResult, convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError

hf_logging.disable_progress_bar()

TOL = 1e-5
MAX_NEW_TOKENS = 8

OPTIONS: dict[str, dict[str, object]] = {
    "e4k2": {"num_experts": 4, "top_k": 2},
    "shared1": {"num_experts": 4, "top_k": 2, "shared_experts": 1},
    "layers02": {"num_experts": 4, "top_k": 2, "layers": "0,2"},
    # Fine-grained experts: 1/G of the FFN each, in groups of G with tied router rows.
    "g2": {"num_experts": 4, "top_k": 2, "granularity": 2},
    "g4": {"num_experts": 8, "top_k": 4, "granularity": 4},
    "g2shared": {"num_experts": 4, "top_k": 2, "granularity": 2, "shared_experts": 1},
    "g4shared": {"num_experts": 8, "top_k": 4, "granularity": 4, "shared_experts": 1},
    # --shared-expert-size: the shared expert is the FFN's first 32 neurons, the routed experts share the rest.
    "shared1size32": {"num_experts": 4, "top_k": 2, "shared_experts": 1, "shared_expert_size": 32},
    "g4shared2size32": {"num_experts": 8, "top_k": 4, "granularity": 4, "shared_experts": 2, "shared_expert_size": 32},
}

MIXTRAL, QWEN2_MOE, QWEN3_MOE, GRANITE, MOEIFY = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "GraniteMoeSharedForCausalLM",
    "MoeifyForCausalLM",
)
# The stock class `--format native` must write for (architecture, options); None: it must refuse.
NATIVE: dict[str, dict[str, str | None]] = {
    "llama": {"e4k2": MIXTRAL, "shared1": QWEN2_MOE, "layers02": QWEN2_MOE},
    "llama3": {"e4k2": MIXTRAL, "shared1": QWEN2_MOE, "layers02": QWEN2_MOE},
    "llama_attn_bias": {"e4k2": GRANITE, "shared1": GRANITE, "layers02": None},
    "llama_mlp_bias": {"e4k2": None, "shared1": None, "layers02": None},
    "mistral": {"e4k2": MIXTRAL, "shared1": QWEN2_MOE, "layers02": QWEN2_MOE},
    "qwen2": {"e4k2": QWEN2_MOE, "shared1": QWEN2_MOE, "layers02": QWEN2_MOE},
    "qwen2_swa": {"e4k2": QWEN2_MOE, "shared1": QWEN2_MOE, "layers02": QWEN2_MOE},
    "qwen3": {"e4k2": QWEN3_MOE, "shared1": None, "layers02": QWEN3_MOE},
    "gemma3": {"e4k2": None, "shared1": None, "layers02": None},
    "phi3": {"e4k2": None, "shared1": None, "layers02": None},
}
for _classes in NATIVE.values():  # fine-grained experts fit the same stock classes as whole ones
    _classes.update(g2=_classes["e4k2"], g4=_classes["e4k2"])
    _classes.update(g2shared=_classes["shared1"], g4shared=_classes["shared1"])
    _classes.update(shared1size32=_classes["shared1"], g4shared2size32=_classes["shared1"])
assert set(NATIVE) == set(ARCHITECTURES)
# Exact, but `--format auto` does not pick it: vLLM 0.32 builds GraniteMoe attention without biases.
NOT_AUTOMATIC = {GRANITE}

CASES = [(arch, fmt, opt) for arch in ARCHITECTURES for opt in OPTIONS for fmt in ("native", "moeify")]


# ----------------------------------------------------------------------------------------------------------
# Session caches: each dense model, its reference outputs and each conversion are made once.


@pytest.fixture(scope="session")
def dense_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared with test_native_names (same folder name), so each dense model is built once per session."""
    return tmp_path_factory.getbasetemp() / DENSE_FOLDER


@pytest.fixture(scope="session")
def batch() -> dict[str, torch.Tensor]:
    """The prompts, tokenized by the real (BPE) tokenizer, left-padded."""
    encoded = build_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any(), "the batch should contain padding"
    return dict(encoded)


def _run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(**batch).logits.float()
        generated = model.generate(
            **batch, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS
        )
    return logits, generated


@pytest.fixture(scope="session")
def reference(dense_root: Path, batch: dict[str, torch.Tensor]):
    """`reference(arch)` -> (dense folder, dense logits, dense greedy tokens), computed once per architecture."""
    cache: dict[str, tuple[Path, torch.Tensor, torch.Tensor]] = {}

    def get(arch: str) -> tuple[Path, torch.Tensor, torch.Tensor]:
        if arch not in cache:
            folder = dense_model(arch, dense_root)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            cache[arch] = (folder, *_run(model, batch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, reference):
    """`converted(arch, fmt, opt, layout="per-expert")` -> ConversionResult (or the MoeifyError raised)."""
    root = tmp_path_factory.mktemp("converted")
    cache: dict[tuple[str, str, str, str], ConversionResult | MoeifyError] = {}

    def get(arch: str, fmt: str, opt: str, layout: str = "per-expert") -> ConversionResult | MoeifyError:
        key = (arch, fmt, opt, layout)
        if key not in cache:
            folder = reference(arch)[0]
            options = ConvertOptions(format=fmt, layout=layout, **OPTIONS[opt])  # type: ignore[arg-type]
            try:
                cache[key] = convert(str(folder), root / "-".join(key), options, progress=False, log=lambda _: None)
            except MoeifyError as err:
                cache[key] = err
        return cache[key]

    return get


def _masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| over the positions that are real tokens (left padding excluded)."""
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "fmt", "opt"), CASES, ids=["-".join(c) for c in CASES])
def test_convert_matches_dense(arch: str, fmt: str, opt: str, converted, reference, batch) -> None:
    expected_class = MOEIFY if fmt == "moeify" else NATIVE[arch][opt]
    result = converted(arch, fmt, opt)
    if expected_class is None:
        assert isinstance(result, MoeifyError), f"--format native should refuse {arch} {opt}, wrote {result}"
        assert "--format moeify" in str(result)
        return
    assert isinstance(result, ConversionResult), f"conversion failed: {result}"
    assert result.output_class == expected_class
    assert result.format == (
        "moeify"
        if fmt == "moeify"
        else {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", QWEN3_MOE: "qwen3_moe", GRANITE: "granitemoeshared"}[
            expected_class
        ]
    )
    assert result.exact

    model = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32).eval()
    assert type(model).__name__ == expected_class
    assert result.params.total == sum(p.numel() for p in model.parameters())
    expected_moe_layers = [0, 2] if opt == "layers02" else list(range(model.config.get_text_config().num_hidden_layers))
    assert result.params.moe_layers == expected_moe_layers
    shared = OPTIONS[opt].get("shared_experts", 0)
    if fmt == "native":  # stock configs hold the shared size only: counted in routed-expert units (G per FFN copy)
        shared *= OPTIONS[opt].get("granularity", 1)  # type: ignore[operator]
        if "shared_expert_size" in OPTIONS[opt]:  # not a multiple of an expert's size: one shared MLP
            shared = 1
    assert result.params.shared_experts == shared

    _, dense_logits, dense_tokens = reference(arch)
    logits, tokens = _run(model, batch)
    diff = _masked_max_diff(logits, dense_logits, batch["attention_mask"])
    print(f"{arch} {fmt} {opt} -> {expected_class}: max |logit diff| {diff:.2e}")
    assert diff <= TOL, f"{arch} -> {expected_class} ({opt}): max |logit diff| {diff:.3e} > {TOL}"
    assert torch.equal(tokens, dense_tokens), f"greedy generation differs:\n{tokens}\n{dense_tokens}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_auto_picks_native_when_exact(arch: str, opt: str, converted) -> None:
    result = converted(arch, "auto", opt)
    assert isinstance(result, ConversionResult), f"--format auto must always succeed: {result}"
    native = NATIVE[arch][opt] if NATIVE[arch][opt] not in NOT_AUTOMATIC else None
    assert result.output_class == (native or MOEIFY)
    assert (result.format == "moeify") == (native is None)


def test_fused_native_layout_matches_dense(converted, reference, batch) -> None:
    """The fused native layout loads to the same model as the per-expert one."""
    for arch, opt in (("llama", "e4k2"), ("qwen2", "shared1"), ("qwen3", "layers02")):
        result = converted(arch, "native", opt, "fused")
        assert isinstance(result, ConversionResult) and result.layout == "fused"
        model = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(**batch).logits.float()
        diff = _masked_max_diff(logits, reference(arch)[1], batch["attention_mask"])
        assert diff <= TOL, f"{arch} fused ({opt}): max |logit diff| {diff:.3e}"


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_every_experts_implementation_matches_dense(impl: str, converted, reference, batch) -> None:
    """`from_pretrained(experts_implementation=...)` loads and stays exact (moeify experts with biases too)."""
    for arch, fmt, opt in (
        ("llama_mlp_bias", "moeify", "shared1"),
        ("gemma3", "moeify", "layers02"),
        ("qwen2", "native", "e4k2"),
    ):
        result = converted(arch, fmt, opt)
        assert isinstance(result, ConversionResult)
        model = AutoModelForCausalLM.from_pretrained(
            result.output, dtype=torch.float32, experts_implementation=impl
        ).eval()
        assert model.config._experts_implementation == impl
        with torch.no_grad():
            logits = model(**batch).logits.float()
        diff = _masked_max_diff(logits, reference(arch)[1], batch["attention_mask"])
        assert diff <= TOL, f"{arch} {fmt} {opt} with {impl}: max |logit diff| {diff:.3e}"


# ----------------------------------------------------------------------------------------------------------
# Loading without moeify installed.

_CHILD = r"""
import json, sys
sys.modules["moeify"] = None  # `import moeify` raises ImportError from here on
try:
    import moeify  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("moeify is importable in the child")
import torch
from transformers import AutoModelForCausalLM

data = torch.load(sys.argv[1])
report = {}
for path, remote, expected in data["models"]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"]).logits.float()
    report[path] = {"class": type(model).__name__, "module": type(model).__module__,
                    "diff": (logits - expected).abs().max().item()}
print("REPORT " + json.dumps(report))
"""

SUBPROCESS_CASES = [
    ("llama3", "native", "e4k2"),
    ("qwen2_swa", "native", "layers02"),
    ("qwen3", "native", "e4k2"),
    ("mistral", "native", "shared1"),
    ("gemma3", "moeify", "e4k2"),
    ("phi3", "moeify", "layers02"),
    ("llama_mlp_bias", "moeify", "shared1"),
]


def test_outputs_load_without_moeify(converted, tmp_path: Path) -> None:
    input_ids = torch.tensor([[1, 5, 17, 42, 99, 123, 200, 7, 8, 250, 31, 64, 77, 3]])
    models = []
    for case in SUBPROCESS_CASES:
        result = converted(*case)
        assert isinstance(result, ConversionResult), f"{case}: {result}"
        model = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = model(input_ids=input_ids).logits.float()
        models.append((str(result.output), result.format == "moeify", expected))
    payload = tmp_path / "expected.pt"
    torch.save({"input_ids": input_ids, "models": models}, payload)

    env = dict(
        os.environ,
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH="",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(payload)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert set(report) == {m[0] for m in models}
    for (arch, fmt, opt), (path, remote, _) in zip(SUBPROCESS_CASES, models, strict=True):
        entry = report[path]
        assert entry["diff"] <= TOL, f"{arch} {fmt} {opt} in a fresh process: max |logit diff| {entry['diff']:.3e}"
        if remote:
            assert entry["class"] == MOEIFY
            assert entry["module"].startswith("transformers_modules."), entry["module"]
        else:
            assert entry["class"] == NATIVE[arch][opt]
            assert entry["module"].startswith("transformers.models."), entry["module"]
