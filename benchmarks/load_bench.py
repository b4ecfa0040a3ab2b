"""How long transformers takes to load a native Mixtral that moeify wrote per-expert vs fused (`--layout`).

Run from the repository root, with moeify installed (the `moeify` command on PATH, or importable):

    python benchmarks/load_bench.py                # TinyLlama-1.1B shape, 8 experts: ~30 GB of disk, minutes
    python benchmarks/load_bench.py --small        # a tiny Llama: a smoke run in well under a minute
    python benchmarks/load_bench.py --clean        # ... and delete the work folder afterwards

What it does:

1. Builds a random-weight bf16 Llama of TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 22 layers,
   32 heads, 8 KV heads, vocab 32000; N(0, 0.02), seeded), saved with 1 GB shards, into
   `WORK/dense-llama` (`--work`, default /tmp/moeify-bench); a later run reuses it.
2. Converts it twice with `moeify convert DENSE -o OUT --num-experts 8 --top-k 2 --overwrite --quiet`, once
   with `--layout per-expert` and once with `--layout fused`, each in a child process whose wall time and
   peak RSS are recorded.
3. Loads each output in a fresh child process with `AutoModelForCausalLM.from_pretrained(OUT,
   dtype=torch.bfloat16)`, timing the call itself (inside the child, so Python / torch start-up is not
   counted) and the child's peak RSS right after it. transformers may leave tensors memory-mapped from the
   safetensors files (not yet read) when it needs no conversion, which makes a load look nearly free, so the
   child then reads one byte of every page of every weight ("touch") and reports "ready" = load + touch and
   the peak RSS at that point, split into anonymous and file-backed memory. Finally it checks that the load
   found no missing / unexpected / mismatched keys, runs one forward pass on a few tokens, and the parent
   checks that both layouts give the same logits.
4. Prints tables (conversion; load) and the per-expert / fused ratios of load and ready time and peak RSS.

By default each checkpoint is evicted from the page cache before its load (`--cache cold`, with
`posix_fadvise`, no root needed), so both loads read from disk; `--cache warm` reads the files once first.
A child that runs out of memory is made the OOM killer's first choice and reported as killed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/x.py` and `-m benchmarks.x`
from common import (  # noqa: E402
    Measured,
    drop_file_cache,
    estimate_moe_bytes,
    folder_bytes,
    free_bytes,
    gib,
    machine_summary,
    run_measured,
    total_memory_bytes,
    warm_file_cache,
)

LAYOUTS = ("per-expert", "fused")
SCRIPT = Path(__file__).resolve()


@dataclass
class LoadResult:
    """One timed `from_pretrained` in a child process."""

    ok: bool
    failure: str = ""
    load_s: float = float("nan")  # the from_pretrained call, timed inside the child
    load_peak_rss_bytes: int = 0  # the child's peak RSS right after from_pretrained returned
    load_rss_anon_bytes: int = 0  # RSS right after the load: anonymous memory (copied / converted tensors)
    load_rss_file_bytes: int = 0  # ... and file-backed pages (tensors still memory-mapped from the safetensors)
    touch_s: float = float("nan")  # then reading one byte of every page of every weight (a lazy load pays here)
    ready_peak_rss_bytes: int = 0  # the child's peak RSS once every weight page has been read
    ready_rss_anon_bytes: int = 0
    ready_rss_file_bytes: int = 0
    child_peak_rss_bytes: int = 0  # the child's peak RSS over its whole life (load + forward)
    child_wall_s: float = float("nan")  # the whole child: interpreter, imports, load, forward
    forward_s: float = float("nan")
    model_class: str = ""
    num_parameters: int = 0
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    torch_threads: int = 0

    @property
    def ready_s(self) -> float:
        """Seconds from calling from_pretrained until every weight is in memory."""
        return self.load_s + self.touch_s


@dataclass
class LayoutResult:
    """Conversion and loads of one layout."""

    layout: str
    output: str
    convert_cmd: list[str] = field(default_factory=list)
    convert_ok: bool = False
    convert_failure: str = ""
    convert_wall_s: float = float("nan")
    convert_peak_rss_bytes: int = 0
    output_bytes: int = 0
    loads: list[LoadResult] = field(default_factory=list)

    def best_load(self) -> LoadResult | None:
        """The fastest successful load (None if none succeeded)."""
        good = [r for r in self.loads if r.ok]
        return min(good, key=lambda r: r.load_s) if good else None

    def best_ready(self) -> LoadResult | None:
        """The successful load with the smallest load + touch time (None if none succeeded)."""
        good = [r for r in self.loads if r.ok]
        return min(good, key=lambda r: r.ready_s) if good else None


# --------------------------------------------------------------------------------------------- child modes


def _child_build(work: Path, small: bool, seed: int) -> int:
    from common import build_dense_llama, llama_config

    build_dense_llama(work, llama_config(small), seed=seed)
    return 0


def _child_load(folder: Path, result_path: Path, tokens: int, seed: int) -> int:
    import resource

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def rss() -> tuple[int, int]:  # (anonymous, file-backed) resident bytes now
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))  # type: ignore[return-value]

    def touch(model: torch.nn.Module) -> None:
        # Read one element of every 4 KiB page of every parameter and buffer: a load that left the weights
        # memory-mapped (not yet read from the file) pays for the reading here.
        with torch.inference_mode():
            for t in [*model.parameters(), *model.buffers()]:
                flat = t.detach().reshape(-1)
                flat[:: max(1, 4096 // flat.element_size())].float().sum().item()

    t0 = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    load_s = time.perf_counter() - t0
    load_peak = peak()
    load_anon, load_file = rss()
    print(
        f"  loaded {type(model).__name__} in {load_s:.2f} s, peak RSS {gib(load_peak):.2f} GiB "
        f"(now {gib(load_anon):.2f} GiB anonymous + {gib(load_file):.2f} GiB file-backed)",
        flush=True,
    )
    t1 = time.perf_counter()
    touch(model)
    touch_s = time.perf_counter() - t1
    ready_peak = peak()
    ready_anon, ready_file = rss()
    print(
        f"  read every weight page in {touch_s:.2f} s, peak RSS {gib(ready_peak):.2f} GiB "
        f"(now {gib(ready_anon):.2f} GiB anonymous + {gib(ready_file):.2f} GiB file-backed)",
        flush=True,
    )

    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    t1 = time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    forward_s = time.perf_counter() - t1
    finite = bool(torch.isfinite(logits).all())
    torch.save(logits, result_path.with_suffix(".logits.pt"))

    result = LoadResult(
        ok=finite and not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"],
        failure="" if finite else "non-finite logits",
        load_s=load_s,
        load_peak_rss_bytes=load_peak,
        load_rss_anon_bytes=load_anon,
        load_rss_file_bytes=load_file,
        touch_s=touch_s,
        ready_peak_rss_bytes=ready_peak,
        ready_rss_anon_bytes=ready_anon,
        ready_rss_file_bytes=ready_file,
        forward_s=forward_s,
        model_class=type(model).__name__,
        num_parameters=sum(p.numel() for p in model.parameters()),
        missing_keys=sorted(info["missing_keys"]),
        unexpected_keys=sorted(info["unexpected_keys"]),
        mismatched_keys=sorted(str(k) for k in info["mismatched_keys"]),
        torch_threads=torch.get_num_threads(),
    )
    if result.missing_keys or result.unexpected_keys or result.mismatched_keys:
        result.failure = "the load did not match the checkpoint's keys"
    result_path.write_text(json.dumps(asdict(result)))
    return 0 if result.ok else 1


# --------------------------------------------------------------------------------------------- parent


def _moeify_command() -> list[str]:
    exe = shutil.which("moeify")
    return [exe] if exe else [sys.executable, "-m", "moeify"]


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _check_disk(work: Path, dense: Path, outputs: dict[str, Path], num_experts: int) -> None:
    config = json.loads((dense / "config.json").read_text())
    expected = estimate_moe_bytes(config, folder_bytes(dense), num_experts)
    reclaimable = sum(folder_bytes(p) for p in outputs.values() if p.exists())
    need = expected * len(outputs) + 2 * 1024**3  # margin
    have = free_bytes(work) + reclaimable
    _say(f"each output ~{gib(expected):.1f} GiB; need ~{gib(need):.1f} GiB, have {gib(have):.1f} GiB")
    if have < need:
        raise SystemExit(f"not enough disk space under {work}: need ~{gib(need):.1f} GiB, have {gib(have):.1f} GiB")


def _convert(dense: Path, out: Path, layout: str, args: argparse.Namespace, res: LayoutResult) -> None:
    if out.exists():
        shutil.rmtree(out)  # so --overwrite never holds the old and the new output on disk together
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
        "--layout",
        layout,
        "--overwrite",
        "--quiet",
    ]
    _say(f"$ {' '.join(cmd)}")
    m = run_measured(cmd)
    res.convert_cmd = m.cmd
    res.convert_ok = m.ok
    res.convert_failure = m.describe_failure()
    res.convert_wall_s = m.wall_s
    res.convert_peak_rss_bytes = m.peak_rss_bytes
    res.output_bytes = folder_bytes(out) if out.exists() else 0
    status = "ok" if m.ok else f"FAILED ({res.convert_failure})"
    _say(
        f"  convert {layout}: {status}, {m.wall_s:.1f} s, peak RSS {gib(m.peak_rss_bytes):.2f} GiB, "
        f"output {gib(res.output_bytes):.2f} GiB"
    )


def _load(out: Path, layout: str, run: int, args: argparse.Namespace) -> LoadResult:
    if args.cache == "cold":
        drop_file_cache(out)
    elif args.cache == "warm":
        warm_file_cache(out)
    result_path = args.work / f"load-{layout}-{run}.json"
    result_path.unlink(missing_ok=True)
    result_path.with_suffix(".logits.pt").unlink(missing_ok=True)  # never compare a stale forward pass
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--child-load",
        str(out),
        "--child-result",
        str(result_path),
        "--tokens",
        str(args.tokens),
        "--seed",
        str(args.seed),
    ]
    _say(f"loading {layout} (run {run + 1}/{args.repeats}, {args.cache} page cache) ...")
    m: Measured = run_measured(cmd)
    if result_path.exists():
        data = json.loads(result_path.read_text())
        result = LoadResult(**data)
    else:
        result = LoadResult(ok=False, failure=m.describe_failure() or "the child wrote no result")
    if not m.ok and not result.failure:
        result.failure = m.describe_failure()
    result.ok = result.ok and m.ok
    result.child_peak_rss_bytes = m.peak_rss_bytes
    result.child_wall_s = m.wall_s
    if result.ok:
        _say(
            f"  {layout}: load {result.load_s:.2f} s (+{result.touch_s:.2f} s to read every weight), "
            f"peak RSS {gib(result.load_peak_rss_bytes):.2f} GiB after the load, "
            f"{gib(result.ready_peak_rss_bytes):.2f} GiB once read, {gib(m.peak_rss_bytes):.2f} GiB at exit; "
            f"forward {result.forward_s:.2f} s"
        )
    else:
        _say(f"  {layout}: load FAILED: {result.failure} (child peak RSS {gib(m.peak_rss_bytes):.2f} GiB)")
        for name in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = getattr(result, name)
            if keys:
                _say(f"    {name} ({len(keys)}): {keys[:5]}")
    return result


def _compare_logits(work: Path, results: dict[str, LayoutResult]) -> float | None:
    """Max |logit difference| between the layouts' forward passes (None if a side is missing)."""
    paths = [work / f"load-{layout}-0.logits.pt" for layout in results]
    if len(paths) != 2 or not all(p.exists() for p in paths):
        return None
    import torch

    a, b = (torch.load(p) for p in paths)
    return float((a - b).abs().max()) if a.shape == b.shape else float("inf")


def _fmt(x: float, spec: str = ".1f") -> str:
    return "-" if x != x else format(x, spec)  # NaN -> "-"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _report(results: dict[str, LayoutResult], logit_diff: float | None, args: argparse.Namespace) -> None:
    _say()
    _say(f"machine: {machine_summary()}")
    _say(
        f"model: {'small Llama' if args.small else 'TinyLlama-1.1B-shaped Llama'}, upcycled to "
        f"{args.num_experts} experts, top-{args.top_k}; {args.cache} page cache; best of {args.repeats} load(s)"
    )
    _say()
    _say("conversion (moeify convert, child process):")
    header = f"{'layout':<11} {'wall s':>8} {'peak RSS GiB':>12} {'output GiB':>10}"
    _say(header)
    _say("-" * len(header))
    for layout, r in results.items():
        conv = _fmt(r.convert_wall_s) if r.convert_ok else "FAILED"
        _say(f"{layout:<11} {conv:>8} {gib(r.convert_peak_rss_bytes):>12.2f} {gib(r.output_bytes):>10.2f}")
    _say()
    _say("load (from_pretrained, dtype=bfloat16, fresh child process; 'ready' = load + read every weight page):")
    header = (
        f"{'layout':<11} {'load s':>7} {'touch s':>7} {'ready s':>7} {'load peak GiB':>13} "
        f"{'ready peak GiB':>14} {'anon/file GiB':>13} {'forward s':>9}"
    )
    _say(header)
    _say("-" * len(header))
    for layout, r in results.items():
        b = r.best_load()
        if b is None:
            _say(f"{layout:<11} FAILED: {'; '.join(x.failure for x in r.loads) or 'not run'}")
            continue
        split = f"{gib(b.ready_rss_anon_bytes):.2f}/{gib(b.ready_rss_file_bytes):.2f}"
        _say(
            f"{layout:<11} {b.load_s:>7.2f} {b.touch_s:>7.2f} {b.ready_s:>7.2f} {gib(b.load_peak_rss_bytes):>13.2f} "
            f"{gib(b.ready_peak_rss_bytes):>14.2f} {split:>13} {b.forward_s:>9.2f}"
        )
        for i, ld in enumerate(r.loads):
            if not ld.ok:
                _say(f"  {layout} load {i + 1} failed: {ld.failure}")
    pe, fu = results.get("per-expert"), results.get("fused")
    pe_l, fu_l = (pe.best_load() if pe else None), (fu.best_load() if fu else None)
    pe_r, fu_r = (pe.best_ready() if pe else None), (fu.best_ready() if fu else None)
    _say()
    if pe_l and fu_l and pe_r and fu_r:
        _say(
            f"per-expert / fused: load time {_ratio(pe_l.load_s, fu_l.load_s)} "
            f"({pe_l.load_s:.1f} s vs {fu_l.load_s:.1f} s), load peak RSS "
            f"{_ratio(pe_l.load_peak_rss_bytes, fu_l.load_peak_rss_bytes)} "
            f"({gib(pe_l.load_peak_rss_bytes):.2f} GiB vs {gib(fu_l.load_peak_rss_bytes):.2f} GiB)"
        )
        _say(
            f"per-expert / fused: ready time {_ratio(pe_r.ready_s, fu_r.ready_s)} "
            f"({pe_r.ready_s:.1f} s vs {fu_r.ready_s:.1f} s), ready peak RSS "
            f"{_ratio(pe_r.ready_peak_rss_bytes, fu_r.ready_peak_rss_bytes)} "
            f"({gib(pe_r.ready_peak_rss_bytes):.2f} GiB vs {gib(fu_r.ready_peak_rss_bytes):.2f} GiB)"
        )
    else:
        _say("per-expert / fused: no ratio (a conversion or load failed, or a layout was not measured)")
    if logit_diff is not None:
        verdict = "identical" if logit_diff == 0 else "DIFFERENT" if logit_diff > 1e-2 else "close"
        _say(f"max |logit difference| between the layouts: {logit_diff:.3g} ({verdict})")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--work", type=Path, default=Path("/tmp/moeify-bench"), help="cache / output folder")
    p.add_argument("--small", action="store_true", help="a tiny Llama (hidden 256, 4 layers) for a smoke run")
    p.add_argument("--clean", action="store_true", help="delete the work folder at the end")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="layouts to measure")
    p.add_argument("--repeats", type=int, default=1, help="loads per layout; the fastest is reported (default 1)")
    p.add_argument(
        "--cache",
        choices=["cold", "warm", "asis"],
        default="cold",
        help="page cache before each load: evict the checkpoint (default), read it once first, or leave it",
    )
    p.add_argument("--reuse-outputs", action="store_true", help="skip a conversion whose output already exists")
    p.add_argument("--tokens", type=int, default=8, help="tokens in the forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--child-load", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-build", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.child_build is not None:
        return _child_build(args.child_build, args.small, args.seed)
    if args.child_load is not None:
        assert args.child_result is not None
        return _child_load(args.child_load, args.child_result, args.tokens, args.seed)

    args.work = args.work.expanduser().resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _say(f"machine: {machine_summary()}")
    tag = "small" if args.small else "tinyllama"
    dense = args.work / f"dense-llama-{tag}"
    outputs = {layout: args.work / f"mixtral-{tag}-{args.num_experts}x-{layout}" for layout in args.layouts}

    # 1. the dense model, built in a child so this process never holds its weights
    m = run_measured(
        [sys.executable, str(SCRIPT), "--child-build", str(dense), "--seed", str(args.seed)]
        + (["--small"] if args.small else [])
    )
    if not m.ok:
        _say(f"building the dense model failed: {m.describe_failure()}")
        return 1
    _say(f"dense model: {dense} ({gib(folder_bytes(dense)):.2f} GiB)")

    # 2. the conversions
    results = {layout: LayoutResult(layout, str(out)) for layout, out in outputs.items()}
    todo = {k: v for k, v in outputs.items() if not (args.reuse_outputs and (v / "config.json").exists())}
    if todo:
        _check_disk(args.work, dense, todo, args.num_experts)
    for layout, out in outputs.items():
        if layout in todo:
            _convert(dense, out, layout, args, results[layout])
        else:
            _say(f"reusing {out}")
            results[layout].convert_ok = True
            results[layout].output_bytes = folder_bytes(out)

    # 3. the loads, alternating layouts between repeats
    expected_peak = max(r.output_bytes for r in results.values())
    if expected_peak > 0.9 * total_memory_bytes():
        _say(
            f"note: a checkpoint is {gib(expected_peak):.1f} GiB, close to the machine's "
            f"{gib(total_memory_bytes()):.1f} GiB of memory; a load may run out of memory"
        )
    for run in range(args.repeats):
        order = list(outputs) if run % 2 == 0 else list(reversed(outputs))
        for layout in order:
            if results[layout].convert_ok:
                results[layout].loads.append(_load(outputs[layout], layout, run, args))

    logit_diff = _compare_logits(args.work, results) if len(results) == 2 else None
    _report(results, logit_diff, args)
    if args.json is not None:
        payload = {
            "machine": machine_summary(),
            "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("child")},
            "results": {k: asdict(v) for k, v in results.items()},
            "max_logit_diff": logit_diff,
        }
        args.json.write_text(json.dumps(payload, indent=1))
    _say(f"total {time.perf_counter() - t_start:.0f} s")

    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
        _say(f"deleted {args.work}")
    ok = all(r.convert_ok and r.loads and all(x.ok for x in r.loads) for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
