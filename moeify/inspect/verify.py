"""`moeify verify`: does the MoE compute what the dense model computes? Logits and greedy text, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..errors import MoeifyError
from ..io.dtypes import DTYPES
from ..io.source import resolve_source

# Real text, varied in length, so padding, sliding windows and several positions are exercised.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Mixture-of-Experts models route each token to a few experts, which lets them grow their capacity while "
    "keeping the compute per token nearly constant. In this essay we",
    "Photosynthesis converts light energy into",
    "Once upon a time, in a village between two rivers, there lived an old clockmaker who",
    "1, 1, 2, 3, 5, 8, 13,",
]


@dataclass
class VerifyReport:
    """Result of comparing two models on the same prompts."""

    max_abs_diff: float
    top1_agreement: float
    tokens_compared: int
    tolerance: float
    expected_deviation: str | None = None  # why the MoE's config says it differs at step 0 (null experts, ...)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    @property
    def by_design(self) -> bool:
        """The outputs differ, and the MoE's configuration says they must."""
        return not self.passed and self.expected_deviation is not None

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.by_design:
            verdict = f"DEVIATES by design ({self.expected_deviation})"
        return (
            f"{verdict}: max |logit difference| {self.max_abs_diff:.3e} (tolerance {self.tolerance:.0e}), "
            f"top-1 agreement {self.top1_agreement:.2%} over {self.tokens_compared} tokens of {len(PROMPTS)} prompts"
        )


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM from a folder, Hub id or `.gguf` (via moeify's dequantized cache), in eval mode."""

    if dtype not in DTYPES or dtype == "auto":
        raise MoeifyError(f"--dtype must be one of bfloat16, float16, float32 (got '{dtype}').")
    folder = resolve_source(source, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MoeifyError(f"cannot load {source} as a causal LM: {err}") from None
    return model.eval(), folder


def load_tokenizer(*folders: Path) -> PreTrainedTokenizerBase:
    """The first tokenizer found in `folders` (the MoE's copy, else the dense model's)."""
    for folder in folders:
        if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
    raise MoeifyError(f"no tokenizer in {', '.join(str(f) for f in folders)}; verify needs one to tokenise prompts.")


@torch.no_grad()
def compare_logits(dense, moe, tokenizer: PreTrainedTokenizerBase, tolerance: float) -> VerifyReport:
    """Max |logit difference| and top-1 agreement over every real (non-padding) token of `PROMPTS`."""
    tokenizer.padding_side = "right"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    dense_logits = dense(**batch).logits.float()
    moe_logits = moe(**batch).logits.float()
    if dense_logits.shape != moe_logits.shape:
        raise MoeifyError(f"the models disagree on shapes: {tuple(dense_logits.shape)} vs {tuple(moe_logits.shape)}")
    mask = batch["attention_mask"].bool()
    diff = (dense_logits - moe_logits).abs()[mask]
    agree = (dense_logits.argmax(-1) == moe_logits.argmax(-1))[mask]
    return VerifyReport(float(diff.max()), float(agree.float().mean()), int(mask.sum()), tolerance)


@torch.no_grad()
def greedy(model, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (with the KV cache), decoded without the prompt."""
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def verify(
    dense_source: str,
    moe_source: str,
    tolerance: float = 1e-4,
    dtype: str = "float32",
    generate_tokens: int = 0,
    trust_remote_code: bool = False,
) -> tuple[VerifyReport, list[tuple[str, str, str]]]:
    """Compare `moe_source` against `dense_source` on `PROMPTS`.

    Returns the logit report and, when `generate_tokens > 0`, `(prompt, dense text, moe text)` for the first
    prompt greedy-decoded by both models.
    """
    dense, dense_folder = load_model(dense_source, dtype, trust_remote_code)
    moe, moe_folder = load_model(moe_source, dtype, trust_remote_code)
    tokenizer = load_tokenizer(moe_folder, dense_folder)
    report = compare_logits(dense, moe, tokenizer, tolerance)
    report.expected_deviation = expected_deviation(moe.config)
    samples = []
    if generate_tokens:
        prompt = PROMPTS[0]
        samples.append(
            (prompt, greedy(dense, tokenizer, prompt, generate_tokens), greedy(moe, tokenizer, prompt, generate_tokens))
        )
    return report, samples


def expected_deviation(config: object) -> str | None:
    """Why an MoE does not reproduce its dense source at step 0: what `moeify convert` wrote (`moeify_deviation`),
    else what a moeify-format router section implies."""
    if getattr(config, "moeify_deviation", None):
        return str(config.moeify_deviation)
    router = getattr(config, "router", None)
    if not isinstance(router, dict):
        return None
    from ..modeling import RouterConfig

    return RouterConfig.from_dict(router).deviation()
