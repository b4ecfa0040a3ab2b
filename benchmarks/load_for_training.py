"""Time and peak memory of `moeify.quant.load_for_training` on an upcycled 1.1B Llama, quantizing and reloading.

Run from the repository root, with moeify installed (the `moeify` command on PATH, or importable):

    python benchmarks/load_for_training.py              # TinyLlama-1.1B shape, 8 experts: ~17 GB of disk, 10-30 min
    python benchmarks/load_for_training.py --small      # a tiny Llama: a smoke run in well under a minute
    python benchmarks/load_for_training.py --json /tmp/load_for_training.json

What it does:

1. Builds a random-weight bf16 Llama of TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
   8 KV heads, vocab 32000; 1.1B parameters, 2.2 GB) into `WORK/dense-llama-tinyllama` (`--work`, default
   /tmp/moeify-bench; the same model `convert_bench.py` builds, reused when present). With `--small` it is a
   tiny Llama of intermediate size 704 (common's small shape has 688, which no 4-bit blocksize divides), in
   `WORK/dense-llama-small-i704`.
2. Converts it with `moeify convert DENSE -o WORK/moe-llama-8x --num-experts 8 --top-k 2 --quiet` (a Mixtral with
   per-expert tensors, moeify's default; 6.43B parameters, 12.9 GB), in a child process whose wall time and peak
   RSS are recorded, unless that folder already holds a complete conversion (config, every shard, the expected
   parameter count).
3. Evicts the checkpoint from the page cache (`posix_fadvise`, no root needed), then in a child process calls
   `load_for_training(WORK/moe-llama-8x)` with its defaults (NF4, blocksize 64, double quant, bf16, LoRA r 16 on
   q/k/v/o and on the experts, routers trained; gradient checkpointing), timing the call inside the child. It
   reports the child's peak RSS right after the call (`ru_maxrss`: the whole process, interpreter and imports
   included), the peak of its anonymous memory (RssAnon, sampled every 5 ms in a thread) and the model's
   footprint: the bytes of every tensor of the loaded model (parameters and buffers, each storage counted once),
   split into the 4-bit experts (packed bytes and scales), the other frozen tensors (bf16 attention, embeddings,
   norms, routers, buffers) and the trainable ones (LoRA factors and the routers' trainable copies). Then it
   calls `save_4bit(model, WORK/moe-llama-8x-4bit)` (timed, followed by a timed `os.sync`).
4. Evicts the 4-bit folder from the page cache and, in another child, calls
   `load_for_training(WORK/moe-llama-8x-4bit)` (the stored bytes are copied in, nothing is quantized), with the
   same figures. Both children fingerprint every frozen tensor (blake2b of its bytes, after the load's figures
   are taken) and the parent checks that the reload holds exactly what was saved.
5. Prints a Markdown table, the sizes on disk, the target (peak RSS of the quantizing load <= its footprint
   + 1 GiB) and the ratio reload time / quantizing-load time.

Which RSS: the target is checked against the child's `ru_maxrss` (resident memory of the whole process: what
the kernel has to find). It includes file-backed pages: the shared libraries (~0.1 GiB here) and any
mapped checkpoint pages. moeify's checkpoint reader uses `pread` into fresh buffers, not a memory map, so the
checkpoint never shows up as file-backed RSS here; RssAnon (heap and tensors) is reported next to it to show
how much of the peak is the data itself. The import baseline (RSS after importing torch, transformers, peft,
bitsandbytes and moeify, before the load) is reported too: the target's 1 GiB margin has to hold it.

A child that runs out of memory is made the OOM killer's first choice and reported as killed. Logs go to
WORK/logs/. Both output folders are kept (a later run reuses the conversion; the 4-bit folder is rewritten).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/x.py` and `-m benchmarks.x`
from common import (  # noqa: E402
    GiB,
    Measured,
    drop_file_cache,
    estimate_moe_bytes,
    folder_bytes,
    free_bytes,
    gib,
    machine_summary,
    run_measured,
    safetensors_summary,
    sync,
)

SCRIPT = Path(__file__).resolve()
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TARGET_MARGIN_BYTES = 1 * GiB  # peak RSS of the quantizing load <= 4-bit footprint + 1 GiB
SAMPLE_S = 0.005  # RssAnon sampling interval
CHILD_PREFIX = "  > "  # lines of a child's log the parent repeats
SMALL_INTERMEDIATE = 704  # a multiple of 64 (the default blocksize); common's small shape has 688


@dataclass
class LoadFigures:
    """What one child saw of one `load_for_training` call (and, for the first, of `save_4bit`)."""

    ok: bool = False
    failure: str = ""
    folder: str = ""
    load_s: float = float("nan")  # the load_for_training call, timed inside the child
    baseline_rss_bytes: int = 0  # RSS after the imports, before the load
    baseline_rss_anon_bytes: int = 0
    load_peak_rss_bytes: int = 0  # ru_maxrss right after load_for_training returned
    load_peak_rss_anon_bytes: int = 0  # the largest RssAnon sampled during the load
    load_peak_rss_sampled_bytes: int = 0  # the largest RssAnon + RssFile + RssShmem sampled during the load
    after_rss_anon_bytes: int = 0  # RssAnon / RssFile right after the load
    after_rss_file_bytes: int = 0
    experts_4bit_bytes: int = 0  # footprint: Experts4bit tensors (packed bytes, scales, codebooks)
    other_frozen_bytes: int = 0  # footprint: every other frozen parameter and buffer
    trainable_bytes: int = 0  # footprint: LoRA factors and the routers' trainable copies
    meta_tensors: int = 0  # tensors left on the meta device (should be 0)
    num_frozen_params: int = 0
    num_trainable_params: int = 0
    model_class: str = ""
    torch_threads: int = 0
    save_s: float = float("nan")  # save_4bit (into the page cache) ...
    save_sync_s: float = float("nan")  # ... then os.sync
    save_peak_rss_bytes: int = 0  # ru_maxrss after save_4bit (the process's peak so far, load included)
    save_peak_rss_anon_bytes: int = 0  # the largest RssAnon sampled during save_4bit
    save_peak_rss_sampled_bytes: int = 0  # the largest RssAnon + RssFile + RssShmem sampled during save_4bit
    fingerprint: dict[str, str] = field(default_factory=dict)  # frozen tensor name -> blake2b of its bytes
    child_wall_s: float = float("nan")  # the whole child (start-up, imports, load, footprint, save), from the parent
    child_peak_rss_bytes: int = 0  # the whole child's ru_maxrss, from the parent's wait4

    @property
    def base_bytes(self) -> int:
        """The frozen model: 4-bit experts plus everything else that is not trained."""
        return self.experts_4bit_bytes + self.other_frozen_bytes

    @property
    def footprint_bytes(self) -> int:
        """Every tensor of the loaded model, LoRA included."""
        return self.base_bytes + self.trainable_bytes


@dataclass
class ConvertFigures:
    cmd: list[str] = field(default_factory=list)
    reused: bool = False
    ok: bool = False
    failure: str = ""
    wall_s: float = float("nan")
    peak_rss_bytes: int = 0


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- child modes


def _small_config() -> Any:
    from common import llama_config

    config = llama_config(small=True)
    config.intermediate_size = SMALL_INTERMEDIATE
    return config


def _child_build(folder: Path, small: bool, seed: int) -> int:
    from common import build_dense_llama, llama_config

    build_dense_llama(folder, _small_config() if small else llama_config(), seed=seed)
    return 0


def _status() -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of this process now, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


class _Sampler:
    """Samples RssAnon and the total RSS in a thread; `take()` returns the peaks since the last `take()`."""

    def __init__(self, interval: float) -> None:
        import threading

        self.interval = interval
        self.peak_anon = self.peak_total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = _status()
        with self._lock:
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.peak_total = max(self.peak_total, s["RssAnon"] + s["RssFile"] + s["RssShmem"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self._thread.start()

    def take(self) -> tuple[int, int]:
        self._sample()
        with self._lock:
            peaks = self.peak_anon, self.peak_total
            self.peak_anon = self.peak_total = 0
        return peaks

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _footprint(model: Any, figures: LoadFigures) -> None:
    """Bytes of every tensor of `model` (each storage once), by kind, and a fingerprint of the frozen ones."""
    import hashlib

    import torch

    from moeify.quant import Experts4bit

    seen: set[tuple[int, int]] = set()
    for module_name, module in model.named_modules():
        is_4bit = isinstance(module, Experts4bit)
        tensors = [
            *((n, t, t.requires_grad) for n, t in module.named_parameters(recurse=False)),
            *((n, t, False) for n, t in module.named_buffers(recurse=False)),
        ]
        for name, tensor, trainable in tensors:
            full = f"{module_name}.{name}" if module_name else name
            if tensor.is_meta:
                figures.meta_tensors += 1
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if storage.nbytes() and key in seen:
                continue
            seen.add(key)
            if trainable:
                figures.trainable_bytes += storage.nbytes()
                figures.num_trainable_params += tensor.numel()
                continue
            if is_4bit:
                figures.experts_4bit_bytes += storage.nbytes()
            else:
                figures.other_frozen_bytes += storage.nbytes()
            if isinstance(tensor, torch.nn.Parameter):
                figures.num_frozen_params += tensor.numel()
            # hashed in place (a sum with dtype=int64 would materialise an int64 copy: 8x the tensor)
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            figures.fingerprint[full] = hashlib.blake2b(raw.numpy(), digest_size=16).hexdigest()


def _child_say(msg: str) -> None:
    print(CHILD_PREFIX + msg, flush=True)


def _child_load(folder: Path, result_path: Path, save_to: Path | None) -> int:
    import resource

    import torch

    import moeify.quant as quant

    def ru_maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    figures = LoadFigures(folder=str(folder), torch_threads=torch.get_num_threads())
    base = _status()
    figures.baseline_rss_anon_bytes = base["RssAnon"]
    figures.baseline_rss_bytes = base["RssAnon"] + base["RssFile"] + base["RssShmem"]
    sampler = _Sampler(SAMPLE_S)
    sampler.start()
    try:
        t0 = time.perf_counter()
        model = quant.load_for_training(folder)
        figures.load_s = time.perf_counter() - t0
        figures.load_peak_rss_bytes = ru_maxrss()
        figures.load_peak_rss_anon_bytes, figures.load_peak_rss_sampled_bytes = sampler.take()
        after = _status()
        figures.after_rss_anon_bytes, figures.after_rss_file_bytes = after["RssAnon"], after["RssFile"]
        figures.model_class = type(model.get_base_model()).__name__
        _child_say(
            f"load_for_training({folder.name}): {figures.load_s:.1f} s, peak RSS "
            f"{gib(figures.load_peak_rss_bytes):.2f} GiB (RssAnon peak {gib(figures.load_peak_rss_anon_bytes):.2f} "
            f"GiB; baseline after imports {gib(figures.baseline_rss_bytes):.2f} GiB)"
        )
        _footprint(model, figures)
        _child_say(
            f"footprint {gib(figures.footprint_bytes):.3f} GiB: 4-bit experts {gib(figures.experts_4bit_bytes):.3f}, "
            f"other frozen {gib(figures.other_frozen_bytes):.3f}, trainable {gib(figures.trainable_bytes):.3f} GiB; "
            f"{figures.meta_tensors} meta tensors"
        )
        sampler.take()
        if save_to is not None:
            t0 = time.perf_counter()
            quant.save_4bit(model, save_to)
            figures.save_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            os.sync()
            figures.save_sync_s = time.perf_counter() - t0
            figures.save_peak_rss_bytes = ru_maxrss()
            figures.save_peak_rss_anon_bytes, figures.save_peak_rss_sampled_bytes = sampler.take()
            _child_say(
                f"save_4bit: {figures.save_s:.1f} s + sync {figures.save_sync_s:.1f} s, RssAnon peak "
                f"{gib(figures.save_peak_rss_anon_bytes):.2f} GiB, sampled RSS peak "
                f"{gib(figures.save_peak_rss_sampled_bytes):.2f} GiB"
            )
        figures.ok = figures.meta_tensors == 0
        if not figures.ok:
            figures.failure = f"{figures.meta_tensors} tensors left on the meta device"
    except Exception as e:  # reported by the parent
        figures.failure = f"{type(e).__name__}: {e}"
        raise
    finally:
        sampler.stop()
        result_path.write_text(json.dumps(asdict(figures)))
    return 0 if figures.ok else 1


# --------------------------------------------------------------------------------------------- parent


def _moeify_tree() -> str:
    """The repository's commit and which moeify/ files differ from it (read-only git; '' outside a checkout)."""
    repo = SCRIPT.parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "moeify"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {head}" + (f", uncommitted changes in {', '.join(changed)}" if changed else ", clean")


def _moeify_command() -> list[str]:
    exe = shutil.which("moeify")
    return [exe] if exe else [sys.executable, "-m", "moeify"]


def _expected_params(dense: Path, num_experts: int) -> int:
    """Parameters of `dense` upcycled to `num_experts` experts per layer (the extra MLP copies and the routers)."""
    config = json.loads((dense / "config.json").read_text())
    h, i, n = (int(config[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    _, dense_params, _ = safetensors_summary(dense)
    return dense_params + n * ((num_experts - 1) * 3 * h * i + num_experts * h)


def _incomplete(out: Path, num_experts: int, top_k: int, expected_params: int) -> str:
    """'' when `out` holds a complete conversion, else what is missing."""
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable config.json"
    if cfg.get("num_local_experts") != num_experts or cfg.get("num_experts_per_tok") != top_k:
        return f"{cfg.get('num_local_experts')} experts, top-{cfg.get('num_experts_per_tok')}"
    index = out / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = [s for s in shards if not (out / s).exists()]
        if missing:
            return f"missing shards {missing}"
    for path in out.glob("*.safetensors"):  # a truncated shard: its header promises more than the file holds
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = 8 + n + max((info["data_offsets"][1] for info in header.values()), default=0)
        if path.stat().st_size < end:
            return f"{path.name} is truncated"
    _, elements, _ = safetensors_summary(out)
    if elements != expected_params:
        return f"{elements:,} parameters, expected {expected_params:,}"
    return ""


def _convert(dense: Path, out: Path, args: argparse.Namespace) -> ConvertFigures:
    expected = _expected_params(dense, args.num_experts)
    why = _incomplete(out, args.num_experts, args.top_k, expected) if out.exists() else "absent"
    if not why:
        _say(f"reusing {out} ({expected / 1e9:.2f}B parameters, {gib(folder_bytes(out)):.2f} GiB)")
        return ConvertFigures(reused=True, ok=True)
    _say(f"{out}: {why}; converting")
    if out.exists():
        shutil.rmtree(out)
    config = json.loads((dense / "config.json").read_text())
    need = estimate_moe_bytes(config, folder_bytes(dense), args.num_experts) + 2 * GiB
    if free_bytes(args.work) < need:
        raise SystemExit(f"not enough disk under {args.work}: need ~{gib(need):.1f} GiB")
    cmd = [
        *_moeify_command(),
        "convert",
        str(dense),
        "-o",
        str(out),
        "--num-experts",
        str(args.num_experts),
        "--top-k",
        str(args.top_k),
        "--quiet",
    ]
    drop_file_cache(dense)
    _say(f"$ {' '.join(cmd)}")
    log = args.work / "logs" / f"load_for_training-convert-{out.name}.log"
    with open(log, "w") as f:
        m = run_measured(cmd, env={**os.environ, **OFFLINE_ENV}, stdout=f, stderr=subprocess.STDOUT)
    res = ConvertFigures(m.cmd, False, m.ok, m.describe_failure(), m.wall_s, m.peak_rss_bytes)
    if m.ok:
        why = _incomplete(out, args.num_experts, args.top_k, expected)
        if why:
            res.ok, res.failure = False, f"the output is incomplete: {why}"
    _say(
        f"  convert: {'ok' if res.ok else 'FAILED: ' + res.failure}, {m.wall_s:.1f} s, peak RSS "
        f"{gib(m.peak_rss_bytes):.2f} GiB (log: {log})"
    )
    return res


def _load(folder: Path, name: str, args: argparse.Namespace, save_to: Path | None = None) -> LoadFigures:
    drop_file_cache(folder)
    result = args.work / f"load_for_training-{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--child-load", str(folder), "--child-result", str(result)]
    if save_to is not None:
        if save_to.exists():
            shutil.rmtree(save_to)
        cmd += ["--child-save", str(save_to)]
    log = args.work / "logs" / f"load_for_training-{name}.log"
    _say(f"$ {' '.join(cmd)}  (log: {log})")
    with open(log, "w") as f:
        m: Measured = run_measured(cmd, env={**os.environ, **OFFLINE_ENV}, stdout=f, stderr=subprocess.STDOUT)
    figures = LoadFigures(**json.loads(result.read_text())) if result.exists() else LoadFigures()
    if not m.ok:
        figures.ok = False
        figures.failure = figures.failure or m.describe_failure()
    figures.child_wall_s, figures.child_peak_rss_bytes = m.wall_s, m.peak_rss_bytes
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(CHILD_PREFIX):
            _say(line)
    if not figures.ok:
        _say(f"  {name}: FAILED ({figures.failure}); the end of {log}:")
        for line in log.read_text(errors="replace").splitlines()[-15:]:
            _say(f"    {line}")
    return figures


def _g(n: int) -> str:
    return f"{gib(n):.2f}" if n else "-"


def _s(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"


def _report(
    args: argparse.Namespace,
    conv: ConvertFigures,
    quant: LoadFigures,
    reload: LoadFigures,
    folders: dict[str, Path],
    total_s: float,
) -> dict[str, Any]:
    _say()
    _say(f"machine: {machine_summary()}")
    tree = _moeify_tree()
    if tree:
        start = args.moeify_tree_at_start
        _say(f"moeify source: {tree}" + (f" (CHANGED during the run; at the start: {start})" if start != tree else ""))
    _say(
        f"model: {'small Llama (hidden 256, intermediate 704, 4 layers)' if args.small else 'TinyLlama-1.1B-shaped'}"
        f" Llama upcycled to {args.num_experts} experts, top-{args.top_k} (Mixtral, per-expert tensors); "
        f"load_for_training defaults (NF4, blocksize 64, double quant, bf16, LoRA r 16 on q/k/v/o and experts); "
        f"each checkpoint evicted from the page cache (posix_fadvise) before its load; torch threads "
        f"{quant.torch_threads or reload.torch_threads}"
    )
    _say()
    _say("| step | wall s | peak RSS GiB | peak RssAnon GiB | footprint GiB (4-bit experts + other frozen + LoRA) |")
    _say("|------|--------|--------------|------------------|------------------------------------------------|")
    if conv.reused:
        _say(f"| moeify convert -> {folders['moe'].name} | reused | - | - | - |")
    else:
        _say(
            f"| moeify convert -> {folders['moe'].name} (child) | {_s(conv.wall_s)} | {_g(conv.peak_rss_bytes)} | - "
            f"| {'-' if conv.ok else 'FAILED: ' + conv.failure} |"
        )
    for label, f in (
        (f"load_for_training({folders['moe'].name}), quantizing", quant),
        (f"load_for_training({folders['q4'].name}), reload", reload),
    ):
        if f.load_s != f.load_s:
            _say(f"| {label} | FAILED: {f.failure} | {_g(f.child_peak_rss_bytes)} (child) | | |")
            continue
        parts = f"{gib(f.experts_4bit_bytes):.2f} + {gib(f.other_frozen_bytes):.2f} + {gib(f.trainable_bytes):.2f}"
        _say(
            f"| {label} | {f.load_s:.1f} | {_g(f.load_peak_rss_bytes)} | {_g(f.load_peak_rss_anon_bytes)} | "
            f"{gib(f.footprint_bytes):.2f} = {parts} |"
        )
    if quant.save_s == quant.save_s:
        _say(
            f"| save_4bit -> {folders['q4'].name} (+ os.sync) | {quant.save_s:.1f} + {quant.save_sync_s:.1f} | "
            f"{_g(quant.save_peak_rss_bytes)} (process so far) | {_g(quant.save_peak_rss_anon_bytes)} | - |"
        )
    _say()
    _say("| folder | on disk GiB | files |")
    _say("|--------|-------------|-------|")
    for key in ("dense", "moe", "q4"):
        p = folders[key]
        if p.exists():
            n = sum(1 for x in p.iterdir() if x.is_file())
            _say(f"| {p} | {gib(folder_bytes(p)):.2f} | {n} |")
    _say()

    summary: dict[str, Any] = {}
    if quant.load_s == quant.load_s:
        limit = quant.footprint_bytes + TARGET_MARGIN_BYTES
        met = quant.load_peak_rss_bytes <= limit
        summary["target_met"] = met
        _say(
            f"target: peak RSS of the quantizing load {gib(quant.load_peak_rss_bytes):.2f} GiB vs footprint "
            f"{gib(quant.footprint_bytes):.2f} GiB + 1 GiB = {gib(limit):.2f} GiB: {'met' if met else 'NOT met'} "
            f"(peak / footprint {quant.load_peak_rss_bytes / quant.footprint_bytes:.2f}x; "
            f"{gib(quant.load_peak_rss_bytes - quant.footprint_bytes):.2f} GiB above the footprint, of which "
            f"{gib(quant.baseline_rss_bytes):.2f} GiB is the process before the load: interpreter and imports)"
        )
        _say(
            f"  without LoRA: base footprint {gib(quant.base_bytes):.2f} GiB + 1 GiB = "
            f"{gib(quant.base_bytes + TARGET_MARGIN_BYTES):.2f} GiB; the peak of RssAnon (heap and tensors, sampled "
            f"every {SAMPLE_S * 1000:.0f} ms) was {gib(quant.load_peak_rss_anon_bytes):.2f} GiB, "
            f"{gib(quant.load_peak_rss_anon_bytes - quant.footprint_bytes):.2f} GiB above the footprint "
            f"(RssAnon before the load {gib(quant.baseline_rss_anon_bytes):.2f} GiB); file-backed RSS after the load "
            f"{gib(quant.after_rss_file_bytes):.2f} GiB (shared libraries: moeify reads the checkpoint with pread, "
            f"not a memory map)"
        )
        if quant.save_peak_rss_bytes > quant.load_peak_rss_bytes + 16 * 1024**2:
            _say(
                f"  note: save_4bit raised the child's peak RSS to {gib(quant.save_peak_rss_bytes):.2f} GiB "
                f"(sampled: RssAnon {gib(quant.save_peak_rss_anon_bytes):.2f} GiB, all RSS "
                f"{gib(quant.save_peak_rss_sampled_bytes):.2f} GiB), above the load's"
            )
    if quant.load_s == quant.load_s and reload.load_s == reload.load_s:
        ratio = reload.load_s / quant.load_s
        summary["reload_over_quantizing_time"] = ratio
        _say(
            f"reload / quantizing load time: {ratio:.3f}x ({reload.load_s:.1f} s vs {quant.load_s:.1f} s; "
            f"{quant.load_s / reload.load_s:.1f}x faster)"
        )
        _say(
            f"reload peak RSS: {gib(reload.load_peak_rss_bytes):.2f} GiB (RssAnon peak "
            f"{gib(reload.load_peak_rss_anon_bytes):.2f} GiB; footprint {gib(reload.footprint_bytes):.2f} GiB; "
            f"vs the quantizing load {reload.load_peak_rss_bytes / quant.load_peak_rss_bytes:.2f}x)"
        )
        same = quant.fingerprint == reload.fingerprint
        summary["reload_identical"] = same
        if same:
            _say(f"reload check: all {len(reload.fingerprint)} frozen tensors identical to the saved model's")
        else:
            names = quant.fingerprint.keys() | reload.fingerprint.keys()
            differ = sorted(k for k in names if quant.fingerprint.get(k) != reload.fingerprint.get(k))
            _say(f"reload check: {len(differ)} frozen tensors DIFFER, e.g. {differ[:5]}")
    elif not conv.ok:
        _say(f"no loads: the conversion failed ({conv.failure})")
    _say(f"total {total_s:.0f} s")
    return summary


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--work", type=Path, default=Path("/tmp/moeify-bench"), help="cache / output folder")
    p.add_argument("--small", action="store_true", help="a tiny Llama (hidden 256, 4 layers) for a smoke run")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--child-build", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-load", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-save", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.child_build is not None:
        return _child_build(args.child_build, args.small, args.seed)
    if args.child_load is not None:
        assert args.child_result is not None
        return _child_load(args.child_load, args.child_result, args.child_save)

    args.work = args.work.expanduser().resolve()
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    args.moeify_tree_at_start = _moeify_tree()
    t_start = time.perf_counter()
    _say(f"machine: {machine_summary()}")
    tag = "small" if args.small else "tinyllama"
    suffix = "-small" if args.small else ""
    folders = {
        "dense": args.work / ("dense-llama-small-i704" if args.small else "dense-llama-tinyllama"),
        "moe": args.work / f"moe-llama-{args.num_experts}x{suffix}",
        "q4": args.work / f"moe-llama-{args.num_experts}x{suffix}-4bit",
    }

    # 1. the dense model, built (or reused) in a child so this process never holds its weights
    m = run_measured(
        [sys.executable, str(SCRIPT), "--child-build", str(folders["dense"]), "--seed", str(args.seed)]
        + (["--small"] if args.small else [])
    )
    if not m.ok:
        _say(f"building the dense model failed: {m.describe_failure()}")
        return 1
    _say(f"dense model ({tag}): {folders['dense']} ({gib(folder_bytes(folders['dense'])):.2f} GiB)")

    # 2. the conversion, 3. the quantizing load and save_4bit, 4. the reload
    conv = _convert(folders["dense"], folders["moe"], args)
    quant = reload = LoadFigures(failure="not run")
    if conv.ok:
        quant = _load(folders["moe"], f"quantize-{tag}", args, save_to=folders["q4"])
        if quant.ok and (folders["q4"] / "config.json").exists():
            sync()
            reload = _load(folders["q4"], f"reload-{tag}", args)
    summary = _report(args, conv, quant, reload, folders, time.perf_counter() - t_start)
    if args.json is not None:
        payload = {
            "machine": machine_summary(),
            "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("child")},
            "folders": {k: str(v) for k, v in folders.items()},
            "convert": asdict(conv),
            "quantizing_load": {k: v for k, v in asdict(quant).items() if k != "fingerprint"},
            "reload": {k: v for k, v in asdict(reload).items() if k != "fingerprint"},
            "summary": summary,
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0 if conv.ok and quant.ok and reload.ok and summary.get("reload_identical", False) else 1


if __name__ == "__main__":
    sys.exit(main())
