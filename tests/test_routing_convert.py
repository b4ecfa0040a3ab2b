"""Router settings at conversion (`moeify convert` flags) and in training (the recipe's `moe` section): they choose
moeify's format, land in the config, keep the upcycle exact where they are inference-neutral, and are reported
where they are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import DENSE_FOLDER, PROMPTS, dense_model
from transformers import AutoModelForCausalLM

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError
from moeify.inspect.verify import verify

NEUTRAL = [
    "--router-scoring", "sigmoid", "--router-network", "mlp", "--router-hidden-size", "12", "--noisy-top-k",
    "--router-jitter", "0.1", "--capacity-factor", "1.25", "--bias-update-rate", "0.001", "--gating-residual",
    "--z-loss-coef", "0.001", "--aux-loss-coef", "0.02",
]  # fmt: skip


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)


def test_inference_neutral_router_flags_pick_moeify_format_and_stay_exact(
    dense: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "moe"
    assert main(["convert", str(dense), "-o", str(out), "--num-experts", "4", "--shared-experts", "1", *NEUTRAL]) == 0
    printed = capsys.readouterr()
    assert "MoeifyForCausalLM" in printed.err and "have no equivalent in the stock" in printed.err
    assert "outputs equal the dense model's at step 0" in printed.out
    router = json.loads((out / "config.json").read_text())["router"]
    assert router["scoring"] == "sigmoid" and router["network"] == "mlp" and router["mlp_hidden_size"] == 12
    assert router["noisy_top_k"] and router["gating_residual"] and router["capacity_factor"] == 1.25
    assert (router["jitter"], router["bias_update_rate"], router["z_loss_coef"]) == (0.1, 0.001, 0.001)
    model = AutoModelForCausalLM.from_pretrained(out)
    mlp = model.model.layers[0].mlp
    assert mlp.router.input_proj.weight.shape == (12, model.config.hidden_size)
    assert torch.count_nonzero(mlp.router.noise.weight) == 0 and torch.count_nonzero(mlp.router.residual.weight) == 0
    assert torch.count_nonzero(mlp.router.input_proj.weight) > 0
    report, _ = verify(str(dense), str(out), tolerance=1e-5)
    assert report.passed, str(report)
    card = (out / "README.md").read_text()
    assert "computes the same outputs as the dense one" in card and "scoring=sigmoid" in card


def test_null_experts_are_written_and_verify_reports_the_deviation(
    dense: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "moe"
    args = ["convert", str(dense), "-o", str(out), "--num-experts", "4", "--null-experts", "zero=1,copy=1,constant=2"]
    assert main(args) == 0
    assert "outputs differ from the dense model's" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    mlp = model.model.layers[0].mlp
    assert mlp.router.weight.shape == (4 + 4, model.config.hidden_size)
    assert mlp.constant_experts.vectors.shape == (2, model.config.hidden_size)
    card = (out / "README.md").read_text()
    assert "does **not** compute the dense model's outputs at step 0" in card and "null experts" in card
    assert main(["verify", str(dense), str(out), "--tolerance", "1e-5"]) == 0
    printed = capsys.readouterr().out
    assert "DEVIATES by design" in printed and "null experts (1 zero, 1 copy, 2 constant)" in printed


def test_router_flags_that_native_formats_cannot_express(dense: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    args = ["convert", str(dense), "-o", str(tmp_path / "moe"), "--format", "native", "--router-scoring", "sigmoid"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "scoring=sigmoid" in err and "--format moeify" in err
    assert not (tmp_path / "moe").exists()
    assert main(["convert", str(dense), "-o", str(tmp_path / "bad"), "--null-experts", "zero=one"]) == 2
    assert "--null-experts zero=N" in capsys.readouterr().err
    assert main(["convert", str(dense), "-o", str(tmp_path / "bad"), "--router-jitter", "1.5"]) == 2
    assert "jitter" in capsys.readouterr().err


def test_every_moe_recipe_key_reaches_the_model_and_bias_balancing_runs(
    dense: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    moe = tmp_path / "moe"
    options = ConvertOptions(num_experts=4, top_k=2, router={"bias_update_rate": 0.001})  # the bias exists
    convert(str(dense), moe, options, progress=False, log=print)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 8))
    moe_section = {
        "aux_loss_coef": 0.03,
        "z_loss_coef": 0.002,
        "jitter": 0.05,
        "capacity_factor": 2.0,
        "bias_update_rate": 0.01,
    }
    recipe = {
        "model": {"path": str(moe)},
        "quantization": {"experts": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(corpus), "max_length": 16, "eval_fraction": 0.0},
        "training": {"per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3, "seed": 0,
                     "report_to": "none", "disable_tqdm": True, "save_strategy": "no"},
        "moe": moe_section,
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    from moeify.train.balancing import BiasBalancingCallback
    from moeify.train.recipe import load_recipe
    from moeify.train.run import MoeTrainer, load_model

    loaded = load_recipe(path)
    plain = tmp_path / "plain"  # converted without the bias: a recipe cannot add it (the adapter could not carry it)
    convert(str(dense), plain, ConvertOptions(num_experts=4, top_k=2, format="moeify"), progress=False, log=print)
    with pytest.raises(MoeifyError, match="--bias-update-rate"):
        load_model(loaded, str(plain))
    model = load_model(loaded, str(moe))
    router = model.get_base_model().config.router
    assert {key: router[key] for key in moe_section} == moe_section
    from moeify.inspect.router_stats import routers

    active = list(routers(model).values())
    assert len(active) == 4  # every layer's router, as it runs (peft's trained copy)
    assert all((r.jitter, r.capacity_factor, r.bias_update_rate) == (0.05, 2.0, 0.01) for r in active)

    seen: list[MoeTrainer] = []
    original = MoeTrainer.train

    def spy(self: MoeTrainer, *args: object, **kwargs: object) -> object:
        seen.append(self)
        return original(self, *args, **kwargs)

    MoeTrainer.train = spy  # type: ignore[method-assign]
    try:
        assert main(["train", str(path)]) == 0
    finally:
        MoeTrainer.train = original  # type: ignore[method-assign]
    trainer = seen[0]
    assert any(isinstance(c, BiasBalancingCallback) for c in trainer.callback_handler.callbacks)
    biases = [r.e_score_correction_bias for r in routers(trainer.model).values()]
    assert len(biases) == 4 and all(torch.count_nonzero(b) > 0 for b in biases), "three steps moved every layer's bias"
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    saved_biases = [v for k, v in saved.items() if k.endswith("e_score_correction_bias")]
    assert len(saved_biases) == 4, "the adapter carries the trained biases"
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe), tmp_path / "run")
    for trained, loaded_router in zip(biases, routers(reloaded).values(), strict=True):
        torch.testing.assert_close(loaded_router.e_score_correction_bias, trained)
    for bias in biases:  # 3 steps of +-0.01 (or 0 where an expert had exactly the mean load)
        assert bias.abs().max() <= 0.03 + 1e-6
        torch.testing.assert_close(bias, (bias * 100).round() / 100, atol=1e-6, rtol=0)


def test_route_stats_prints_the_table_and_draws_a_heatmap(
    dense: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "moe"
    args = ["convert", str(dense), "-o", str(out), "--num-experts", "4", "--null-experts", "zero=1,copy=1"]
    assert main([*args, "--quiet"]) == 0
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 4))
    common = ["route-stats", str(out), "--data", str(corpus), "--max-length", "16", "--max-blocks", "8"]
    capsys.readouterr()
    assert main([*common, "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert len(layers) == 4
    for layer in layers:  # 8 blocks x 16 tokens x top-2 assignments, split between FFN and null experts
        ffn = sum(layer["tokens_per_expert"])
        assert len(layer["tokens_per_expert"]) == 4 and layer["dropped"] == 0
        torch.testing.assert_close(layer["null_share"], 1 - ffn / (8 * 16 * 2), atol=1e-9, rtol=0)
    assert any(layer["null_share"] > 0 for layer in layers)
    png = tmp_path / "plots" / "heatmap.png"
    assert main([*common, "--plot", str(png)]) == 0
    printed = capsys.readouterr()
    assert "load CV" in printed.out and "null" in printed.out and str(png) in printed.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert height > 200 and width > 300
    assert main(["route-stats", str(dense), "--data", str(corpus), "--max-length", "16"]) == 2
    assert "no MoE layers" in capsys.readouterr().err


def test_router_layers_and_constant_experts_train_in_full_precision_and_dry_run_counts_them(
    dense: Path, tmp_path: Path
) -> None:
    out = tmp_path / "moe"
    flags = ["--router-network", "mlp", "--router-hidden-size", "8", "--noisy-top-k", "--gating-residual"]
    args = ["convert", str(dense), "-o", str(out), "--num-experts", "4", "--null-experts", "zero=1,constant=1"]
    assert main([*args, *flags, "--quiet"]) == 0
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(out)},
                "quantization": {"experts": "nf4", "linear": "nf4", "compute_dtype": "float32"},
                "lora": {"r": 4, "alpha": 8},
                "data": {"path": "builtin:python-docstrings"},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    from moeify.train.dry_run import estimate
    from moeify.train.recipe import load_recipe
    from moeify.train.run import load_model

    recipe = load_recipe(recipe_path)
    model = load_model(recipe, str(out))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "base_model.model.model.layers.{}.mlp."
    for part in ("router", "router.input_proj", "router.noise", "router.residual", "constant_experts.mix"):
        owner, _, child = part.partition(".")
        name = f"{prefix}{owner}.modules_to_save.default.{child + '.' if child else ''}weight"
        assert name.format(1) in trainable, name
        # The first MoE layer's gating residual has no earlier logits to map: frozen, so DDP finds no unused weight.
        assert (name.format(0) in trainable) == (part != "router.residual"), name
    prefix = prefix.format(0)
    assert f"{prefix}constant_experts.modules_to_save.default.vectors" in trainable
    mix = model.get_base_model().model.layers[0].mlp.constant_experts.modules_to_save["default"].mix
    assert type(mix) is torch.nn.Linear, "not quantized by linear: nf4"
    assert estimate(recipe).trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
