"""Upcycling transforms that are not copies: Drop-Upcycling and expert noise. Exactly the promised
neurons change, the same set in gate, up and down, with the statistics of what they replace; seeded and
reproducible; both formats and layouts; `verify` and the model card report the deviation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import DENSE_FOLDER, dense_model

from moeify.cli import main
from moeify.convert.converter import convert
from moeify.convert.methods.base import LayerContext
from moeify.convert.methods.drop import dropped_neurons
from moeify.convert.options import ConvertOptions
from moeify.inspect.verify import verify

E, INTERMEDIATE = 4, 128  # tiny_models: intermediate_size 128


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dense_model("llama", tmp_path_factory.getbasetemp() / DENSE_FOLDER)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def ctx(layer: int, seed: int = 0) -> LayerContext:
    return LayerContext(layer, E, 2, 0, "random", 0.02, seed)


@pytest.mark.parametrize("independent", [False, True])
def test_drop_upcycling_reinitialises_exactly_round_r_d_ff_neurons(
    dense: Path, tmp_path: Path, independent: bool
) -> None:
    options = ConvertOptions(num_experts=E, top_k=2, format="moeify", drop_upcycling=0.3, drop_independent=independent)
    result = convert(str(dense), tmp_path / "moe", options, progress=False, log=print)
    assert not result.exact
    source, moe = tensors(dense), tensors(tmp_path / "moe")
    count = round(0.3 * INTERMEDIATE)
    for layer in (0, 3):
        gate = source[f"model.layers.{layer}.mlp.gate_proj.weight"]
        up = source[f"model.layers.{layer}.mlp.up_proj.weight"]
        down = source[f"model.layers.{layer}.mlp.down_proj.weight"]
        sets = []
        for e in range(E):
            new_gate, new_up = moe[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e].chunk(2)
            new_down = moe[f"model.layers.{layer}.mlp.experts.down_proj"][e]
            changed = [
                (new_gate != gate).any(dim=1).nonzero().flatten(),
                (new_up != up).any(dim=1).nonzero().flatten(),
                (new_down != down).any(dim=0).nonzero().flatten(),
            ]
            assert [len(c) for c in changed] == [count] * 3
            if independent:
                assert not (torch.equal(changed[0], changed[1]) and torch.equal(changed[1], changed[2]))
            else:
                assert torch.equal(changed[0], changed[1]) and torch.equal(changed[1], changed[2])
                assert torch.equal(changed[0], dropped_neurons(ctx(layer), e, INTERMEDIATE, 0.3).sort().values)
                rows = changed[0]
                for old, new in ((gate[rows], new_gate[rows]), (down[:, rows], new_down[:, rows])):
                    assert abs(float(new.mean() - old.mean())) < 0.25 * float(old.std())
                    assert 0.8 < float(new.std() / old.std()) < 1.25
            sets.append(changed[0])
        assert not all(torch.equal(sets[0], s) for s in sets[1:]), "each expert draws its own neurons"


def test_drop_upcycling_is_reproducible_from_the_seed_in_both_formats_and_layouts(dense: Path, tmp_path: Path) -> None:
    def run(name: str, **options: object) -> dict[str, torch.Tensor]:
        settings = dict(num_experts=E, top_k=2, drop_upcycling=0.5, **options)
        convert(str(dense), tmp_path / name, ConvertOptions(**settings), progress=False, log=print)
        return tensors(tmp_path / name)

    first, again, other = run("a", format="moeify"), run("b", format="moeify"), run("c", format="moeify", seed=1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    name = "model.layers.0.mlp.experts.down_proj"
    assert not torch.equal(first[name], other[name])
    native = run("native", format="native", layout="per-expert")  # Mixtral, one tensor per expert
    fused = run("native-fused", format="native", layout="fused")
    for e in range(E):
        down = first[name][e]
        (per_expert,) = [v for k, v in native.items() if k.startswith("model.layers.0.") and f".{e}.w2.weight" in k]
        assert torch.equal(per_expert, down)
        assert torch.equal(fused["model.layers.0.mlp.experts.down_proj"][e], down)


def test_verify_and_the_model_card_report_the_deviation(dense: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "moe"
    args = ["convert", str(dense), "-o", str(out), "--num-experts", "4", "--drop-upcycling", "0.5", "--quiet"]
    assert main([*args, "--expert-noise", "0.01", "--shared-experts", "1"]) == 0
    assert "outputs differ from the dense model's" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "Drop-Upcycling re-initialised 50%" in config["moeify_deviation"]
    assert "relative Gaussian noise" in config["moeify_deviation"]
    assert "does **not** compute the dense model's outputs" in (out / "README.md").read_text()
    report, _ = verify(str(dense), str(out), tolerance=1e-5)
    assert not report.passed and report.by_design and report.max_abs_diff > 1e-3
    assert "DEVIATES by design" in str(report)


def test_expert_noise_is_relative_to_each_matrix(dense: Path, tmp_path: Path) -> None:
    convert(str(dense), tmp_path / "moe", ConvertOptions(num_experts=E, format="moeify", expert_noise=0.05),
            progress=False, log=print)  # fmt: skip
    source, moe = tensors(dense), tensors(tmp_path / "moe")
    down = source["model.layers.2.mlp.down_proj.weight"]
    noise = [moe["model.layers.2.mlp.experts.down_proj"][e] - down for e in range(E)]
    for delta in noise:
        assert 0.8 < float(delta.std() / (0.05 * down.std())) < 1.25
    assert not torch.equal(noise[0], noise[1])


def test_bad_transform_settings_fail_before_writing(dense: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    for flags, message in (
        (["--drop-upcycling", "0"], "--drop-upcycling must be in (0, 1]"),
        (["--drop-upcycling", "1.5"], "--drop-upcycling must be in (0, 1]"),
        (["--drop-independent"], "--drop-independent goes with --drop-upcycling"),
        (["--expert-noise", "-1"], "--expert-noise must be >= 0"),
    ):
        assert main(["convert", str(dense), "-o", str(tmp_path / "moe"), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "moe").exists()


def test_fine_grained_experts_are_slices_with_tied_router_rows(dense: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "moe"
    args = ["convert", str(dense), "-o", str(out), "--format", "moeify", "--num-experts", "8", "--top-k", "4"]
    assert main([*args, "--granularity", "4", "--quiet"]) == 0
    assert "outputs equal the dense model's at step 0" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == INTERMEDIATE // 4 and "moeify_deviation" not in config
    source, moe = tensors(dense), tensors(out)
    router = moe["model.layers.1.mlp.router.weight"]
    assert torch.equal(router[0], router[3]) and not torch.equal(router[3], router[4])
    down = source["model.layers.1.mlp.down_proj.weight"]
    for e in range(8):  # expert e: slice e % 4, down scaled by 4
        rows = slice((e % 4) * 32, (e % 4 + 1) * 32)
        gate = moe["model.layers.1.mlp.experts.gate_up_proj"][e][:32]
        assert torch.equal(gate, source["model.layers.1.mlp.gate_proj.weight"][rows])
        assert torch.equal(moe["model.layers.1.mlp.experts.down_proj"][e], down[:, rows] * 4)
    assert "granularity 4" in (out / "README.md").read_text()
    for flags, message in (
        (["--granularity", "3", "--num-experts", "6", "--top-k", "3"], "must divide the FFN's 128 neurons"),
        (["--granularity", "2", "--num-experts", "6", "--top-k", "3"], "multiples of 2"),
        (["--granularity", "2", "--router-init", "zeros"], "--router-init zeros"),
        (["--granularity", "0"], "--granularity must be 1 or more"),
        (["--shared-expert-size", "32"], "add --shared-experts 1"),
        (["--shared-experts", "1", "--shared-expert-size", "128"], "leaves no neurons for the routed experts"),
        (
            [
                "--shared-experts",
                "1",
                "--shared-expert-size",
                "30",
                "--granularity",
                "4",
                "--num-experts",
                "8",
                "--top-k",
                "4",
            ],
            "--granularity 4 must divide the 98 neurons left after --shared-expert-size",
        ),  # fmt: skip
        (["--shared-experts", "1", "--shared-expert-size", "32", "--split", "random"], "combines with the copy"),
    ):
        assert main(["convert", str(dense), "-o", str(tmp_path / "bad"), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("split", ["random", "kmeans"])
def test_neuron_split_partitions_the_ffn_into_disjoint_experts(dense: Path, tmp_path: Path, split: str) -> None:
    out = tmp_path / "moe"
    result = convert(str(dense), out, ConvertOptions(num_experts=4, format="moeify", split=split), progress=False)
    assert not result.exact
    source, moe = tensors(dense), tensors(out)
    gate = source["model.layers.0.mlp.gate_proj.weight"]
    down = source["model.layers.0.mlp.down_proj.weight"]
    expert_gates = moe["model.layers.0.mlp.experts.gate_up_proj"][:, : INTERMEDIATE // 4]
    assert expert_gates.shape == (4, INTERMEDIATE // 4, gate.shape[1])
    # Every dense neuron lands in exactly one expert, with its down column scaled by E.
    rows = [int((gate == row).all(dim=1).nonzero()) for expert in expert_gates for row in expert]
    assert sorted(rows) == list(range(INTERMEDIATE))
    columns = torch.cat(list(moe["model.layers.0.mlp.experts.down_proj"]), dim=1) / 4
    torch.testing.assert_close(columns, down[:, rows], atol=1e-6, rtol=1e-6)
    assert "split" in json.loads((out / "config.json").read_text())["moeify_deviation"]


def test_kmeans_split_keeps_neurons_that_read_the_same_directions_together() -> None:
    from moeify.convert.methods.base import ExpertFFN
    from moeify.convert.methods.fine_grained import split_upcycle

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator) * 3
    cluster = torch.arange(64) % 4  # neurons interleaved across 4 clusters
    gate = centres[cluster] + 0.1 * torch.randn(64, 32, generator=generator)
    up = centres[cluster] + 0.1 * torch.randn(64, 32, generator=generator)
    ffn = ExpertFFN(gate, up, torch.randn(32, 64, generator=generator))
    context = LayerContext(0, 4, 2, 0, "random", 0.02, 0, split="kmeans")
    experts = split_upcycle(ffn, context).experts
    found = []
    for expert in experts:
        members = [int((gate == row).all(dim=1).nonzero()) for row in expert.gate]
        assert len(members) == 16 and len(set(cluster[members].tolist())) == 1, "one cluster per expert"
        found.append(int(cluster[members[0]]))
    assert sorted(found) == [0, 1, 2, 3]


def test_split_needs_e_to_divide_the_ffn(dense: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["convert", str(dense), "-o", str(tmp_path / "m"), "--split", "random", "--num-experts", "3"]) == 2
    assert "must divide the FFN's 128 neurons" in capsys.readouterr().err
    assert main(["convert", str(dense), "-o", str(tmp_path / "m"), "--split", "random", "--granularity", "2"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_experts_from_several_fine_tunes(dense: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from tiny_models import ARCHITECTURES, build_dense

    sources = [build_dense("llama", tmp_path / f"tune{seed}", seed=seed) for seed in (1, 2, 3)]
    out = tmp_path / "moe"
    flags = ["--expert", str(sources[0]), "--expert", str(sources[1]), "--expert", str(sources[2])]
    assert main(["convert", "--base", str(dense), "-o", str(out), *flags, "--quiet", "--format", "moeify"]) == 0
    assert "outputs differ" in capsys.readouterr().out
    moe, base = tensors(out), tensors(dense)
    assert moe["model.layers.0.mlp.experts.down_proj"].shape[0] == 3
    for e, source in enumerate(sources):
        expected = tensors(source)["model.layers.2.mlp.down_proj.weight"]
        assert torch.equal(moe["model.layers.2.mlp.experts.down_proj"][e], expected)
    assert torch.equal(moe["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert "experts are the FFNs of 3 other models" in json.loads((out / "config.json").read_text())["moeify_deviation"]

    averaged = tmp_path / "avg"
    assert main(["convert", str(dense), "-o", str(averaged), *flags, "--merge-non-ffn", "average", "--quiet"]) == 0
    mean = sum(tensors(s)["model.layers.1.self_attn.q_proj.weight"] for s in sources) / 3
    torch.testing.assert_close(tensors(averaged)["model.layers.1.self_attn.q_proj.weight"], mean)

    config = ARCHITECTURES["llama"]()
    config.intermediate_size = 96
    odd = build_dense("llama", tmp_path / "odd", config=config)
    two = ["--expert", str(odd), "--expert", str(sources[0])]
    assert main(["convert", str(dense), "-o", str(tmp_path / "bad"), *two]) == 2
    err = capsys.readouterr().err
    assert "has shape" in err and "experts must have the base's shapes" in err
    assert not (tmp_path / "bad").exists()
    assert main(["convert", str(dense), "-o", str(tmp_path / "bad"), "--expert", str(odd), "--num-experts", "4"]) == 2
    assert "give one --expert per expert" in capsys.readouterr().err


def test_kmeans_router_sends_each_cluster_of_router_inputs_to_its_own_expert() -> None:
    from moeify.convert.calibration import kmeans_router

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=generator)
    cluster = torch.arange(400) % 4
    inputs = (centres[cluster] * 3 + torch.randn(400, 64, generator=generator)).to(torch.bfloat16)
    rows = kmeans_router(inputs, 4, std=0.02, seed=0)
    torch.testing.assert_close(rows.norm(dim=1), torch.full((4,), 0.02 * 8.0))  # the random init's row norm
    top = (inputs.float() @ rows.T).argmax(dim=1)
    experts = [int(torch.bincount(top[cluster == c], minlength=4).argmax()) for c in range(4)]
    assert sorted(experts) == [0, 1, 2, 3], "each cluster has its own expert"
    for c in range(4):
        assert bool((top[cluster == c] == experts[c]).all()), "and every token of the cluster goes there"


def test_kmeans_router_rows_come_from_the_mlp_inputs_of_the_calibration_text(dense: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeify.convert.calibration import kmeans_router, router_inputs

    calibration = tmp_path / "calibration.txt"
    texts = ["The capital of France is Paris.", "def f(x): return x + 1", "Experts route tokens."] * 4
    calibration.write_text("\n".join(texts) + "\n")
    captured = router_inputs(dense, texts, [0, 2], "mlp", max_tokens=10_000)  # the converter's defaults
    # The same inputs as a plain forward of the whole model in memory (padding excluded).
    model = AutoModelForCausalLM.from_pretrained(dense).eval()
    tokenizer = AutoTokenizer.from_pretrained(dense)
    expected: list[torch.Tensor] = []
    hook = model.model.layers[2].mlp.register_forward_pre_hook(lambda _m, i: expected.append(i[0]))
    for start in range(0, len(texts), 8):
        batch = tokenizer(texts[start : start + 8], return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**batch)
        expected[-1] = expected[-1].reshape(-1, expected[-1].shape[-1])[batch["attention_mask"].reshape(-1).bool()]
    hook.remove()
    # Kept in bfloat16: equal up to one bfloat16 step where float32 sums round differently.
    torch.testing.assert_close(captured[2].float(), torch.cat(expected), atol=1e-3, rtol=8e-3)

    out = tmp_path / "moe"
    options = ConvertOptions(
        num_experts=4, top_k=2, format="moeify", router_init="kmeans", calibration=str(calibration),
        calibration_tokens=10_000,
    )  # fmt: skip
    assert convert(str(dense), out, options, progress=False, log=print).exact
    written = tensors(out)["model.layers.2.mlp.router.weight"]
    torch.testing.assert_close(written, kmeans_router(captured[2], 4, 0.02, 2), atol=1e-6, rtol=1e-5)
    report, _ = verify(str(dense), str(out), tolerance=1e-5)
    assert report.passed, str(report)
    assert "kmeans" in (out / "README.md").read_text()


def test_kmeans_router_needs_calibration(dense: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["convert", str(dense), "-o", str(tmp_path / "m"), "--router-init", "kmeans"]) == 2
    assert "--calibration DATA" in capsys.readouterr().err


def test_prompt_router_rows_are_positive_minus_negative_mean_router_inputs(dense: Path, tmp_path: Path) -> None:
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experts = [
        {"positive": ["def f(x): return x", "import os"], "negative": ["Once upon a time"]},
        {"positive": ["The capital of France is"]},
        {"positive": ["1, 1, 2, 3, 5, 8"], "negative": ["def g(): pass"]},
        {"positive": ["Photosynthesis converts light", "Energy flows"]},
    ]
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"experts": experts}))
    out = tmp_path / "moe"
    args = ["convert", str(dense), "-o", str(out), "--num-experts", "4", "--router-init", "prompts"]
    assert main([*args, "--expert-prompts", str(prompts), "--quiet", "--format", "moeify"]) == 0
    written = tensors(out)["model.layers.1.mlp.router.weight"]

    model = AutoModelForCausalLM.from_pretrained(dense).eval()
    tokenizer = AutoTokenizer.from_pretrained(dense)

    def mean_input(texts: list[str]) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = model.model.layers[1].mlp.register_forward_pre_hook(lambda _m, i: seen.append(i[0][0]))
        with torch.no_grad():
            for text in texts:
                model(**tokenizer(text, return_tensors="pt"))
        hook.remove()
        return torch.cat(seen).mean(dim=0)

    for e, entry in enumerate(experts):
        vector = mean_input(entry["positive"]) - (mean_input(entry["negative"]) if "negative" in entry else 0)
        expected = vector / vector.norm() * 0.02 * 8.0  # hidden size 64: the random init's row norm
        torch.testing.assert_close(written[e], expected, atol=2e-3, rtol=2e-2)  # router inputs kept in bfloat16
    prompts.write_text(yaml.safe_dump({"experts": experts[:3]}))
    assert main([*args, "--expert-prompts", str(prompts), "-o", str(tmp_path / "bad")]) == 2
