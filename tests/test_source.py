"""SOURCE resolution: Hub ids through huggingface_hub (from a cache laid out as the Hub's), folders, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError
from moeify.io.source import is_hub_id, resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files_from: Path, revision: str = "main") -> Path:
    """Lay out `files_from` as huggingface_hub's cache holds a downloaded snapshot of `repo_id`."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in files_from.iterdir():
        shutil.copy2(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


def test_hub_id_resolves_through_huggingface_hub_cache(dense_llama: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    hub_cache(cache, "acme/tiny-llama", dense_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = resolve_source("acme/tiny-llama")
    assert folder.name == COMMIT and (folder / "config.json").exists()
    result = convert("acme/tiny-llama", tmp_path / "out", ConvertOptions(num_experts=4), progress=False)
    assert result.format == "mixtral"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: acme/tiny-llama" in card


def test_hub_id_offline_and_not_cached(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoeifyError, match="offline") as err:
        resolve_source("acme/not-cached@v1")
    assert "local folder" in str(err.value)


def test_source_kinds(tmp_path: Path) -> None:
    assert is_hub_id("org/name") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("just-a-name") and not is_hub_id("a/b/c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoeifyError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(MoeifyError, match="not a .gguf"):
        resolve_source(str(tmp_path / "weights.bin"))
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(MoeifyError, match="GGUF"):
        resolve_source(str(tmp_path / "fake.gguf"))


def test_pickle_only_checkpoint_needs_allow_pickle(dense_llama: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    source = tmp_path / "pickled"
    shutil.copytree(dense_llama, source, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(dense_llama).state_dict(), source / "pytorch_model.bin")
    assert not list(source.glob("*.safetensors")) and (source / "pytorch_model.bin").exists()
    with pytest.raises(MoeifyError, match="--allow-pickle") as err:
        convert(str(source), tmp_path / "out", ConvertOptions(num_experts=4), progress=False)
    assert "pytorch_model.bin" in str(err.value)
    assert not (tmp_path / "out").exists()
    result = convert(str(source), tmp_path / "out", ConvertOptions(num_experts=4, allow_pickle=True), progress=False)
    safe = convert(str(dense_llama), tmp_path / "safe", ConvertOptions(num_experts=4), progress=False)
    assert result.params.total == safe.params.total
    from safetensors.torch import load_file

    pickled = load_file(tmp_path / "out" / "model.safetensors")
    safe_tensors = load_file(tmp_path / "safe" / "model.safetensors")
    assert pickled.keys() == safe_tensors.keys()
    assert all(torch.equal(pickled[k], safe_tensors[k]) for k in pickled)


def test_source_code_never_runs_without_trust_remote_code(tmp_path: Path) -> None:
    import json

    source = tmp_path / "custom"
    source.mkdir()
    marker = tmp_path / "code-ran"
    (source / "config.json").write_text(
        json.dumps({"model_type": "custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}})
    )
    (source / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom'\n"
    )
    with pytest.raises(MoeifyError, match="--trust-remote-code"):
        convert(str(source), tmp_path / "out", ConvertOptions(), progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_unreadable_config(tmp_path: Path) -> None:
    source = tmp_path / "broken"
    source.mkdir()
    (source / "config.json").write_text("{not json")
    with pytest.raises(MoeifyError, match="cannot read the configuration"):
        convert(str(source), tmp_path / "out", ConvertOptions(), progress=False)
    assert not (tmp_path / "out").exists()
