"""`moeify train RECIPE` on a tiny upcycled MoE: transformers' Trainer with 4-bit experts + LoRA, loss falls, the
adapter lands in peft's layout, and `moeify merge` turns it into a full-precision model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError


def test_thirty_steps_lower_the_loss_and_save_a_peft_adapter(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _tiny_run(
        tmp_path,
        tmp_path_factory,
        "run",
        per_device_train_batch_size=4,
        max_steps=30,
        learning_rate=3e-2,
        logging_steps=5,
        save_steps=15,
    )
    moe = tmp_path / "moe"
    overrides = ["lora.r=8", "lora.alpha=16", "data.eval_fraction=0.1"]
    assert main(["train", str(path), *overrides]) == 0

    run = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_results.json", "trainer_state.json"):
        assert (run / name).exists(), name
    assert (run / "checkpoint-30" / "trainer_state.json").exists()
    losses = [
        entry["loss"]
        for entry in json.loads((run / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    # A random tiny model's frozen LM head bounds its logits (|logit| < ~0.5): near ln(vocab) = 5.77 every drop counts.
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.05, losses
    logged = [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all(0 < e["router/entropy"] <= 1.3863 and 0.25 <= e["router/busiest_share"] <= 1 for e in logged)  # log 4
    assert all(f"router/load_cv/L{i}" in e for e in logged for i in range(4))
    results = json.loads((run / "train_results.json").read_text())
    assert "eval_loss" in results and results["train_runtime"] > 0
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["modules_to_save"] == ["gate", "shared_expert_gate"]
    assert sorted(adapter["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    capsys.readouterr()
    assert main(["merge", str(moe), str(run), "-o", str(tmp_path / "merged"), "--quiet"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert_merged_is_the_trained_model(tmp_path / "merged", moe, run)


def assert_merged_is_the_trained_model(merged: Path, base: Path, adapter: Path) -> None:
    """The merged folder loads as a plain model whose logits are stock peft's (the trained adapter on the
    full-precision base) within float32 rounding, and far from the untrained base's: a merge that dropped (part of)
    the adapter, or scaled it wrongly, fails."""
    import torch
    from peft import PeftModel
    from tiny_models import build_tokenizer
    from transformers import AutoModelForCausalLM

    batch = build_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(**batch).logits[mask]

    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    untrained = logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    expected = logits(trained)
    tolerance = 1e-4 * expected.abs().max()  # float32 rounding of W + scale * B @ A vs peft's separate LoRA path
    difference, trained_shift = (got - expected).abs().max(), (expected - untrained).abs().max()
    assert trained_shift > 100 * tolerance, "training must have moved the logits for this check to mean anything"
    assert (got - untrained).abs().max() > 100 * tolerance, "the merged model is the untrained base"
    assert difference <= tolerance, (difference, tolerance)


def test_data_sources_and_their_errors(tmp_path: Path) -> None:
    from tiny_models import build_tokenizer
    from transformers import PreTrainedTokenizerFast

    from moeify.data.corpus import builtin_corpus, python_docstrings, python_stdlib
    from moeify.data.text import build_datasets
    from moeify.errors import MoeifyError
    from moeify.train.recipe import DataRecipe

    tokenizer: PreTrainedTokenizerFast = build_tokenizer()
    texts = python_docstrings()
    assert len(texts) > 300 and texts == python_docstrings()  # the same corpus every time
    stdlib = python_stdlib()
    assert stdlib == python_stdlib() and len(stdlib) > 500
    assert sum(map(len, stdlib)) > 10 * sum(map(len, texts))  # ten times the docstrings' text
    import json as json_module  # the standard library's own source is in it; its test suite is not
    import sysconfig

    assert Path(json_module.__file__).read_text().strip() in stdlib
    tests = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))[:20]
    assert not {p.read_text(encoding="utf-8", errors="replace").strip() for p in tests} & set(stdlib)
    assert builtin_corpus("python-stdlib") == stdlib
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in PROMPTS * 4))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("\n".join(PROMPTS * 4))
    for path, field in (
        (tmp_path / "a.jsonl", "body"),
        (tmp_path / "docs", "text"),
        ("builtin:python-docstrings", "text"),
    ):
        train_set, eval_set = build_datasets(
            DataRecipe(path=str(path), text_field=field, max_length=8, eval_fraction=0.25), tokenizer
        )
        assert eval_set is not None and len(train_set) > len(eval_set) > 0
        row = train_set[0]
        assert len(row["input_ids"]) == 8 and row["labels"] == row["input_ids"]
    bad = [
        (
            DataRecipe(path=str(tmp_path / "a.jsonl"), text_field="text"),
            "data.text_field 'text' is not a column; columns: body",
        ),
        (DataRecipe(path=str(tmp_path / "a.xlsx")), "does not exist"),
        (DataRecipe(path="builtin:poems"), "no such built-in corpus"),
        (
            DataRecipe(path=str(tmp_path / "a.jsonl"), text_field="body", max_length=100000),
            "no training block of 100000 tokens",
        ),
    ]
    for data, message in bad:
        with pytest.raises(MoeifyError, match=message):
            build_datasets(data, tokenizer)


def test_held_out_documents_are_never_in_training_blocks(tmp_path: Path) -> None:
    import re

    from tiny_models import build_tokenizer

    from moeify.data.text import build_datasets
    from moeify.errors import MoeifyError
    from moeify.train.recipe import DataRecipe

    tokenizer = build_tokenizer()
    # Document i is its own number, repeated: a block's numbers say which documents its text came from.
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"{i:04d} " * 12}) + "\n" for i in range(40)))

    def numbers(blocks: object) -> set[str]:
        return {n for row in blocks for n in re.findall(r"\d{4}", tokenizer.decode(row["input_ids"]))}

    data = DataRecipe(path=str(tmp_path / "docs.jsonl"), max_length=8, eval_fraction=0.2, eval_seed=1)
    train, held_out = build_datasets(data, tokenizer)
    assert held_out is not None and numbers(held_out) and numbers(train)
    assert not numbers(train) & numbers(held_out)  # no document on both sides
    assert len(numbers(held_out)) <= 8  # 20% of 40 documents
    _, other_draw = build_datasets(DataRecipe(**{**data.__dict__, "eval_seed": 2}), tokenizer)
    assert numbers(other_draw) != numbers(held_out)  # the draw follows eval_seed
    few = build_datasets(DataRecipe(**{**data.__dict__, "eval_blocks": 3}), tokenizer)[1]
    assert len(few) == 3 and len(held_out) > 3
    assert {tuple(r["input_ids"]) for r in few} < {tuple(r["input_ids"]) for r in held_out}
    # Held-out blocks cut from the packed stream share documents with the training blocks.
    train, held_out = build_datasets(DataRecipe(**{**data.__dict__, "eval_split": "blocks"}), tokenizer)
    assert numbers(train) & numbers(held_out)

    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "0001 " * 50}) + "\n")
    with pytest.raises(MoeifyError, match="needs at least 2 documents .* Use data.eval_split: blocks"):
        build_datasets(DataRecipe(**{**data.__dict__, "path": str(tmp_path / "one.jsonl")}), tokenizer)
    one = DataRecipe(**{**data.__dict__, "path": str(tmp_path / "one.jsonl"), "eval_split": "blocks"})
    assert build_datasets(one, tokenizer)[1] is not None
    with pytest.raises(MoeifyError, match="held-out documents make no block of 64 tokens"):
        build_datasets(DataRecipe(**{**data.__dict__, "max_length": 64, "eval_fraction": 0.02}), tokenizer)


def _tiny_run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, out: str, **training: object) -> Path:
    """A recipe for a tiny Qwen2-MoE on repeated prompts, written to tmp_path / f"{out}.yaml"."""
    moe = tmp_path / "moe"
    if not moe.exists():
        dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
        convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False, log=print)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    recipe = {
        "model": {"path": str(moe)},
        "quantization": {"experts": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(corpus), "max_length": 16, "eval_fraction": 0.0},
        "training": {
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "report_to": "none",
            "disable_tqdm": True,
            **training,
        },
        "output": {"dir": str(tmp_path / out)},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


_KILLED_RUN = r"""
import os, signal, sys
from moeify.cli import main
from moeify.train import run

original = run.MoeTrainer.compute_loss

def compute_loss(self, *args, **kwargs):
    if self.state.global_step == 7:  # checkpoint-5 is on disk; steps 6 and 7 are lost with the process
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

run.MoeTrainer.compute_loss = compute_loss
sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_killed_run_resumes_with_the_losses_of_an_uninterrupted_one(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import subprocess
    import sys

    steps = {"max_steps": 10, "save_steps": 5}
    assert main(["train", str(_tiny_run(tmp_path, tmp_path_factory, "straight", **steps))]) == 0
    killed = _tiny_run(tmp_path, tmp_path_factory, "killed", **steps)
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(killed)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_dir = tmp_path / "killed"
    assert (run_dir / "checkpoint-5" / "trainer_state.json").exists() and not (run_dir / "checkpoint-10").exists()
    (run_dir / "checkpoint-7").mkdir()  # what a kill while saving leaves: no trainer_state.json
    (run_dir / "checkpoint-7" / "adapter_model.safetensors").write_bytes(b"half")
    assert main(["train", str(killed), "--resume"]) == 0

    def losses(folder: str) -> dict[int, float]:
        history = json.loads((tmp_path / folder / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    straight, resumed = losses("straight"), losses("killed")
    assert sorted(resumed) == list(range(1, 11))  # steps 1-5 from checkpoint-5's history, 6-10 trained again
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step


def test_evaluations_along_the_run_and_once_at_its_end(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = {"max_steps": 6, "eval_strategy": "steps", "eval_steps": 3, "eval_on_start": True}
    path = _tiny_run(tmp_path, tmp_path_factory, "evaluated", **settings)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["eval_fraction"] = 0.25
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    history = json.loads((tmp_path / "evaluated" / "trainer_state.json").read_text())["log_history"]
    evaluated = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluated] == [0, 3, 6]  # the last step's evaluation is not repeated
    results = json.loads((tmp_path / "evaluated" / "train_results.json").read_text())
    assert results["eval_loss"] == evaluated[-1]["eval_loss"] != evaluated[0]["eval_loss"]

    settings["max_steps"] = 5  # the last step is not an evaluation step: the run evaluates once more at its end
    path = _tiny_run(tmp_path, tmp_path_factory, "odd", **settings)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["eval_fraction"] = 0.25
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    history = json.loads((tmp_path / "odd" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [0, 3, 5]


def test_router_warmup_trains_only_the_routers_first(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    import torch
    from safetensors.torch import load_file

    from moeify.train.recipe import load_recipe
    from moeify.train.run import train

    path = _tiny_run(tmp_path, tmp_path_factory, "warm", max_steps=3, save_steps=1, learning_rate=1e-2)
    recipe = yaml.safe_load(path.read_text())
    recipe["moe"] = {"router_warmup_steps": 2}
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0

    def adapter(step: int) -> dict[str, torch.Tensor]:
        return load_file(tmp_path / "warm" / f"checkpoint-{step}" / "adapter_model.safetensors")

    routers = [k for k in adapter(1) if ".gate." in k or k.endswith(".gate.weight") or "expert_gate" in k]
    lora_b = [k for k in adapter(1) if "lora_B" in k]
    assert routers and lora_b
    for step in (1, 2):  # warm-up: LoRA B stays at its zero init, the routers move
        assert all(not adapter(step)[k].any() for k in lora_b), step
    assert any(not torch.equal(adapter(1)[k], adapter(2)[k]) for k in routers)
    assert all(adapter(3)[k].any() for k in lora_b)  # after it, every LoRA trains

    recipe["lora"]["train_router"] = False
    recipe["output"]["dir"] = str(tmp_path / "no-router")
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(MoeifyError, match="router_warmup_steps: the model has no trained router"):
        train(load_recipe(path))
    assert not (tmp_path / "no-router" / "train_results.json").exists()


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moeify.train import run

    original = run.causal_lm_loss_terms
    calls = []

    def poisoned(*args: object, **kwargs: object):  # noqa: ANN202
        calls.append(1)
        terms = original(*args, **kwargs)
        return terms._replace(token_loss_sum=terms.token_loss_sum * float("nan")) if len(calls) == 3 else terms

    monkeypatch.setattr(run, "causal_lm_loss_terms", poisoned)
    recipe = _tiny_run(tmp_path, tmp_path_factory, "nan", max_steps=6, save_steps=2)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "the training loss is nan at step 3; the last good checkpoint is" in err
    assert str(tmp_path / "nan" / "checkpoint-2") in err


def test_4bit_experts_are_loaded_onto_the_trainers_device(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`moeify train` quantizes the experts where the Trainer trains (this process's GPU under DDP), not on the CPU
    first: load_for_training gets TrainingArguments.device."""
    import torch

    import moeify.quant

    original = moeify.quant.load_for_training
    devices = []

    def recording(*args: object, **kwargs: object):  # noqa: ANN202
        devices.append(kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(moeify.quant, "load_for_training", recording)
    recipe = _tiny_run(tmp_path, tmp_path_factory, "device", max_steps=1)
    assert main(["train", str(recipe)]) == 0
    assert len(devices) == 1 and isinstance(devices[0], torch.device)
    assert devices[0].type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_upcycle_train_merge_and_push_in_one_recipe(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.source + model.convert upcycle on the fly; output.merge and output.push_to_hub run at the end."""
    from fake_hub import FakeHub, point_huggingface_hub_at
    from huggingface_hub import close_session

    dense = dense_model("llama", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 4))
    recipe = {
        "model": {"source": str(dense), "convert": {"num_experts": 4, "top_k": 2}},
        "quantization": {"experts": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(corpus), "max_length": 16, "eval_fraction": 0.0},
        "training": {
            "per_device_train_batch_size": 2,
            "max_steps": 3,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "save_steps": 3,
            "report_to": "none",
            "disable_tqdm": True,
        },
        "output": {"dir": str(tmp_path / "run"), "merge": True, "push_to_hub": "acme/moe-lora"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with FakeHub() as hub:
        point_huggingface_hub_at(hub.endpoint, tmp_path / "hf-home", monkeypatch)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
        close_session()
        try:
            assert main(["train", str(path)]) == 0
        finally:
            close_session()
        [commit] = hub.commits
    run = tmp_path / "run"
    assert json.loads((run / "upcycled" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert_merged_is_the_trained_model(run / "merged", run / "upcycled", run)
    card = (run / "README.md").read_text()
    assert "base_model:" in card and "router/entropy" in card and "train_loss" in card and "num_experts: 4" in card
    assert commit.repo_id == "acme/moe-lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "train_results.json"} <= set(commit.files)
    assert not any(name.startswith(("checkpoint-", "merged/", "upcycled/")) for name in commit.files)


@pytest.mark.parametrize("mode", ["full-precision-experts", "full-fine-tuning"])
def test_full_precision_experts_lora_and_full_fine_tuning(
    mode: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    settings = {"max_steps": 3, "save_strategy": "no"}
    path = _tiny_run(tmp_path, tmp_path_factory, "run", **settings)
    overrides = ["quantization.experts=none"] + (["lora=null"] if mode == "full-fine-tuning" else [])
    assert main(["train", str(path), *overrides]) == 0
    run = tmp_path / "run"
    losses = [e["loss"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (run / "tokenizer_config.json").exists()
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    if mode == "full-fine-tuning":  # a whole model, every weight trained
        after = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
        changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
        assert any("experts" in n for n in changed) and any("q_proj" in n for n in changed)
    else:  # peft's own target_parameters LoRA on the full-precision experts: stock peft's layout
        adapter = json.loads((run / "adapter_config.json").read_text())
        assert sorted({p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in adapter["target_parameters"]}) == [
            "experts.down_proj",
            "experts.gate_up_proj",
        ]
        weights = load_file(run / "adapter_model.safetensors")
        assert any("experts" in k and "lora_B" in k and weights[k].abs().sum() > 0 for k in weights)


def test_full_fine_tuning_runs_native_experts_with_moeify(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every weight trains: a native MoE's experts run `experts_implementation="moeify"` (grouped_mm off the CPU)."""
    from moeify.train.recipe import load_recipe
    from moeify.train.run import load_model

    path = _tiny_run(tmp_path, tmp_path_factory, "run")
    model = load_model(load_recipe(path, ["quantization.experts=none", "lora=null"]), str(tmp_path / "moe"))
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config._experts_implementation == "moeify"
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "moeify"
    # The recipe picks another implementation (moe.experts_implementation), e.g. the grouped candidate for GPUs.
    chosen = load_recipe(path, ["quantization.experts=none", "lora=null", "moe.experts_implementation=moeify_grouped"])
    model = load_model(chosen, str(tmp_path / "moe"))
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "moeify_grouped"
    with pytest.raises(MoeifyError, match="experts_implementation"):
        load_recipe(path, ["quantization.experts=none", "lora=null", "moe.experts_implementation=fastest"])
    with pytest.raises(MoeifyError, match="applies to full fine-tuning"):
        load_recipe(path, ["quantization.experts=none", "moe.experts_implementation=eager"])


def test_chat_messages_with_loss_on_assistant_turns_only(tmp_path: Path) -> None:
    from tiny_models import build_tokenizer

    from moeify.data.text import build_datasets
    from moeify.train.recipe import DataRecipe

    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chats = [
        [
            {"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
            {"role": "assistant", "content": PROMPTS[(i + 1) % len(PROMPTS)]},
        ]
        for i in range(12)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    data = DataRecipe(
        path=str(tmp_path / "chat.jsonl"),
        messages_field="messages",
        assistant_only_loss=True,
        max_length=24,
        eval_fraction=0.0,
        packing=False,
    )
    with pytest.raises(Exception, match="no training block"):  # conversations shorter than 24 tokens are dropped
        build_datasets(DataRecipe(**{**data.__dict__, "max_length": 10_000}), tokenizer)
    data = DataRecipe(**{**data.__dict__, "packing": True})
    blocks, _ = build_datasets(data, tokenizer)
    predicted = [t for row in blocks for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    ignored = [t for row in blocks for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100]
    assert predicted and ignored
    assert all(
        label in (-100, token) for row in blocks for token, label in zip(row["input_ids"], row["labels"], strict=True)
    )
    assert "user" not in tokenizer.decode(predicted) and "assistant" in tokenizer.decode(predicted)
    assert "user" in tokenizer.decode(ignored)


def test_router_losses_reach_the_logged_loss(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1's logged loss (before any update) grows by exactly the aux loss and the z-loss when their coefficients
    are 1. The references are computed here, by hand, from what the routers saw in that very forward (their inputs
    times their weights): the Switch loss `n * sum_i f_i P_i` and `mean(logsumexp(router_logits)^2)`, each per
    layer over the non-padding tokens, averaged over layers."""
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    from moeify.train import run

    original = run.causal_lm_loss_terms
    calls: list[tuple[float, float, float]] = []  # (router_loss, aux, z) of each loss computed

    def recording(model, input_ids, labels=None, attention_mask=None, **kwargs):  # noqa: ANN001, ANN202
        seen: list[tuple[torch.Tensor, int]] = []  # (router logits, top k) of each router that ran

        def router_logits(router: torch.nn.Module, args: tuple, _out: object) -> None:
            hidden = args[0].detach().reshape(-1, router.weight.shape[1]).float()
            seen.append((F.linear(hidden, router.weight.detach().float()), router.top_k))

        routers = [m for m in model.modules() if isinstance(m, Qwen2MoeTopKRouter)]
        hooks = [router.register_forward_hook(router_logits) for router in routers]
        try:
            terms = original(model, input_ids, labels, attention_mask, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        keep = mask.reshape(-1).bool().cpu()
        aux, z = [], []
        for logits, top_k in seen:
            logits = logits.cpu()[keep]
            probs = logits.softmax(-1)
            picked = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
            aux.append(probs.shape[-1] * (picked.mean(0) * probs.mean(0)).sum())
            z.append((torch.logsumexp(logits, -1) ** 2).mean())
        assert len(seen) == 4  # one router per layer
        calls.append((float(terms.router_loss), float(torch.stack(aux).mean()), float(torch.stack(z).mean())))
        return terms

    monkeypatch.setattr(run, "causal_lm_loss_terms", recording)
    settings = {"max_steps": 1, "save_strategy": "no"}
    _tiny_run(tmp_path, tmp_path_factory, "none", **settings)
    _randomize_routers(tmp_path / "moe")
    first, reference = {}, {}
    for name, moe in {"none": (0.0, 0.0), "aux": (1.0, 0.0), "z": (0.0, 1.0)}.items():
        calls.clear()
        path = _tiny_run(tmp_path, tmp_path_factory, name, **settings)
        assert main(["train", str(path), f"moe.aux_loss_coef={moe[0]}", f"moe.z_loss_coef={moe[1]}"]) == 0
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        first[name] = next(e["loss"] for e in history if "loss" in e)
        router_loss, aux, z = calls[0]  # step 1, one micro-batch
        reference[name] = moe[0] * aux + moe[1] * z
        assert router_loss == pytest.approx(reference[name], abs=1e-5), (name, router_loss, aux, z)
    # Skewed routers: neither loss is its uniform-routing value (k = 2, ln(4)^2), which many wrong formulas also give.
    assert reference["none"] == 0 and abs(reference["aux"] - 2) > 0.05 and abs(reference["z"] - math.log(4) ** 2) > 0.5
    assert first["aux"] - first["none"] == pytest.approx(reference["aux"], abs=1e-5), (first, reference)
    assert first["z"] - first["none"] == pytest.approx(reference["z"], abs=1e-5), (first, reference)


def _randomize_routers(moe: Path) -> None:
    """Give the upcycled routers (initialised near zero: uniform routing) random weights of logits of order 1."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(moe / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    routers = [name for name in tensors if name.endswith("mlp.gate.weight")]
    assert len(routers) == 4
    for name in routers:
        tensors[name] = torch.randn(tensors[name].shape, generator=generator) * 0.5
    save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["moeify-format-4bit", "full-precision-lora"])
def test_loss_falls_over_thirty_steps(case: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The moeify format (Gemma 3 with a shared expert) with 4-bit experts, and a native MoE with full-precision
    experts and peft's LoRA, both learn over 30 steps."""
    settings = {
        "per_device_train_batch_size": 4,
        "max_steps": 30,
        "learning_rate": 3e-2,
        "logging_steps": 5,
        "save_strategy": "no",
    }
    if case == "moeify-format-4bit":
        dense = dense_model("gemma3", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
        convert(
            str(dense),
            tmp_path / "moe",
            ConvertOptions(num_experts=4, top_k=2, shared_experts=1),
            progress=False,
            log=print,
        )
    path = _tiny_run(tmp_path, tmp_path_factory, "run", **settings)
    overrides = ["quantization.experts=none"] if case == "full-precision-lora" else []
    assert main(["train", str(path), *overrides]) == 0
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.05, losses


def test_a_dense_baseline_trains_with_lora_on_its_ffn_at_the_expert_rank(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dense model an MoE is compared with: `experts` targets its FFN linears at expert_r / expert_alpha,
    `--dry-run` counts exactly the parameters peft trains, and 4-bit experts on it are refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moeify.train.dry_run import estimate
    from moeify.train.recipe import load_recipe

    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    path = _tiny_run(tmp_path, tmp_path_factory, "dense", max_steps=2, save_strategy="no")
    overrides = [
        f"model.path={dense}",
        "quantization.experts=none",
        "lora.expert_r=6",
        "lora.expert_alpha=3",
        "lora.targets=[attention, experts]",
    ]
    assert main(["train", str(path), "quantization.experts=nf4", *overrides[:1]]) == 2
    err = capsys.readouterr().err
    assert "nothing to quantize" in err and "quantization.experts: none" in err
    assert main(["train", str(path), *overrides]) == 0
    adapter = json.loads((tmp_path / "dense" / "adapter_config.json").read_text())
    assert {"q_proj", "gate_proj", "up_proj", "down_proj"} <= set(adapter["target_modules"])
    assert adapter["rank_pattern"] == dict.fromkeys(["down_proj", "gate_proj", "up_proj"], 6)
    assert adapter["alpha_pattern"] == dict.fromkeys(["down_proj", "gate_proj", "up_proj"], 3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense), tmp_path / "dense")
    ranks = {n.split(".")[-4]: p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks["gate_proj"] == ranks["down_proj"] == 6 and ranks["q_proj"] == 4
    trained = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert estimate(load_recipe(path, overrides)).trainable_params == trained


@pytest.mark.parametrize("progress_bar", [True, False])
def test_console_shows_mean_router_figures_and_the_state_every_layer(
    progress_bar: bool, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _tiny_run(tmp_path, tmp_path_factory, "log", max_steps=2, save_strategy="no", disable_tqdm=not progress_bar)
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    printed = "".join(capsys.readouterr())
    assert "'router/load_cv':" in printed and "'router/entropy':" in printed
    assert "router/load_cv/L" not in printed
    history = json.loads((tmp_path / "log" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 2 and all(f"router/load_cv/L{i}" in e for e in logged for i in range(4))
