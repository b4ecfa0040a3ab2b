"""Bad input: a clear message, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeify.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.moeify-*")), "a temporary folder was left behind"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--num-experts", "4", "--top-k", "5"], "--top-k 5 is larger than --num-experts 4"),
        (["--num-experts", "1", "--top-k", "1"], "--num-experts must be at least 2"),
        (["--layers", "3-x"], "bad --layers '3-x'"),
        (["--layers", "5-2"], "runs backwards"),
        (["--layers", "every:0"], "every:N needs a positive integer"),
        (["--layers", "0,99"], "layers [99] do not exist; the model has 4 layers"),
        (["--max-shard-size", "big"], "bad --max-shard-size"),
    ],
)
def test_bad_options(capsys, dense_llama: Path, tmp_path: Path, flags: list[str], expected: str) -> None:
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", str(dense_llama), "-o", str(out), *flags)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert_nothing_written(out)


def test_missing_source(capsys, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", str(tmp_path / "nope"), "-o", str(out))
    assert code == 2
    assert "does not exist" in err and "Hub id" in err
    assert_nothing_written(out)


def test_unknown_architecture_lists_supported(capsys, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(source)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", str(source), "-o", str(out))
    assert code == 2
    assert "architecture 'gpt2' is not supported" in err
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"):
        assert name in err
    assert_nothing_written(out)


def test_existing_output_needs_overwrite(capsys, dense_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "convert", str(dense_llama), "-o", str(out))
    assert code == 2
    assert "exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.moeify-*"))


def test_native_refused_with_alternative(capsys, tiny_root: Path, tmp_path: Path) -> None:
    from tiny_models import dense_model

    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", str(dense_model("gemma3", tiny_root)), "-o", str(out), "--format", "native")
    assert code == 2
    assert "--format native cannot represent" in err and "--format moeify" in err
    assert_nothing_written(out)


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moeify", "convert", str(tmp_path / "missing"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("moeify convert: error:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["llama", "llama3"])  # llama3: tied embeddings, counted once
def test_info_json_on_dense(capsys, tiny_root: Path, name: str) -> None:
    import torch
    from tiny_models import dense_model
    from transformers import AutoModelForCausalLM

    dense = dense_model(name, tiny_root)
    code = main(["info", str(dense), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0
    assert info["num_experts"] == 0 and info["moe_layers"] == []
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    assert info["total_params"] == info["active_params"] == sum(p.numel() for p in model.parameters())
