"""How long `import moeify` and `moeify --help` take, against `import torch` measured in the same run.

    python benchmarks/import_time.py [--runs 7]

Each command runs in a fresh interpreter, the commands taking turns (one warm-up round first, not counted); the
wall time of each whole process is measured from outside and the median is reported, with the ratio to
`python -c "import torch"`. The target: both within 1.5x of `import torch`. The last row, for
reference, is the price of then using transformers' Auto classes (transformers' own imports, plus moeify's
registration).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import moeify'": [sys.executable, "-c", "import moeify"],
    "moeify --help": [shutil.which("moeify") or "moeify", "--help"],
    "python -c 'import moeify; from transformers import AutoModelForCausalLM'": [
        sys.executable,
        "-c",
        "import moeify; from transformers import AutoModelForCausalLM",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for round_ in range(args.runs + 1):
        for name, command in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            if round_:  # the first round warms the file cache
                times[name].append(time.perf_counter() - started)
    torch_s = statistics.median(times["python -c 'import torch'"])
    print(f"| command | median wall (of {args.runs}) | / import torch |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} s | {median / torch_s:.2f}x |")


if __name__ == "__main__":
    main()
