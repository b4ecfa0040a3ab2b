"""Throwaway virtual environments with another transformers release, for tests that run our outputs there.

`transformers_python(version)` returns the Python of a venv holding `transformers==version`, the torch release
running the tests and safetensors, and nothing of moeify. Venvs are cached under
`~/.cache/moeify/test-venvs/` (`MOEIFY_TEST_VENVS` moves it) and rebuilt only when incomplete, so only the
first run pays for the install (about a minute each, torch coming from the local wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

_DONE = "moeify-venv-complete"


def venv_root() -> Path:
    default = Path(os.environ.get("MOEIFY_CACHE", Path.home() / ".cache" / "moeify")) / "test-venvs"
    return Path(os.environ.get("MOEIFY_TEST_VENVS", default))


def transformers_python(version: str) -> Path:
    """The Python of a cached venv with `transformers==version` (built on first use)."""
    torch_version = torch.__version__.split("+")[0]
    folder = venv_root() / f"transformers-{version}-torch-{torch_version}"
    python = folder / "bin" / "python"
    if (folder / _DONE).exists():
        return python
    shutil.rmtree(folder, ignore_errors=True)  # a half-built venv from an interrupted run
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first and alone, so pip takes the local CPU wheel rather than resolving a CUDA build.
    for requirement in ([f"torch=={torch_version}"], [f"transformers=={version}", "safetensors"]):
        proc = subprocess.run(install + requirement, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(requirement)} failed:\n{proc.stderr[-3000:]}")
    (folder / _DONE).write_text(version)
    return python
