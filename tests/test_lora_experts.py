"""`moeify convert --method lora-experts` (MixLoRA): the experts share the dense FFN and each adds its own
LoRA delta. The block equals an eager reference (W + s B_e A_e per expert), the conversion is exact at step 0 with B
= 0, the output loads without moeify, and `moeify train` trains the deltas and the router while the FFN stays
frozen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model
from transformers import AutoModelForCausalLM

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.inspect.verify import verify
from moeify.modeling import MoeifyConfig
from moeify.modeling.experts import MoeifyMixLoraExperts

E, K, R = 4, 2, 4


def _reference(
    module: MoeifyMixLoraExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Each expert as a full FFN `W + scale * B_e A_e` (peft's target_parameters layout), one token at a time."""
    d, out = module.deltas, torch.zeros_like(x)

    def expert_weight(base: torch.Tensor, projection: str, e: int) -> torch.Tensor:
        a = getattr(d, f"{projection}_lora_A").view(E, R, -1)[e]
        b = getattr(d, f"{projection}_lora_B").view(-1, R, E)[..., e]
        return base + d.scale * b @ a

    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            gate_up = x[t] @ expert_weight(module.gate_up_proj, "gate_up", e).T
            if module.has_bias:
                gate_up = gate_up + module.gate_up_proj_bias
            gate, up = gate_up.chunk(2)
            y = (module.act_fn(gate) * up) @ expert_weight(module.down_proj, "down", e).T
            if module.has_bias:
                y = y + module.down_proj_bias
            out[t] += weights[t, k] * y
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_lora_experts_block_equals_full_experts_with_the_deltas_folded_in(bias: bool) -> None:
    from transformers import LlamaConfig

    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    config = MoeifyConfig(text_config=text, num_experts=E, num_experts_per_tok=K, expert_lora_rank=R, mlp_bias=bias)
    assert config.expert_lora_alpha == 2 * R
    module = MoeifyMixLoraExperts(config)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)  # B != 0: a trained-looking delta
    x = torch.randn(12, 32, requires_grad=True)
    index = torch.stack([torch.randperm(E)[:K] for _ in range(12)])
    index[:3] = torch.tensor([0, 1])  # expert 3 may get no token: empty groups must work
    weights = torch.rand(12, K)
    out, reference = module(x, index, weights), _reference(module, x, index, weights)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, module.deltas.gate_up_lora_A, module.deltas.down_lora_B])
    expected = torch.autograd.grad(
        reference.square().sum(), [x, module.deltas.gate_up_lora_A, module.deltas.down_lora_B]
    )
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / DENSE_FOLDER


@pytest.mark.parametrize(("arch", "shared"), [("llama", 0), ("llama_mlp_bias", 1), ("gemma3", 1), ("qwen2", 0)])
def test_convert_lora_experts_is_exact_at_step_0_with_zero_b(
    root: Path, tmp_path: Path, arch: str, shared: int
) -> None:
    dense = dense_model(arch, root)
    options = ConvertOptions(
        num_experts=E, top_k=K, shared_experts=shared, method="lora-experts", expert_lora_rank=R, dtype="float32"
    )
    result = convert(str(dense), tmp_path / "moe", options, progress=False, log=print)
    assert result.exact and result.format == "moeify"
    assert arch == "gemma3" or "no LoRA experts" in result.reason  # Gemma 3 has no native MoE class anyway
    report, _ = verify(str(dense), str(tmp_path / "moe"))
    assert report.max_abs_diff <= 1e-5 and report.top1_agreement == 1.0

    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["expert_lora_rank"] == R and config["expert_lora_alpha"] == 2 * R
    saved = load_file(tmp_path / "moe" / "model.safetensors")
    source = load_file(dense / "model.safetensors")
    H, I = saved["model.layers.0.mlp.experts.down_proj"].shape  # noqa: E741
    gate, up = saved["model.layers.1.mlp.experts.gate_up_proj"].chunk(2)
    scale = 0.5 if shared else 1.0  # beside shared experts the routed output is halved (copy upcycling)
    torch.testing.assert_close(gate, source["model.layers.1.mlp.gate_proj.weight"])
    torch.testing.assert_close(up, source["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(
        saved["model.layers.1.mlp.experts.down_proj"], source["model.layers.1.mlp.down_proj.weight"] * scale
    )
    deltas = "model.layers.1.mlp.experts.deltas."
    assert saved[deltas + "gate_up_lora_A"].shape == (E * R, H)
    assert saved[deltas + "gate_up_lora_B"].shape == (2 * I, E * R)
    assert saved[deltas + "down_lora_A"].shape == (E * R, I)
    assert not saved[deltas + "gate_up_lora_B"].any() and not saved[deltas + "down_lora_B"].any()
    a = saved[deltas + "gate_up_lora_A"]
    assert a.std() > 0 and a.abs().max() <= H**-0.5  # peft's LoRA init: U(+-1/sqrt(in))
    assert not torch.equal(a, saved["model.layers.0.mlp.experts.deltas.gate_up_lora_A"])  # seeded per layer
    # Parameter counts: the shared FFN is active for every token, the deltas only for k of E experts.
    delta_params = sum(t.numel() for n, t in saved.items() if ".deltas." in n)
    assert result.params.total - result.params.active == delta_params - delta_params * K // E
    assert (
        "lora-experts (one shared FFN per layer, per-expert LoRA rank 4, alpha 8, B = 0)"
        in (tmp_path / "moe" / "README.md").read_text()
    )


def test_lora_experts_refuses_native_formats_and_per_expert_methods(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense = str(dense_model("llama", root))
    out = str(tmp_path / "out")
    assert main(["convert", dense, "-o", out, "--method", "lora-experts", "--format", "native", "--quiet"]) == 2
    assert "mixtral has no LoRA experts" in capsys.readouterr().err
    assert main(["convert", dense, "-o", out, "--method", "lora-experts", "--granularity", "2", "--quiet"]) == 2
    assert "does not combine with --granularity" in capsys.readouterr().err
    assert main(["convert", dense, "-o", out, "--method", "lora-experts", "--expert-lora-rank", "0", "--quiet"]) == 2
    assert "--expert-lora-rank must be at least 1" in capsys.readouterr().err
    assert not Path(out).exists()


_REMOTE = r"""
import sys, torch
sys.modules["moeify"] = None  # `import moeify` raises ImportError from here on
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
experts = type(model.model.layers[0].mlp.experts).__name__
torch.save({"logits": model(ids).logits, "experts": experts}, sys.argv[3])
"""


def test_trained_lora_experts_survive_save_load_without_moeify_and_generate_with_cache(
    root: Path, tmp_path: Path
) -> None:
    dense = dense_model("llama", root)
    options = ConvertOptions(num_experts=E, top_k=K, method="lora-experts", expert_lora_rank=R, dtype="float32")
    convert(str(dense), tmp_path / "moe", options, progress=False, log=print)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():  # trained-looking deltas
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    reference = model(ids).logits
    model.save_pretrained(tmp_path / "trained")
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-c", _REMOTE, str(tmp_path / "trained"), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "o.pt")
    assert remote["experts"] == "MoeifyMixLoraExperts"
    torch.testing.assert_close(remote["logits"], reference, atol=1e-5, rtol=1e-5)

    prompt = ids[:1, :6]
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    tokens = prompt
    for _ in range(5):
        next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_moeify_train_trains_the_deltas_and_router_then_merge_writes_full_experts(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel

    from moeify.train.dry_run import estimate
    from moeify.train.recipe import load_recipe

    dense = dense_model("qwen2", root)
    moe = tmp_path / "moe"
    options = ConvertOptions(num_experts=E, top_k=K, method="lora-experts", expert_lora_rank=R, dtype="float32")
    convert(str(dense), moe, options, progress=False, log=print)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = {
        "model": {"path": str(moe)},
        "quantization": {"experts": "none", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "targets": ["attention", "experts"]},
        "data": {"path": str(corpus), "max_length": 16, "eval_fraction": 0.0},
        "training": {
            "per_device_train_batch_size": 2,
            "max_steps": 8,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    assert main(["train", str(path), "quantization.experts=nf4"]) == 2
    err = capsys.readouterr().err
    assert "lora-experts model" in err and "quantization.experts: none" in err
    assert main(["train", str(path)]) == 0
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0], losses

    # Stock peft loads the adapter onto the converted model; the deltas and routers are saved whole.
    base = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = PeftModel.from_pretrained(base, tmp_path / "run").merge_and_unload()
    after = dict(model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        if ".deltas.gate_up_lora_B" in name or ".deltas.down_lora_B" in name or name.endswith("router.weight"):
            assert changed, name
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert not changed, name  # the FFN the experts share is frozen
    trained = sum(
        p.numel() for n, p in PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(moe), tmp_path / "run", is_trainable=True
        ).named_parameters() if p.requires_grad
    )  # fmt: skip
    assert estimate(load_recipe(path)).trainable_params == trained

    # `moeify merge` folds the trained deltas into an ordinary MoE with full experts (W + s B_e A_e per expert).
    assert main(["merge", str(moe), str(tmp_path / "run"), "-o", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["expert_lora_rank"] == 0 and config["expert_lora_alpha"] is None
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any(".deltas." in name for name in saved)
    gate_up = saved["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape[0] == E and not torch.equal(gate_up[0], gate_up[1])  # the experts differ now
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged.model.layers[0].mlp.experts).__name__ != "MoeifyMixLoraExperts"
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    expected = model.eval()(ids).logits
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


def _adapter(dense: Path, out: Path, seed: int, targets: list[str], r: int = 4) -> Path:
    """A peft LoRA adapter of the dense model with trained-looking (non-zero) B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32),
        LoraConfig(r=r, lora_alpha=3 * r, target_modules=targets),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize(("arch", "shared"), [("llama", 0), ("llama", 1), ("phi3", 0)])
def test_lora_expert_adapters_seed_experts_that_compute_the_fine_tuned_ffns(
    root: Path, tmp_path: Path, arch: str, shared: int
) -> None:
    from peft import PeftModel

    dense = dense_model(arch, root)
    ffn = ["gate_up_proj", "down_proj"] if arch == "phi3" else ["gate_proj", "up_proj", "down_proj"]
    adapters = [_adapter(dense, tmp_path / f"a{i}", i, [*ffn, "q_proj"]) for i in range(2)]
    flags = ["--num-experts", str(E), "--top-k", str(K), "--shared-experts", str(shared), "--dtype", "float32"]
    flags += ["--method", "lora-experts", "--expert-lora-rank", "8", "--quiet"]
    flags += [f for a in adapters for f in ("--lora-expert", str(a))]
    assert main(["convert", str(dense), "-o", str(tmp_path / "moe"), *flags]) == 0
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert "--lora-expert" in config["moeify_deviation"]
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    x = torch.randn(6, moe.config.hidden_size)
    for e in range(E):
        experts = moe.model.layers[2].mlp.experts
        got = experts(x, torch.full((6, 1), e), torch.ones(6, 1))
        if e < len(adapters):  # the fine-tune's FFN (dense + its LoRA merged), halved beside shared experts
            tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense), adapters[e])
            want = tuned.merge_and_unload().model.layers[2].mlp(x)
        else:  # a fresh expert: the dense FFN
            want = AutoModelForCausalLM.from_pretrained(dense).model.layers[2].mlp(x)
        torch.testing.assert_close(got, want * (0.5 if shared else 1.0), atol=1e-5, rtol=1e-4)


def test_lora_expert_errors(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = dense_model("llama", root)
    wide = _adapter(dense, tmp_path / "wide", 0, ["gate_proj", "up_proj"], r=4)
    attention = _adapter(dense, tmp_path / "attention", 0, ["q_proj"])
    out = str(tmp_path / "out")
    base = ["convert", str(dense), "-o", out, "--num-experts", str(E), "--quiet"]
    assert main([*base, "--lora-expert", str(wide)]) == 2
    assert "--lora-expert seeds the deltas of --method lora-experts" in capsys.readouterr().err
    lora = [*base, "--method", "lora-experts", "--expert-lora-rank", "6"]
    assert main([*lora, "--lora-expert", str(wide)]) == 2
    assert "needs rank 8 in one expert; raise --expert-lora-rank to at least that (it is 6)" in capsys.readouterr().err
    assert main([*lora, "--lora-expert", str(attention)]) == 2
    assert "has no LoRA on the FFN" in capsys.readouterr().err
    assert main([*lora, "--lora-expert", str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not Path(out).exists()
