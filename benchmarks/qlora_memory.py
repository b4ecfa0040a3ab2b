"""Peak memory and time of one LoRA training step on an MoE: full-precision experts vs transformers' 4-bit vs moeify's.

    python benchmarks/qlora_memory.py [--small] [--steps 2] [--work DIR] [--variants a,b,c,d,e]
                                      [--checkpointing on|off|off,on] [--off-variants b,c,e] [--dtype float32]

Model: a random MixtralForCausalLM, hidden 1024, expert intermediate 2816, 8 experts top-2, 4 layers, vocab 32000
(353M parameters), saved once in bf16 under --work. Batch 2 x 512 tokens, labels = inputs, AdamW, gradient
checkpointing (non-reentrant; `--checkpointing off` or `--no-checkpointing` turns it off, `--checkpointing off,on`
runs every variant both ways, or only `--off-variants` without it), bf16 compute (`--dtype float32`: the weights
that stay in full precision and the compute in float32, for CPUs without native bf16, where bf16 matmuls crawl).
LoRA r=16, alpha=32 on q/k/v/o and on the experts. Each variant runs in a fresh process:

  a. bf16 + peft `target_parameters` LoRA on the experts (peft forms W + delta for every expert every forward)
  b. transformers `BitsAndBytesConfig` 4-bit + the same peft LoRA: only nn.Linear becomes 4-bit, experts stay bf16
  c. moeify: the same `BitsAndBytesConfig` for the linears, experts swapped for `Experts4bit` (NF4, double
     quant) and per-expert LoRA inside the grouped dispatch (`add_expert_lora`)
  d. moeify `load_for_training`: experts quantized layer by layer while loading, other linears in bf16, routers
     trained in full precision (peft `modules_to_save`)
  e. moeify's whole path: `load_for_training` with the linears 4-bit too (`linear_quantization`, the same
     `BitsAndBytesConfig`), and the loss from `moeify.train.causal_lm_loss`, which computes the LM head and the
     cross-entropy in chunks of 32 MiB of float32 logits (about 256 tokens at this 32k vocabulary) instead of
     materialising the whole sequence's logits

d and e train float32 LoRA factors and routers (`load_for_training`); in bf16 their forward and loss run under
autocast, as `moeify train` runs them (Trainer's `bf16=True`). With `--dtype float32`, "bf16" above reads float32.

Reported: anonymous resident memory (RssAnon: heap and tensors, not the memory-mapped checkpoint's pages) before
the first step, its peak during step 1 (sampled every 2 ms), and the median time of the steps after the first.
Then one more, untimed step under `torch.profiler` with memory profiling gives the peak of live tensor bytes
(parameters, mapped or not, optimizer state, activations, temporaries): the CPU counterpart of CUDA's
`torch.cuda.max_memory_allocated`, free of what the C allocator keeps after a free. A second table gives the
live-tensor peak against (b) and the step time against (a), with checkpointing off and on side by side when both
ran (the step time with checkpointing on). `--max-dequantized-mib` sets moeify's dequantization budget
(`ExpertQuantization`).

On CUDA (`--device cuda`, the default where a GPU is present) every variant is built on the GPU (`device_map` for
`from_pretrained`, `device=` for `load_for_training`, so all quantization runs there) and the memory columns are
`torch.cuda` figures instead: allocated after loading, `max_memory_allocated` while loading, in step 1, and in one
more step (the live-tensor column), each from a reset of the peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = {
    "a": "{dtype} + peft `target_parameters` LoRA",
    "b": "`BitsAndBytesConfig` 4-bit + peft `target_parameters` LoRA",
    "c": "`BitsAndBytesConfig` linears + `quantize_experts` + `add_expert_lora`",
    "d": "`load_for_training` (4-bit experts, {dtype} linears)",
    "e": "`load_for_training` + 4-bit linears + chunked loss (what `moeify train` runs)",
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(folder: Path, small: bool) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    size = dict(hidden_size=256, intermediate_size=704) if small else dict(hidden_size=1024, intermediate_size=2816)
    config = MixtralConfig(
        vocab_size=32000,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        **size,
    )
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)


def anonymous_rss() -> int:
    """Resident anonymous memory of this process (heap, tensors), without file-backed pages: transformers keeps
    the safetensors files memory-mapped, and their cached pages would otherwise count as the model's memory."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class CudaPeak:
    """`PeakRss`'s interface over `torch.cuda.max_memory_allocated` (reset at `start()`)."""

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def stop(self) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


class PeakRss:
    """Samples `anonymous_rss()` in a thread; `peak` is the largest seen since `start()`."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def start(self) -> None:
        self.peak = anonymous_rss()
        self._stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, anonymous_rss())
        return self.peak


def tensor_peak(step) -> tuple[int, dict[str, int]]:
    """Run `step()` under the profiler; return the peak of live CPU tensor bytes and its split by category."""
    import torch
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    # torch's memory timeline (what `export_memory_timeline` draws) is the one place that tracks every tensor,
    # including those that existed before the step; there is no CPU `max_memory_allocated`.
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    peak = max(sizes, key=sum)
    names = ["unknown"] + [c.name.lower() if c is not None else "unknown" for c in _CATEGORY_TO_INDEX]
    split: dict[str, int] = {}
    for name, size in zip(names, peak, strict=True):
        split[name] = split.get(name, 0) + size
    return sum(peak), split


def run_variant(
    variant: str,
    folder: Path,
    steps: int,
    seq: int,
    checkpointing: bool,
    max_dequantized_mib: int | None = None,
    device: str = "cpu",
    dtype: str = "bfloat16",
) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from moeify.quant.loading import enable_checkpointing

    torch.manual_seed(0)
    cuda = device == "cuda"
    compute = getattr(torch, dtype)
    loading = CudaPeak() if cuda else PeakRss()
    loading.start()
    quantized = variant in ("b", "c", "e")
    bnb = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        if quantized
        else None
    )
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    from moeify.quant import ExpertQuantization

    quantization = ExpertQuantization()
    if max_dequantized_mib is not None:
        quantization = ExpertQuantization(max_dequantized_bytes=max_dequantized_mib << 20)
    if variant in ("d", "e"):
        from moeify.quant import ExpertLoraConfig, load_for_training

        lora = LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION)
        model = load_for_training(
            folder,
            quantization=quantization,
            lora=ExpertLoraConfig(r=16, alpha=32),
            attention_lora=lora,
            dtype=compute,
            gradient_checkpointing=checkpointing,
            linear_quantization=bnb,
            device=device,
        )
    else:
        placement = {"device_map": {"": device}} if cuda else {}  # the CPU runs as before: no device_map
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=compute, quantization_config=bnb, **placement)
    if variant in ("d", "e"):
        pass
    elif variant == "c":
        from moeify.quant import ExpertLoraConfig, quantize_experts
        from moeify.quant.lora import add_expert_lora

        quantize_experts(model, quantization)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION))
        add_expert_lora(model, ExpertLoraConfig(r=16, alpha=32))
    else:
        # peft needs the full parameter names on quantized models (see shared/design/transformers-v5-facts.md).
        names = [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in experts]
        config = LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION, target_parameters=names)
        model = get_peft_model(model, config)
    if checkpointing and variant not in ("d", "e"):
        enable_checkpointing(model)  # non-reentrant, under the installed transformers' name
    peak_load = loading.stop()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, seq)).to(device)
    import ctypes
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what loading freed, so RSS is what the model holds
        before = anonymous_rss()
    meter = CudaPeak() if cuda else PeakRss()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, peak = [], 0

    # load_for_training keeps what trains in float32 (routers included): with bf16 frozen weights its forward runs
    # under autocast, as moeify train's Trainer runs it. The other variants keep peft's own casting.
    autocast = variant in ("d", "e") and compute != torch.float32

    def train_step() -> torch.Tensor:
        with torch.autocast(device_type=device, dtype=compute, enabled=autocast):
            if variant == "e":
                from moeify.train import causal_lm_loss

                loss = causal_lm_loss(model, ids)
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for step in range(steps):
        if step == 0:
            meter.start()
        sync()
        started = time.perf_counter()
        loss = train_step()
        sync()
        times.append(time.perf_counter() - started)
        if step == 0:
            peak = meter.stop()
    if cuda:  # one more step: its max_memory_allocated is CUDA's live-tensor peak
        meter.start()
        train_step()
        tensors, split = meter.stop(), {}
    else:
        tensors, split = tensor_peak(train_step)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": dtype,
        "variant": variant,
        "peak_load": peak_load,
        "rss_before": before,
        "peak_step1": peak,
        "step_times": times,
        "tensor_peak": tensors,
        "tensor_split": split,
        "trainable": sum(p.numel() for p in trainable),
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="hidden 256 (a quick smoke run)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moeify-bench/qlora"))
    parser.add_argument(
        "--checkpointing",
        default="on",
        choices=["on", "off", "off,on"],
        help="gradient checkpointing on (default), off, or both (off,on: two runs of each variant)",
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="the same as --checkpointing off")
    parser.add_argument("--variants", default="".join(VARIANTS), help="which variants to run (default: all)")
    parser.add_argument(
        "--off-variants", help="with --checkpointing off,on: the variants also run without it (default: --variants)"
    )
    parser.add_argument(
        "--max-dequantized-mib",
        type=int,
        help="moeify's budget of dequantized expert weights (default: 48 on the CPU, 1024 on a GPU)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where a GPU is present, else cpu")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="full-precision weights and compute (float32 on CPUs without native bf16)",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = ["off"] if args.no_checkpointing else args.checkpointing.split(",")
    folder = args.work / ("mixtral-small" if args.small else "mixtral")
    if args.variant:
        result = run_variant(
            args.variant,
            folder,
            args.steps,
            args.seq,
            modes == ["on"],
            args.max_dequantized_mib,
            args.device,
            args.dtype,
        )
        print("RESULT " + json.dumps(result), flush=True)
        return
    build(folder, args.small)
    results: dict[str, dict[str, dict]] = {}
    for mode in modes:
        chosen = args.off_variants if mode == "off" and len(modes) > 1 and args.off_variants else args.variants
        results[mode] = {}
        for variant in [v for v in VARIANTS if v in chosen]:
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--steps",
                str(args.steps),
                "--seq",
                str(args.seq),
                "--work",
                str(args.work),
                "--device",
                args.device,
                "--checkpointing",
                mode,
                "--dtype",
                args.dtype,
            ] + (["--small"] if args.small else [])
            if args.max_dequantized_mib is not None:
                cmd += ["--max-dequantized-mib", str(args.max_dequantized_mib)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"variant {variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(lines[-1][len("RESULT ") :])
            later = result["step_times"][1:] or result["step_times"]
            result["time"] = statistics.median(later)
            results[mode][variant] = result
    for mode, runs in results.items():
        print_details(runs, mode, args.device, args.steps, args.dtype)
    print_summary(results, args.dtype)


def print_details(results: dict[str, dict], mode: str, device: str, steps: int, dtype: str) -> None:
    """Every column measured, one row per variant, for one checkpointing setting."""
    gib = 2**30
    name = next(iter(results.values()))["device"] if results else device
    print(f"\ndevice: {name}; {dtype}; gradient checkpointing: {mode}")
    columns = (
        "CUDA max allocated while loading | allocated before step 1 | max allocated in step 1 | max allocated in a "
        "later step"
        if device == "cuda"
        else "peak while loading | RssAnon before step 1 | peak in step 1 | live tensors, peak of a step"
    )
    print(f"\n| variant | {columns} | step time (median of {max(steps - 1, 1)}) | trainable params |")
    print("|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        print(
            f"| {variant}. {VARIANTS[variant].format(dtype=dtype)} | {r['peak_load'] / gib:.2f} GiB "
            f"| {r['rss_before'] / gib:.2f} GiB "
            f"| {r['peak_step1'] / gib:.2f} GiB | {r['tensor_peak'] / gib:.2f} GiB | {r['time']:.2f} s "
            f"| {r['trainable']:,} |"
        )
    if device != "cuda":
        print("\nlive tensors at their peak, by kind:")
        for variant, r in results.items():
            split = ", ".join(f"{k} {v / gib:.2f}" for k, v in r["tensor_split"].items() if v >= gib / 100)
            print(f"  {variant}: {split} GiB")
    if {"c", "d"} <= set(results):
        c, d = results["c"], results["d"]
        print(
            f"load_for_training / (from_pretrained + quantize_experts): peak while loading "
            f"{d['peak_load'] / c['peak_load']:.2f}x"
        )


def print_summary(results: dict[str, dict[str, dict]], dtype: str = "bfloat16") -> None:
    """The live-tensor peak against (b) and the step time against (a), checkpointing off / on side by side."""
    modes = list(results)
    timed = "on" if "on" in results else modes[-1]
    both = len(modes) > 1

    def per_mode(variant: str, cell) -> str:
        return " / ".join(cell(results[m][variant], results[m]) if variant in results[m] else "-" for m in modes)

    def peak(r: dict, runs: dict) -> str:
        return f"{r['tensor_peak'] / 2**30:.2f}"

    def against_b(r: dict, runs: dict) -> str:
        return f"{r['tensor_peak'] / runs['b']['tensor_peak']:.2f}x" if "b" in runs else "-"

    setting = f", checkpointing {' / '.join(modes)}" if both else ""
    print(
        f"\n| variant | live tensors, peak of a step{setting} | / b{', ' + ' / '.join(modes) if both else ''} "
        f"| step time{', checkpointing ' + timed if both else ''} | / a |"
    )
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        if not any(variant in runs for runs in results.values()):
            continue
        r, runs = results[timed].get(variant), results[timed]
        time_cell = f"{r['time']:.2f} s" if r else "-"
        a_cell = f"{r['time'] / runs['a']['time']:.2f}x" if r and "a" in runs else "-"
        print(
            f"| {variant}. {VARIANTS[variant].format(dtype=dtype)} | {per_mode(variant, peak)} GiB "
            f"| {per_mode(variant, against_b)} | {time_cell} | {a_cell} |"
        )


if __name__ == "__main__":
    main()
