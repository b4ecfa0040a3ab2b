"""Throwaway virtual environments with another transformers release, for tests that run our outputs there.

`transformers_python(version)` returns the Python of a venv holding `transformers==version`, the torch release
running the tests and safetensors, and nothing of moeify. Venvs are cached under
`~/.cache/moeify/test-venvs/` (`MOEIFY_TEST_VENVS` moves it) and rebuilt only when incomplete, so only the
first run pays for the install (transformers and its dependencies: half a minute or so each).

torch is not installed again: unpacking its wheel took another 35-50 s per venv here. A `.pth` file puts a folder
of links to the running torch (and the modules it imports) on the venv's path, after its own site-packages. The
folder sits outside the venv, so pip there never uninstalls anything through the links; only torch itself has
its dist-info linked (transformers reads torch's version from it), so pip installs its own copies of whatever else
transformers needs, and those come first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

_DONE = "moeify-venv-complete"


def venv_root() -> Path:
    default = Path(os.environ.get("MOEIFY_CACHE", Path.home() / ".cache" / "moeify")) / "test-venvs"
    return Path(os.environ.get("MOEIFY_TEST_VENVS", default))


def transformers_python(version: str) -> Path:
    """The Python of a cached venv with `transformers==version` (built on first use)."""
    torch_version = torch.__version__.split("+")[0]
    links = torch_links()
    folder = venv_root() / f"transformers-{version}-torch-{torch_version}-{links.name}"
    python = folder / "bin" / "python"
    if (folder / _DONE).exists():
        return python
    _new_venv(folder, "moeify-test-torch.pth", links)
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run([*install, f"transformers=={version}", "safetensors"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install transformers=={version} safetensors failed:\n{proc.stderr[-3000:]}")
    check = "import torch, transformers; print(torch.__version__, transformers.__version__)"
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    if proc.returncode != 0 or proc.stdout.split() != [torch.__version__, version]:
        raise RuntimeError(
            f"the venv at {folder} does not import torch {torch.__version__} and transformers "
            f"{version}:\n{proc.stdout}{proc.stderr[-3000:]}"
        )
    (folder / _DONE).write_text(version)
    return python


def training_python(version: str) -> Path:
    """The Python of a cached venv that runs moeify's training with `transformers==version`: a `.pth` file puts the
    running interpreter's site-packages (torch, peft, accelerate, bitsandbytes, datasets, ...) on its path after
    its own, where pip installs that transformers release and whatever of its dependencies the running ones do not
    satisfy (pip never uninstalls outside the venv). moeify itself comes from PYTHONPATH."""
    import sysconfig

    site = Path(sysconfig.get_path("purelib"))
    folder = venv_root() / f"training-transformers-{version}-{hashlib.sha256(str(site).encode()).hexdigest()[:12]}"
    python = folder / "bin" / "python"
    if (folder / _DONE).exists():
        return python
    _new_venv(folder, "moeify-test-site.pth", site)
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run([*install, f"transformers=={version}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install transformers=={version} failed:\n{proc.stderr[-3000:]}")
    check = "import peft, torch, transformers; print(transformers.__version__)"
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    if proc.returncode != 0 or proc.stdout.strip() != version:
        raise RuntimeError(f"the venv at {folder} does not import transformers {version}:\n{proc.stderr[-3000:]}")
    (folder / _DONE).write_text(version)
    return python


def _new_venv(folder: Path, pth: str, extra: Path) -> None:
    """A fresh venv at `folder` (a half-built one from an interrupted run is removed) whose `pth` file puts `extra`
    on its path after its own site-packages."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    site = subprocess.run(
        [str(folder / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / pth).write_text(f"{extra}\n")


def torch_links() -> Path:
    """A folder outside any venv with links to the running torch, its dist-info and the top-level modules of its
    required dependencies (transitively), built once per torch installation."""
    dist = metadata.distribution("torch")
    origin = Path(torch.__file__).resolve().parent
    folder = venv_root() / f"torch-links-{hashlib.sha256(str(origin).encode()).hexdigest()[:12]}"
    if (folder / _DONE).exists() and (folder / "torch").resolve() == origin:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    modules: dict[str, list[str]] = {}
    for module, owners in metadata.packages_distributions().items():
        for owner in owners:
            modules.setdefault(_canonical(owner), []).append(module)
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in metadata.distribution(name).requires or []:
            if "extra ==" not in requirement:
                todo.append(_canonical(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]))
    for name in sorted(seen):
        for module in modules.get(name, []):
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin in (None, "built-in", "frozen"):
                continue
            path = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin)
            (folder / path.name).symlink_to(path)
    (folder / Path(str(dist._path)).name).symlink_to(Path(str(dist._path)))  # type: ignore[attr-defined]
    (folder / _DONE).write_text(str(origin))
    return folder


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
