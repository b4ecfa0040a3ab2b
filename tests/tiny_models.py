"""Tiny random dense causal LMs of every supported architecture, with a real (locally trained) tokenizer.

Each builder makes a float32 model small enough to convert and run in well under a second, perturbs every
norm weight and every bias (they are initialised to exactly 1 or 0, which would hide a dropped or misplaced
norm / bias in the converted model), and saves it with its tokenizer into a folder.

`build_dense(name, folder)` builds one of `ARCHITECTURES`; `build_tokenizer()` returns the shared tokenizer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB_SIZE = 320  # model vocabulary; the tokenizer's is smaller (<= 300)
TOKENIZER_VOCAB = 300
NUM_LAYERS = 4
SLIDING_WINDOW = 8  # shorter than the test prompts, so the window matters
DENSE_FOLDER = "tiny-dense-models"  # under pytest's session base temp, shared by the test modules

PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Mixture of experts models route every token to a few experts.",
    "Hello world!",
    "A quick brown fox jumps over the lazy dog near the river bank today.",
]

_CORPUS = PROMPTS + [
    "Sparse upcycling turns one dense feed-forward network into many experts.",
    "The router picks the top two experts for each token and weights them.",
    "Large language models are trained on text from books, code and the web.",
    "Attention lets each position look at the positions before it.",
    "Sliding window attention only looks at the last few tokens.",
    "Numbers like 1234567890 and symbols such as #, $, % and & appear too.",
]

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@cache
def _trained_tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (ids: 0 pad, 1 bos, 2 eos) trained on a few sentences; pads on the left."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    assert len(tokenizer) <= VOCAB_SIZE
    return tokenizer


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_COMMON)


def _llama3() -> PretrainedConfig:
    return LlamaConfig(
        **_COMMON,
        head_dim=32,  # != hidden_size / num_attention_heads = 16
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )


def _llama_attn_bias() -> PretrainedConfig:
    return LlamaConfig(**_COMMON, attention_bias=True)


def _llama_mlp_bias() -> PretrainedConfig:
    return LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**_COMMON, head_dim=16, sliding_window=SLIDING_WINDOW)


def _qwen2() -> PretrainedConfig:
    return Qwen2Config(**_COMMON)


def _qwen2_swa() -> PretrainedConfig:
    # Qwen2 slides on layers >= max_window_layers: layers 2 and 3 here.
    return Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=2)


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(**_COMMON, head_dim=24)


def _gemma3() -> PretrainedConfig:
    return Gemma3TextConfig(
        **_COMMON,
        head_dim=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=5.0,
        attn_logit_softcapping=10.0,
        query_pre_attn_scalar=16,
    )


def _phi3() -> PretrainedConfig:
    return Phi3Config(**_COMMON)


ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "llama3": _llama3,
    "llama_attn_bias": _llama_attn_bias,
    "llama_mlp_bias": _llama_mlp_bias,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen2_swa": _qwen2_swa,
    "qwen3": _qwen3,
    "gemma3": _gemma3,
    "phi3": _phi3,
}


@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module, seed: int = 0) -> int:
    """Add noise to every norm weight and every bias (returns how many tensors were changed)."""
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if leaf == "bias" or "norm" in module_name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
            changed += 1
    return changed


def build_dense(name: str, folder: Path, seed: int = 0, config: PretrainedConfig | None = None) -> Path:
    """Build the tiny dense model `name` (a key of `ARCHITECTURES`, or `config`), save it with the tokenizer."""
    config = config if config is not None else ARCHITECTURES[name]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert perturb_norms_and_biases(model, seed) > 0
    folder = Path(folder)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def dense_model(name: str, root: Path, config: PretrainedConfig | None = None) -> Path:
    """The tiny dense model `name` under `root`, built on first use (later calls, from any test module, reuse it)."""
    folder = Path(root) / name
    if not folder.is_dir():
        Path(root).mkdir(parents=True, exist_ok=True)
        partial = Path(root) / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_dense(name, partial, config=config)
        partial.rename(folder)
    return folder


NATIVE_MOE_CLASSES = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoeshared")  # the stock MoE classes convert writes


def native_moe(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of a stock transformers MoE class moeify writes (`NATIVE_MOE_CLASSES`): vocabulary 96,
    hidden 64, 2 layers, 4 experts of intermediate 128 (and a shared expert where the class has one), top-2."""
    from transformers import (
        GraniteMoeSharedConfig,
        GraniteMoeSharedForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    experts = dict(num_experts_per_tok=2, intermediate_size=128)
    if name == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, **experts, num_local_experts=4))
    if name == "qwen2_moe":
        return Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                **common, **experts, moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4
            )
        )
    if name == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, **experts, moe_intermediate_size=128, num_experts=4))
    if name == "granitemoeshared":
        return GraniteMoeSharedForCausalLM(
            GraniteMoeSharedConfig(**common, **experts, shared_intermediate_size=128, num_local_experts=4)
        )
    raise ValueError(f"unknown native MoE class {name!r}; one of {NATIVE_MOE_CLASSES}")


def training_recipe(folder: Path, name: str, model: Path | str, data: dict, **training: object) -> Path:
    """`folder / f"{name}.yaml"`: a `moeify train` recipe for a tiny model (4-bit experts, LoRA r 4, float32 unless
    `quantization` says otherwise, 16-token blocks, nothing held out, a log every step, no checkpoints), writing to
    `folder / name`. `data` updates the data section (its `path` at least); `training` the training section, where
    `quantization`, `moe` and `lora` update theirs."""
    import yaml

    sections = {key: training.pop(key) for key in ("quantization", "moe", "lora") if key in training}
    recipe = {
        "model": {"path": str(model)},
        "quantization": {"experts": "nf4", "compute_dtype": "float32", **sections.get("quantization", {})},
        "lora": {"r": 4, "alpha": 8, **sections.get("lora", {})},
        "data": {"max_length": 16, "eval_fraction": 0.0, **data},
        "training": {
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "report_to": "none",
            "disable_tqdm": True,
            "save_strategy": "no",
            **training,
        },
        "moe": sections.get("moe", {}),
        "output": {"dir": str(folder / name)},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
