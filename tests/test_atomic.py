"""A conversion that fails, is interrupted or killed leaves no OUT and no temporary folder behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.errors import MoeifyError

# Enough experts that writing takes a few seconds, so a signal lands mid-write.
SLOW = ["--num-experts", "64", "--top-k", "2", "--quiet"]


@pytest.fixture(scope="module")
def medium_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder = tmp_path_factory.mktemp("medium") / "dense"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.moeify-*"))


def start_and_signal(source: Path, out: Path, sig: int, *extra: str) -> subprocess.Popen:
    """Start `moeify convert`, wait until it is writing shard bytes, send `sig`, wait for the exit.

    The child gets SIGINT's default disposition, as in a terminal: a shell that starts jobs in the background without
    job control (a CI script run with `&`) hands them SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moeify", "convert", str(source), "-o", str(out), *SLOW, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # before exec: Python installs its handler
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        shards = [
            f for t in temporaries(out) if t.name.startswith(f".{out.name}.moeify-tmp") for f in t.glob("*.safetensors")
        ]
        if any(f.stat().st_size > 1_000_000 for f in shards):
            break
        if process.poll() is not None:
            pytest.fail(f"conversion ended before the signal: {process.stderr.read()}")
        time.sleep(0.02)
    else:
        process.kill()
        pytest.fail("conversion never started writing")
    process.send_signal(sig)
    process.wait(timeout=60)
    return process


def test_sigint_leaves_nothing(medium_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = start_and_signal(medium_dense, out, signal.SIGINT)
    assert process.returncode == 130
    assert "interrupted" in process.stderr.read()
    assert not out.exists()
    assert temporaries(out) == []


def test_sigkill_then_next_run_cleans_and_succeeds(medium_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = start_and_signal(medium_dense, out, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    assert len(temporaries(out)) == 1, "a killed run cannot clean up; the next one must"
    convert(str(medium_dense), out, ConvertOptions(num_experts=4), progress=False)
    assert (out / "model.safetensors").exists()
    assert temporaries(out) == []


def test_sigkill_during_overwrite_keeps_old_output(medium_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(str(medium_dense), out, ConvertOptions(num_experts=2, top_k=1), progress=False)
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    start_and_signal(medium_dense, out, signal.SIGKILL, "--overwrite")
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    convert(str(medium_dense), out, ConvertOptions(num_experts=4, overwrite=True), progress=False)
    assert temporaries(out) == []


def test_interrupted_swap_is_undone(medium_dense: Path, tmp_path: Path) -> None:
    """Killed between moving the old OUT aside and moving the new one in: the next run puts the old OUT back."""
    out = tmp_path / "out"
    convert(str(medium_dense), out, ConvertOptions(num_experts=2, top_k=1), progress=False)
    before = sorted(p.name for p in out.iterdir())
    os.replace(out, tmp_path / ".out.moeify-old-4194304")  # above Linux's pid_max: a dead process
    with pytest.raises(MoeifyError, match="exists and is not empty"):
        convert(str(medium_dense), out, ConvertOptions(num_experts=4), progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert temporaries(out) == []


def test_cleanup_never_removes_another_hosts_temporary(medium_dense: Path, tmp_path: Path) -> None:
    """On a shared file system a temporary folder of another node may belong to a live process this host cannot
    see: only this host's dead ones (and unnamed ones of old releases) are removed."""
    from moeify.io.atomic import _host

    dead = 4194304  # above Linux's pid_max
    other = tmp_path / f".out.moeify-tmp-another-node-7-{dead}"
    mine = tmp_path / f".out.moeify-tmp-{_host()}-{dead}"
    unnamed = tmp_path / f".out.moeify-tmp-{dead}"
    for folder in (other, mine, unnamed):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    convert(str(medium_dense), tmp_path / "out", ConvertOptions(num_experts=2, top_k=1), progress=False)
    assert temporaries(tmp_path / "out") == [other]
    assert (other / "model.safetensors").read_bytes() == b"partial"


def test_temporaries_name_their_host(tmp_path: Path) -> None:
    import os
    import socket

    from moeify.io.atomic import atomic_output

    with atomic_output(tmp_path / "out") as tmp:
        assert tmp.name.endswith(f"-{os.getpid()}")
        assert f".out.moeify-tmp-{socket.gethostname()}-" in tmp.name


def mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


@pytest.mark.parametrize(("options", "message"), [("size=256k", "no space left"), ("ro,size=1m", "read-only")])
def test_full_or_read_only_disk(medium_dense: Path, tmp_path: Path, options: str, message: str) -> None:
    disk = tmp_path / "disk"
    mount_tmpfs(disk, options)
    try:
        out = disk / "out"
        with pytest.raises(MoeifyError, match=message) as err:
            convert(str(medium_dense), out, ConvertOptions(num_experts=4), progress=False)
        assert "nothing was written" in str(err.value)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)
