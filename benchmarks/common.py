"""Helpers shared by moeify's benchmark scripts (see `load_bench.py`).

- `llama_config` / `build_dense_llama`: a random-weight Llama of TinyLlama-1.1B shape (or a tiny one), built on
  the meta device and initialised one tensor at a time, so building it never holds two copies of the weights.
- `run_measured`: run a command as a child process and return its wall time and peak RSS (from `os.wait4`).
- `sync`, `drop_file_cache`, `warm_file_cache`: control the page cache of a checkpoint before timing a load.
- `folder_bytes`, `free_bytes`, `estimate_moe_bytes`, `gib`, `machine_summary`: sizes and the machine.
- `save_small_tokenizer`: a locally trained tokenizer for a built model (tools such as mergekit need one).
- `safetensors_summary`: tensor count, elements and dtypes of a checkpoint, from its headers.
- `drop_page_cache`: empty the whole page cache (root), else evict one folder.

The scripts put their own folder on `sys.path` and import this module as `common`, however they are run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

GiB = 1024**3

# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-Chat-v1.0) shape.
TINYLLAMA_SHAPE: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

# A tiny Llama for smoke runs (a few MB; converts and loads in seconds).
SMALL_SHAPE: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

_MARKER = "moeify_bench.json"  # written next to a built model: what it was built from


def gib(n_bytes: float) -> float:
    """Bytes in GiB."""
    return n_bytes / GiB


def llama_config(small: bool = False) -> Any:
    """A `LlamaConfig` of TinyLlama-1.1B shape (bf16, untied embeddings), or a tiny one with `small`."""
    from transformers import LlamaConfig

    shape = SMALL_SHAPE if small else TINYLLAMA_SHAPE
    return LlamaConfig(
        **shape,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )


def _marker_for(config: Any, seed: int) -> dict[str, Any]:
    return {"config": config.to_diff_dict(), "seed": seed, "std": 0.02}


def build_dense_llama(folder: Path, config: Any, seed: int = 0, log: IO[str] | None = None) -> Path:
    """Save a random bf16 `LlamaForCausalLM` of `config` into `folder` (1 GB shards); reuse it if already built.

    Every linear / embedding weight is drawn from N(0, 0.02) with `torch.manual_seed(seed)`, every norm weight
    is 1. The model is made on the meta device and materialised with `to_empty`, then filled tensor by tensor,
    so peak memory is one copy of the weights (plus what `save_pretrained` needs to write a shard).
    """
    import torch
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    marker = _marker_for(config, seed)
    marker_path = folder / _MARKER
    if marker_path.exists() and (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        try:
            if json.loads(marker_path.read_text()) == json.loads(json.dumps(marker)):
                _log(log, f"reusing the dense model in {folder}")
                return folder
        except (OSError, json.JSONDecodeError):
            pass
    _log(log, f"building a random dense Llama in {folder} ...")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # so to_empty allocates bf16 directly: no float32 copy
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(mean=0.0, std=0.02)
    model.config.dtype = torch.bfloat16
    folder.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(folder, max_shard_size="1GB")
    marker_path.write_text(json.dumps(marker, indent=1))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    _log(
        log,
        f"built {n_params / 1e9:.3f}B parameters, {gib(folder_bytes(folder)):.2f} GiB in "
        f"{time.perf_counter() - t0:.1f} s",
    )
    return folder


@dataclass
class Measured:
    """What `run_measured` saw of one child process."""

    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # the child's ru_maxrss (its largest process, for a child that forks)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe_failure(self) -> str:
        """A short reason for a non-zero exit ('' when it succeeded)."""
        if self.returncode == 0:
            return ""
        if self.returncode < 0:
            sig = signal.Signals(-self.returncode).name
            hint = " (probably the out-of-memory killer)" if sig == "SIGKILL" else ""
            return f"killed by {sig}{hint}"
        return f"exit status {self.returncode}"


def _oom_first() -> None:
    # Make the child the OOM killer's first choice, so a benchmark that runs out of memory kills itself and
    # not some other process on the machine. Raising oom_score_adj needs no privilege.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    oom_first: bool = True,
    preexec: Callable[[], None] | None = None,
) -> Measured:
    """Run `cmd` to completion; return its wall time and peak resident set size.

    The peak RSS is the child's own `ru_maxrss` from `os.wait4` (per child, unlike `RUSAGE_CHILDREN`, which
    accumulates the maximum over every child waited for so far). With `oom_first` the child's
    `oom_score_adj` is 1000, so if it exhausts memory it is the process the kernel kills; `preexec` runs in the
    child too, before the command.
    """
    cmd = [str(c) for c in cmd]
    t0 = time.perf_counter()
    steps = [f for f in (_oom_first if oom_first else None, preexec) if f is not None]

    def before() -> None:
        for step in steps:
            step()

    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, preexec_fn=before if steps else None)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    returncode = os.waitstatus_to_exitcode(status)
    proc.returncode = returncode  # tell Popen it has been reaped
    return Measured(cmd, returncode, wall, usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux


def sync() -> None:
    """Flush dirty pages to disk (`os.sync`), so written checkpoints can be evicted from the page cache."""
    os.sync()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def drop_file_cache(folder: Path) -> None:
    """Evict `folder`'s files from the page cache (`posix_fadvise(DONTNEED)`, after a sync; needs no root)."""
    sync()
    for path in _files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_file_cache(folder: Path, chunk: int = 64 * 1024**2) -> None:
    """Read every file of `folder` once, so it is in the page cache (as far as memory allows)."""
    buf = bytearray(chunk)
    for path in _files(folder):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(p.stat().st_size for p in _files(folder))


def free_bytes(path: Path) -> int:
    """Free disk space (for unprivileged users) on the file system holding `path` (or its nearest parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def estimate_moe_bytes(dense_config: dict[str, Any], dense_bytes: int, num_experts: int, bytes_per: int = 2) -> int:
    """Rough size of `dense_config`'s model upcycled to `num_experts` experts in every layer: the dense
    checkpoint plus (E - 1) more copies of every MLP plus the routers."""
    h = int(dense_config["hidden_size"])
    i = int(dense_config["intermediate_size"])
    n = int(dense_config["num_hidden_layers"])
    return dense_bytes + n * ((num_experts - 1) * 3 * h * i + num_experts * h) * bytes_per


def total_memory_bytes() -> int:
    """Physical memory of the machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine_summary() -> str:
    """CPU cores, memory, Python, torch and transformers versions, in one line (imports neither library)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "absent"

    return (
        f"{len(os.sched_getaffinity(0))} CPU cores, {gib(total_memory_bytes()):.1f} GiB RAM, "
        f"Python {platform.python_version()}, torch {ver('torch')}, transformers {ver('transformers')}, "
        f"moeify {ver('moeify')}"
    )


_TOKENIZER_CORPUS = [
    "Sparse upcycling turns one dense feed-forward network into many experts.",
    "The router picks the top two experts for each token and weights them.",
    "Large language models are trained on text from books, code and the web.",
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Numbers like 1234567890 and symbols such as #, $, % and & appear too.",
]


def save_small_tokenizer(folder: Path, vocab_size: int = 512) -> bool:
    """Save a small byte-level BPE tokenizer (ids: 0 `<unk>`, 1 `<s>`, 2 `</s>`) into `folder`, unless the
    folder already has a `tokenizer.json` / `tokenizer.model`. Returns whether it wrote one.

    Some tools (mergekit-moe, for one) need a tokenizer next to the weights; `build_dense_llama` writes none.
    Trained locally on a few sentences, so nothing is downloaded; its vocabulary stays below any model's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
        return False
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return True


def safetensors_summary(folder: Path) -> tuple[int, int, set[str]]:
    """(tensor count, total elements, dtypes) of every `*.safetensors` file in `folder`, from the headers
    alone (reads a few KB per file, no weights)."""
    import struct

    count = elements = 0
    dtypes: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count += 1
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            elements += numel
            dtypes.add(str(info["dtype"]))
    return count, elements, dtypes


def drop_page_cache(folder: Path | None = None) -> str:
    """Empty the whole page cache (`sync; echo 1 > /proc/sys/vm/drop_caches`, needs root); where that is not
    allowed, evict `folder`'s files only (`drop_file_cache`). Returns which of the two it did."""
    sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        if folder is not None:
            drop_file_cache(folder)
        return "fadvise"


def _log(log: IO[str] | None, msg: str) -> None:
    print(msg, file=log or sys.stdout, flush=True)
