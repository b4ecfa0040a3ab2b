"""How fast, and in how much memory, `moeify convert` upcycles a 1.1B Llama, against mergekit-moe and the disk.

Run from the repository root, with moeify installed (the `moeify` command on PATH, or importable):

    python benchmarks/convert_bench.py                  # TinyLlama-1.1B shape: ~13 GB per output, a few minutes
    python benchmarks/convert_bench.py --small          # a tiny Llama: a smoke run in well under a minute
    python benchmarks/convert_bench.py --repeats 3 --json /tmp/convert_bench.json

mergekit-moe is the baseline where it is installed. It is not a dependency of moeify and pins its own torch, so
give it a virtual environment of its own (a CPU torch first, from PyTorch's CPU index, so pip does not fetch a
CUDA build):

    python3 -m venv /tmp/mergekit-venv
    /tmp/mergekit-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /tmp/mergekit-venv/bin/pip install mergekit

`--mergekit-moe PATH` names the executable (default: `mergekit-moe` on PATH, else
/tmp/mergekit-venv/bin/mergekit-moe); without one the mergekit rows are skipped, and the script says so.

What it does:

1. Builds a random-weight bf16 Llama of TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 22 layers,
   32 heads, 8 KV heads, vocab 32000; 1.1B parameters, 2.2 GB), saved with 1 GB shards, plus a small locally
   trained tokenizer (mergekit-moe needs one), into `WORK/dense-llama-tinyllama` (`--work`, default
   /tmp/moeify-bench; the folder `load_bench.py` uses too); a later run reuses it.
2. Measures the disk with dd: direct-I/O read of the dense shards (`dd if=SHARD of=/dev/null bs=64M
   iflag=direct`), direct-I/O write (`dd if=/dev/zero of=WORK/dd.bin bs=64M count=32 oflag=direct`) and, for
   reference, a buffered write ended by fdatasync (`conv=fdatasync`), once before the conversions and once
   after. The disk bound of a conversion is bytes read / direct read bandwidth + bytes written / direct write
   bandwidth, with the faster of the two measurements of each, the dense checkpoint's size as bytes read and
   moeify's output's size as bytes written. It also times each tool's `--help` (interpreter start-up and
   imports, which the wall times include) for reference.
3. Converts the dense model into an 8-expert, top-2 Mixtral, each in a child process whose wall time
   (including a final `sync`, timed in the parent after the child exits) and peak RSS (the child's
   `ru_maxrss`) are recorded, with the dense files evicted from the page cache first (`posix_fadvise`; with
   `--cache all` the whole page cache is emptied through /proc/sys/vm/drop_caches, which needs root):
   - moeify: `moeify convert DENSE -o OUT --num-experts 8 --top-k 2 --overwrite --quiet` (its defaults:
     per-expert Mixtral tensors, 5 GB shards);
   - mergekit-moe with its default shard size (5e9 bytes): `mergekit-moe CONFIG.yml OUT --quiet`, where the
     YAML (written to WORK/mergekit-moe.yml) has `gate_mode: random`, `experts_per_token: 2`,
     `architecture: mixtral`, `dtype: bfloat16`, `base_model: DENSE` and eight experts that are all DENSE;
   - mergekit-moe with 1 GB shards: the same plus `--out-shard-size 1000000000` (its help says "parameters
     per shard", but its writer counts bytes: this gives 1 GB shards).
   Each output is checked (config.json says MixtralForCausalLM with 8 experts and top-2; the safetensors
   headers hold the expected number of bf16 parameters; layer 0 and the last layer's last expert equal the
   dense MLP) and then deleted, unless `--keep`. Logs go to WORK/logs/.
4. Prints a Markdown table (for BENCHMARKS.md), the ratios moeify / mergekit for wall time and peak RSS, and
   moeify's wall time / the disk bound, with the targets (peak RSS under 1.5 GiB and at most 0.5x
   mergekit's lowest; wall time at most 1.0x mergekit's fastest; within 1.5x of the disk bound).

With `--repeats N` every tool runs N times (the order reversed on every other round); a tool's wall time is
its fastest run and its peak RSS its highest. A child that runs out of memory is made the OOM killer's first
choice and reported as killed. Peak RSS is that of the child process itself: both tools convert in one
process (moeify's writer uses a thread), so nothing is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/x.py` and `-m benchmarks.x`
from common import (  # noqa: E402
    drop_file_cache,
    drop_page_cache,
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
REPO = SCRIPT.parent.parent
DEFAULT_MERGEKIT_VENV_EXE = Path("/tmp/mergekit-venv/bin/mergekit-moe")
MOEIFY = "moeify"
MK_DEFAULT = "mergekit-moe"
MK_1GB = "mergekit-moe 1GB"
TOOLS = (MOEIFY, MK_DEFAULT, MK_1GB)
SHARDS = {MOEIFY: "5 GB (default)", MK_DEFAULT: "5 GB (default)", MK_1GB: "1 GB"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Targets from the issue: moeify's peak RSS under 1.5 GiB and at most 0.5x mergekit's lowest; wall time at
# most 1.0x mergekit's fastest; within 1.5x of the disk bound.
TARGET_RSS_GIB = 1.5
TARGET_RSS_VS_MERGEKIT = 0.5
TARGET_WALL_VS_MERGEKIT = 1.0
TARGET_WALL_VS_DISK = 1.5


@dataclass
class DiskSpeed:
    """dd's view of the disk holding the work folder."""

    read_direct_bytes: int = 0
    read_direct_s: float = float("nan")
    write_direct_bytes: int = 0
    write_direct_s: float = float("nan")
    write_buffered_fdatasync_bytes: int = 0
    write_buffered_fdatasync_s: float = float("nan")

    @staticmethod
    def _bw(n: int, s: float) -> float:
        return n / s if s and s == s and s > 0 else float("nan")

    @property
    def read_direct_bw(self) -> float:
        return self._bw(self.read_direct_bytes, self.read_direct_s)

    @property
    def write_direct_bw(self) -> float:
        return self._bw(self.write_direct_bytes, self.write_direct_s)

    @property
    def write_buffered_bw(self) -> float:
        return self._bw(self.write_buffered_fdatasync_bytes, self.write_buffered_fdatasync_s)

    @staticmethod
    def best(samples: Sequence[DiskSpeed]) -> DiskSpeed:
        """The fastest of each measurement over `samples` (so the bound is the tightest the disk showed)."""

        def pick(bw: str, n: str, s: str) -> tuple[int, float]:
            top = max(samples, key=lambda d: getattr(d, bw) if getattr(d, bw) == getattr(d, bw) else -1.0)
            return getattr(top, n), getattr(top, s)

        out = DiskSpeed()
        out.read_direct_bytes, out.read_direct_s = pick("read_direct_bw", "read_direct_bytes", "read_direct_s")
        out.write_direct_bytes, out.write_direct_s = pick("write_direct_bw", "write_direct_bytes", "write_direct_s")
        out.write_buffered_fdatasync_bytes, out.write_buffered_fdatasync_s = pick(
            "write_buffered_bw", "write_buffered_fdatasync_bytes", "write_buffered_fdatasync_s"
        )
        return out

    def describe(self) -> str:
        return (
            f"direct read {self.read_direct_bw / 1e9:.2f} GB/s, direct write {self.write_direct_bw / 1e9:.2f} GB/s, "
            f"buffered write + fdatasync {self.write_buffered_bw / 1e9:.2f} GB/s"
        )

    def bound_s(self, bytes_read: int, bytes_written: int) -> float:
        """Seconds to read `bytes_read` and write `bytes_written` at the direct-I/O bandwidths."""
        return bytes_read / self.read_direct_bw + bytes_written / self.write_direct_bw


@dataclass
class Run:
    """One timed conversion."""

    tool: str
    cmd: list[str]
    ok: bool
    failure: str
    child_wall_s: float
    sync_s: float
    peak_rss_bytes: int
    output_bytes: int = 0
    shards: int = 0
    check: str = ""  # "ok" or what was wrong
    cache: str = ""  # how the page cache was emptied first
    log: str = ""
    reported_s: float = float("nan")  # moeify's own "Wrote OUT in N s" (the conversion without start-up)

    @property
    def wall_s(self) -> float:
        """The conversion's wall time including the final sync."""
        return self.child_wall_s + self.sync_s


@dataclass
class ToolResult:
    """Every run of one tool."""

    tool: str
    runs: list[Run] = field(default_factory=list)

    def good(self) -> list[Run]:
        return [r for r in self.runs if r.ok and r.check == "ok"]

    @property
    def ok(self) -> bool:
        return bool(self.runs) and len(self.good()) == len(self.runs)

    @property
    def best_wall_s(self) -> float:
        good = self.good()
        return min(r.wall_s for r in good) if good else float("nan")

    @property
    def max_rss_bytes(self) -> int:
        good = self.good()
        return max(r.peak_rss_bytes for r in good) if good else 0

    @property
    def output_bytes(self) -> int:
        good = self.good()
        return good[0].output_bytes if good else 0


# --------------------------------------------------------------------------------------------- child mode


def _child_build(folder: Path, small: bool, seed: int) -> int:
    from common import build_dense_llama, llama_config, save_small_tokenizer

    build_dense_llama(folder, llama_config(small), seed=seed)
    if save_small_tokenizer(folder):
        print(f"saved a small tokenizer into {folder}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- helpers


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _moeify_command() -> list[str]:
    exe = shutil.which("moeify")
    return [exe] if exe else [sys.executable, "-m", "moeify"]


def _find_mergekit(arg: str | None) -> Path | None:
    if arg:
        path = Path(arg).expanduser()
        found = shutil.which(str(path))
        return Path(found) if found else None
    found = shutil.which("mergekit-moe")
    if found:
        return Path(found)
    return DEFAULT_MERGEKIT_VENV_EXE if os.access(DEFAULT_MERGEKIT_VENV_EXE, os.X_OK) else None


def _mergekit_versions(exe: Path) -> dict[str, str]:
    """mergekit / torch / transformers versions in mergekit-moe's own interpreter (from its shebang)."""
    try:
        first = exe.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return {}
    if not first.startswith("#!"):
        return {}
    python = first[2:].strip().split()[0]
    code = (
        "import json; from importlib.metadata import version as v\n"
        "print(json.dumps({d: v(d) for d in ('mergekit', 'torch', 'transformers', 'safetensors')}))"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}


def _moeify_tree() -> str:
    """The repository's commit and which moeify/ files differ from it (read-only git; '' outside a checkout)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "moeify"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return ""
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {head}" + (f", uncommitted changes in {', '.join(changed)}" if changed else ", clean")


_DD_RE = re.compile(r"^(\d+) bytes .* copied, ([0-9.]+) s", re.MULTILINE)


def _dd(args: list[str]) -> tuple[int, float]:
    """Run dd; (bytes copied, seconds) from its closing line."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if out.returncode != 0:
        raise RuntimeError(f"dd {' '.join(args)} failed: {out.stderr.strip()}")
    match = _DD_RE.search(out.stderr)
    if not match:
        raise RuntimeError(f"cannot read dd's output: {out.stderr.strip()}")
    return int(match.group(1)), float(match.group(2))


def _measure_disk(dense: Path, work: Path, count: int) -> DiskSpeed:
    disk = DiskSpeed()
    drop_page_cache(dense)
    read_s = 0.0
    for shard in sorted(dense.glob("*.safetensors")):
        n, s = _dd([f"if={shard}", "of=/dev/null", "bs=64M", "iflag=direct"])
        disk.read_direct_bytes += n
        read_s += s
    disk.read_direct_s = read_s
    target = work / "dd.bin"
    try:
        disk.write_direct_bytes, disk.write_direct_s = _dd(
            ["if=/dev/zero", f"of={target}", "bs=64M", f"count={count}", "oflag=direct"]
        )
        target.unlink()
        drop_page_cache(dense)
        disk.write_buffered_fdatasync_bytes, disk.write_buffered_fdatasync_s = _dd(
            ["if=/dev/zero", f"of={target}", "bs=64M", f"count={count}", "conv=fdatasync"]
        )
    finally:
        target.unlink(missing_ok=True)
        sync()
    return disk


def _mergekit_yaml(dense: Path, num_experts: int, top_k: int) -> str:
    experts = "".join(f"  - source_model: {dense}\n" for _ in range(num_experts))
    return (
        f"base_model: {dense}\n"
        "gate_mode: random\n"
        "dtype: bfloat16\n"
        f"experts_per_token: {top_k}\n"
        "architecture: mixtral\n"
        f"experts:\n{experts}"
    )


def _command(tool: str, dense: Path, out: Path, args: argparse.Namespace, mk_exe: Path | None, yml: Path) -> list[str]:
    if tool == MOEIFY:
        return [
            *_moeify_command(),
            "convert",
            str(dense),
            "-o",
            str(out),
            "--num-experts",
            str(args.num_experts),
            "--top-k",
            str(args.top_k),
            "--overwrite",
            "--quiet",
        ]
    assert mk_exe is not None
    cmd = [str(mk_exe), str(yml), str(out), "--quiet"]
    if tool == MK_1GB:
        cmd += ["--out-shard-size", "1000000000"]
    return cmd


def _check_output(out: Path, dense: Path, num_experts: int, top_k: int, expected_params: int) -> str:
    """'ok', or what is wrong with a converted Mixtral (config, parameter count, dtype, copied experts)."""
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"no readable config.json ({e})"
    if cfg.get("architectures") != ["MixtralForCausalLM"]:
        return f"config.json architectures {cfg.get('architectures')}"
    if cfg.get("num_local_experts") != num_experts or cfg.get("num_experts_per_tok") != top_k:
        return f"config.json has {cfg.get('num_local_experts')} experts, top-{cfg.get('num_experts_per_tok')}"
    _, elements, dtypes = safetensors_summary(out)
    if elements != expected_params:
        return f"{elements:,} parameters in the safetensors files, expected {expected_params:,}"
    if dtypes != {"BF16"}:
        return f"dtypes {sorted(dtypes)}"
    return _check_experts(out, dense, num_experts, int(cfg["num_hidden_layers"]))


def _check_experts(out: Path, dense: Path, num_experts: int, num_layers: int) -> str:
    """Layer 0's and the last layer's last expert must equal the dense MLP (per-expert or fused tensors)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        names: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                names.update({k: path for k in f.keys()})  # noqa: SIM118 (safe_open is no mapping)
        return names

    def get(names: dict[str, Path], key: str) -> torch.Tensor:
        with safe_open(names[key], "pt") as f:
            return f.get_tensor(key)

    src, dst = index(dense), index(out)
    e = num_experts - 1
    for layer in sorted({0, num_layers - 1}):
        mlp = f"model.layers.{layer}.mlp."
        dense_w = {p: get(src, f"{mlp}{p}_proj.weight") for p in ("gate", "up", "down")}
        per_expert = {
            "gate": rf"model\.layers\.{layer}\..*experts\.{e}\.(w1|gate_proj)\.weight$",
            "up": rf"model\.layers\.{layer}\..*experts\.{e}\.(w3|up_proj)\.weight$",
            "down": rf"model\.layers\.{layer}\..*experts\.{e}\.(w2|down_proj)\.weight$",
        }
        got: dict[str, torch.Tensor] = {}
        for part, pattern in per_expert.items():
            keys = [k for k in dst if re.match(pattern, k)]
            if len(keys) == 1:
                got[part] = get(dst, keys[0])
        if len(got) < 3:  # fused 3-D tensors (transformers 5): gate_up_proj [E, 2I, H], down_proj [E, H, I]
            gate_up = [k for k in dst if k.startswith(f"model.layers.{layer}.") and k.endswith("experts.gate_up_proj")]
            down = [k for k in dst if k.startswith(f"model.layers.{layer}.") and k.endswith("experts.down_proj")]
            if len(gate_up) != 1 or len(down) != 1:
                return f"cannot find layer {layer}'s expert {e} tensors"
            gu = get(dst, gate_up[0])[e]
            inter = dense_w["gate"].shape[0]
            got = {"gate": gu[:inter], "up": gu[inter:], "down": get(dst, down[0])[e]}
        for part in ("gate", "up", "down"):
            if got[part].shape != dense_w[part].shape or not torch.equal(got[part], dense_w[part]):
                return f"layer {layer} expert {e} {part} differs from the dense MLP"
    return "ok"


def _run_tool(
    tool: str,
    rnd: int,
    dense: Path,
    args: argparse.Namespace,
    mk_exe: Path | None,
    yml: Path,
    expected_bytes: int,
    expected_params: int,
) -> Run:
    tag = tool.replace(" ", "-")
    out = args.work / f"out-{tag}"
    if out.exists():
        shutil.rmtree(out)
    sync()
    need = expected_bytes + 2 * 1024**3
    if free_bytes(args.work) < need:
        raise SystemExit(f"not enough disk under {args.work}: need ~{gib(need):.1f} GiB")
    cmd = _command(tool, dense, out, args, mk_exe, yml)
    log_path = args.work / "logs" / f"{tag}-{rnd + 1}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if args.cache == "all":
        cache = drop_page_cache(dense)
    else:
        drop_file_cache(dense)
        cache = "fadvise"
    _say(f"[{tool}, run {rnd + 1}/{args.repeats}] $ {' '.join(cmd)}")
    with open(log_path, "w") as log:
        m = run_measured(cmd, env={**os.environ, **OFFLINE_ENV}, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    sync()
    sync_s = time.perf_counter() - t0
    run = Run(tool, m.cmd, m.ok, m.describe_failure(), m.wall_s, sync_s, m.peak_rss_bytes, cache=cache)
    run.log = str(log_path)
    if m.ok:
        said = re.search(r"^Wrote .* in ([0-9.]+) ?s\b", log_path.read_text(errors="replace"), re.MULTILINE)
        run.reported_s = float(said.group(1)) if said else float("nan")
        run.output_bytes = folder_bytes(out)
        run.shards = len(list(out.glob("*.safetensors")))
        run.check = _check_output(out, dense, args.num_experts, args.top_k, expected_params)
        _say(
            f"  {run.wall_s:.1f} s ({run.child_wall_s:.1f} s + sync {run.sync_s:.1f} s), peak RSS "
            f"{gib(run.peak_rss_bytes):.2f} GiB, {run.output_bytes / 1e9:.2f} GB in {run.shards} shard(s); "
            f"check: {run.check}" + (f"; moeify's own timer: {run.reported_s:.1f} s" if said else "")
        )
    else:
        _say(f"  FAILED: {run.failure}; the end of {log_path}:")
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        for line in tail:
            _say(f"    {line}")
    if not args.keep and out.exists():
        shutil.rmtree(out)
        sync()
    return run


# --------------------------------------------------------------------------------------------- report


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def _fx(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _report(
    results: dict[str, ToolResult],
    disk: DiskSpeed,
    dense_bytes: int,
    args: argparse.Namespace,
    mk_versions: dict[str, str],
    mk_note: str,
    startup: dict[str, float],
) -> dict[str, Any]:
    mo = results[MOEIFY]
    written = mo.output_bytes or max((r.output_bytes for r in results.values()), default=0)
    bound = disk.bound_s(dense_bytes, written) if written else float("nan")
    summary: dict[str, Any] = {"disk_bound_s": bound, "bytes_read": dense_bytes, "bytes_written": written}

    _say()
    _say(f"machine: {machine_summary()}")
    tree = _moeify_tree()
    if tree:
        start = args.moeify_tree_at_start
        _say(f"moeify source: {tree}" + (f" (CHANGED during the run; at the start: {start})" if start != tree else ""))
    if mk_versions:
        _say("mergekit-moe: " + ", ".join(f"{k} {v}" for k, v in mk_versions.items()))
    else:
        _say(f"mergekit-moe: {mk_note}")
    cache = "the dense files evicted (posix_fadvise)" if args.cache == "input" else "emptied (drop_caches)"
    _say(f"page cache before each conversion: {cache}; wall time includes interpreter start-up and a final sync")
    _say(
        f"dd on {args.work} (the faster of before / after the conversions): {disk.describe()} "
        f"(reads: the {disk.read_direct_bytes / 1e9:.2f} GB of dense shards; writes: "
        f"{disk.write_direct_bytes / 1e9:.2f} GB each)"
    )
    if startup:
        _say(
            "start-up alone (`--help`, included in the wall times): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items())
        )
    _say(
        f"disk bound: {dense_bytes / 1e9:.2f} GB read / {disk.read_direct_bw / 1e9:.2f} GB/s + "
        f"{written / 1e9:.2f} GB written / {disk.write_direct_bw / 1e9:.2f} GB/s = {bound:.1f} s"
    )
    _say()
    runs_word = f"fastest of {args.repeats} runs; peak RSS: highest" if args.repeats > 1 else "1 run"
    _say(f"| tool | output shards | wall (incl. sync) | peak RSS | written | vs disk bound | ({runs_word})")
    _say("|------|---------------|-------------------|----------|---------|---------------|")
    for tool, res in results.items():
        if not res.runs:
            continue
        if not res.good():
            why = "; ".join(r.failure or r.check for r in res.runs)
            _say(f"| {tool} | {SHARDS[tool]} | FAILED: {why} | | | |")
            continue
        walls = [r.wall_s for r in res.good()]
        spread = f" ({min(walls):.1f}-{max(walls):.1f})" if len(walls) > 1 else ""
        _say(
            f"| {tool} | {SHARDS[tool]} | {res.best_wall_s:.1f} s{spread} | {gib(res.max_rss_bytes):.2f} GiB | "
            f"{res.output_bytes / 1e9:.1f} GB | {_fx(_ratio(res.best_wall_s, bound))} |"
        )
    _say(f"| disk bound | | {bound:.1f} s | | | 1.00x |")
    _say()

    mk = [results[t] for t in (MK_DEFAULT, MK_1GB) if results[t].good()]
    summary["tools"] = {
        t: {"wall_s": r.best_wall_s, "peak_rss_bytes": r.max_rss_bytes, "output_bytes": r.output_bytes}
        for t, r in results.items()
        if r.good()
    }
    wall_vs_disk = _ratio(mo.best_wall_s, bound)
    summary["moeify_wall_vs_disk_bound"] = wall_vs_disk
    if mo.good():
        for res in mk:
            w, m = _ratio(mo.best_wall_s, res.best_wall_s), _ratio(mo.max_rss_bytes, res.max_rss_bytes)
            summary[f"moeify_vs_{res.tool.replace(' ', '_')}"] = {"wall": w, "peak_rss": m}
            _say(
                f"moeify / {res.tool}: wall {_fx(w)} ({mo.best_wall_s:.1f} s vs {res.best_wall_s:.1f} s), "
                f"peak RSS {_fx(m)} ({gib(mo.max_rss_bytes):.2f} GiB vs {gib(res.max_rss_bytes):.2f} GiB)"
            )
        _say(f"moeify / disk bound: {_fx(wall_vs_disk)} ({mo.best_wall_s:.1f} s vs {bound:.1f} s)")
        own = [r.reported_s for r in mo.good() if r.reported_s == r.reported_s]
        if own:
            _say(
                f"moeify's own timer (conversion without start-up), fastest: {min(own):.1f} s = "
                f"{_fx(_ratio(min(own), bound))} the disk bound"
            )
        rss_gib = gib(mo.max_rss_bytes)
        lowest_mk_rss = min((r.max_rss_bytes for r in mk), default=0)
        fastest_mk = min((r.best_wall_s for r in mk), default=float("nan"))
        targets = {
            f"peak RSS < {TARGET_RSS_GIB} GiB": rss_gib < TARGET_RSS_GIB,
            f"peak RSS <= {TARGET_RSS_VS_MERGEKIT}x mergekit's lowest": (
                mo.max_rss_bytes <= TARGET_RSS_VS_MERGEKIT * lowest_mk_rss if mk else None
            ),
            f"wall <= {TARGET_WALL_VS_MERGEKIT}x mergekit's fastest": (
                mo.best_wall_s <= TARGET_WALL_VS_MERGEKIT * fastest_mk if mk else None
            ),
            f"wall <= {TARGET_WALL_VS_DISK}x the disk bound": wall_vs_disk <= TARGET_WALL_VS_DISK,
        }
        summary["targets"] = targets
        _say("targets: " + "; ".join(f"{k}: {_verdict(v)}" for k, v in targets.items()))
    else:
        _say("moeify failed: no ratios")
    if not mk:
        _say(f"mergekit rows skipped: {mk_note}")
    return summary


# --------------------------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--work", type=Path, default=Path("/tmp/moeify-bench"), help="cache / output folder")
    p.add_argument("--small", action="store_true", help="a tiny Llama (hidden 256, 4 layers) for a smoke run")
    p.add_argument("--keep", action="store_true", help="keep the converted outputs (~13 GB each)")
    p.add_argument("--repeats", type=int, default=1, help="runs per tool (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--mergekit-moe",
        default=None,
        help=f"the mergekit-moe executable (default: on PATH, else {DEFAULT_MERGEKIT_VENV_EXE} if it exists)",
    )
    p.add_argument(
        "--cache",
        choices=["input", "all"],
        default="input",
        help="before each conversion evict the dense model's files from the page cache (posix_fadvise; default), "
        "or empty the whole page cache (drop_caches, needs root: Python's and torch's files are then read cold)",
    )
    p.add_argument("--no-mergekit", action="store_true", help="measure moeify alone")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the dense model's weights")
    p.add_argument("--child-build", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.child_build is not None:
        return _child_build(args.child_build, args.small, args.seed)

    args.work = args.work.expanduser().resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _say(f"machine: {machine_summary()}")
    args.moeify_tree_at_start = _moeify_tree()
    if args.moeify_tree_at_start:
        _say(f"moeify source: {args.moeify_tree_at_start}")
    tag = "small" if args.small else "tinyllama"
    dense = args.work / f"dense-llama-{tag}"

    # 1. the dense model (+ tokenizer), built in a child so this process never holds its weights
    m = run_measured(
        [sys.executable, str(SCRIPT), "--child-build", str(dense), "--seed", str(args.seed)]
        + (["--small"] if args.small else [])
    )
    if not m.ok:
        _say(f"building the dense model failed: {m.describe_failure()}")
        return 1
    dense_bytes = folder_bytes(dense)
    dense_config = json.loads((dense / "config.json").read_text())
    _, dense_params, _ = safetensors_summary(dense)
    h, i, n = (int(dense_config[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    expected_params = dense_params + n * ((args.num_experts - 1) * 3 * h * i + args.num_experts * h)
    expected_bytes = estimate_moe_bytes(dense_config, dense_bytes, args.num_experts)
    shards = len(list(dense.glob("*.safetensors")))
    _say(
        f"dense model: {dense} ({dense_params / 1e9:.3f}B parameters, {dense_bytes / 1e9:.2f} GB in {shards} "
        f"shard(s)); each output ~{expected_bytes / 1e9:.1f} GB, {expected_params / 1e9:.2f}B parameters"
    )

    # 2. mergekit-moe, if there is one
    mk_exe = None if args.no_mergekit else _find_mergekit(args.mergekit_moe)
    mk_versions: dict[str, str] = {}
    if args.no_mergekit:
        mk_note = "not run (--no-mergekit)"
    elif mk_exe is None:
        where = args.mergekit_moe or f"mergekit-moe on PATH or {DEFAULT_MERGEKIT_VENV_EXE}"
        mk_note = f"not found ({where}); see the docstring to install it"
    else:
        mk_versions = _mergekit_versions(mk_exe)
        mk_note = f"{mk_exe}" + (f" (mergekit {mk_versions['mergekit']})" if "mergekit" in mk_versions else "")
    _say(f"mergekit-moe: {mk_note}")
    yml = args.work / "mergekit-moe.yml"
    if mk_exe is not None:
        yml.write_text(_mergekit_yaml(dense, args.num_experts, args.top_k))

    # 3. the disk
    dd_count = 4 if args.small else 32
    disk_samples = [_measure_disk(dense, args.work, count=dd_count)]
    _say(f"dd before the conversions: {disk_samples[0].describe()}")

    # start-up alone (interpreter + imports), for reference: `--help`
    startup: dict[str, float] = {}
    for tool in [MOEIFY] + ([MK_DEFAULT] if mk_exe is not None else []):
        cmd = [*_moeify_command(), "--help"] if tool == MOEIFY else [str(mk_exe), "--help"]
        sm = run_measured(cmd, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if sm.ok:
            startup[tool.split()[0]] = sm.wall_s
    _say("start-up (`--help`): " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()))

    # 4. the conversions
    tools = [MOEIFY] + ([MK_DEFAULT, MK_1GB] if mk_exe is not None else [])
    results = {t: ToolResult(t) for t in TOOLS}
    for rnd in range(args.repeats):
        order = tools if rnd % 2 == 0 else list(reversed(tools))
        for tool in order:
            results[tool].runs.append(_run_tool(tool, rnd, dense, args, mk_exe, yml, expected_bytes, expected_params))

    disk_samples.append(_measure_disk(dense, args.work, count=dd_count))
    _say(f"dd after the conversions: {disk_samples[1].describe()}")
    disk = DiskSpeed.best(disk_samples)
    summary = _report(results, disk, dense_bytes, args, mk_versions, mk_note, startup)
    if args.json is not None:
        payload = {
            "machine": machine_summary(),
            "moeify_source": {"start": args.moeify_tree_at_start, "end": _moeify_tree()},
            "mergekit": mk_versions or mk_note,
            "mergekit_yaml": yml.read_text() if yml.exists() else None,
            "args": {k: str(v) for k, v in vars(args).items() if not k.startswith(("child", "moeify_tree"))},
            "dense": {"path": str(dense), "bytes": dense_bytes, "parameters": dense_params},
            "disk_samples": [asdict(d) for d in disk_samples],
            "startup_s": startup,
            "disk": {
                **asdict(disk),
                "read_direct_bw": disk.read_direct_bw,
                "write_direct_bw": disk.write_direct_bw,
                "write_buffered_fdatasync_bw": disk.write_buffered_bw,
            },
            "runs": [{**asdict(r), "wall_s": r.wall_s} for res in results.values() for r in res.runs],
            "summary": summary,
            "median_wall_s": {
                t: statistics.median(r.wall_s for r in res.good()) for t, res in results.items() if res.good()
            },
        }
        args.json.write_text(json.dumps(payload, indent=1))
    _say(f"total {time.perf_counter() - t_start:.0f} s")
    ok = all(results[t].ok for t in tools)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
