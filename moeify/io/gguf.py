"""Use a GGUF file as a model source by dequantizing it once into a local cache.

Opening a GGUF with transformers is slow (about a minute and ~3 GB of RAM for a
small model, most of it spent by ``gguf.GGUFReader`` parsing the vocabulary,
once for the config, once for the weights and once more for the tokenizer).
:func:`dequantize_gguf` pays that cost once: it writes a normal Hugging Face
model folder (``config.json``, tokenizer files, float32 safetensors shards)
under ``<cache>/gguf/<fingerprint[:16]>/`` and afterwards returns that folder
immediately, so the rest of moeify can treat a GGUF like any local checkpoint.

Cache entries are built in a temporary sibling folder and renamed into place
only once complete (a ``.complete`` marker is written last), and a file lock
keeps concurrent processes from dequantizing the same file twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    from transformers import GgufConfig
except ImportError:  # transformers < 5.19 has no GgufConfig and always dequantizes a GGUF on load
    GgufConfig = None
from transformers import __version__ as transformers_version
from transformers.utils import logging as hf_logging

__all__ = [
    "GGUF_MAGIC",
    "dequantize_gguf",
    "file_fingerprint",
    "gguf_cache_dir",
    "is_gguf_file",
]

GGUF_MAGIC = b"GGUF"
"""The four bytes every GGUF file starts with."""

_HASH_CHUNK = 16 * 1024 * 1024
_FINGERPRINT_MEMO = "fingerprints.json"
_FINGERPRINT_MEMO_MAX_ENTRIES = 256
_COMPLETE_MARKER = ".complete"
# Bump when an entry's contents change; older entries are rebuilt. 2: README.md with the GGUF's license.
_CACHE_VERSION = 2
_TMP_INFIX = ".tmp-"


def gguf_cache_dir() -> Path:
    """Return the root of moeify's cache.

    The root is ``$MOEIFY_CACHE`` if set, else ``$HF_HOME/moeify`` if ``HF_HOME``
    is set, else ``~/.cache/moeify``. Dequantized GGUF models live under
    ``<root>/gguf/``. The directory is not created by this function.
    """
    explicit = os.environ.get("MOEIFY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "moeify"
    return Path.home() / ".cache" / "moeify"


def _gguf_dir() -> Path:
    return gguf_cache_dir() / "gguf"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_memo(memo_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_INFIX}{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_fingerprint(path: str | Path) -> str:
    """Return the sha256 hex digest of a file's content.

    The digest is memoised in a small JSON sidecar
    (``<cache>/gguf/fingerprints.json``) keyed by the file's absolute path,
    size and ``mtime_ns``; it is recomputed whenever any of those change. The
    memo is best-effort: if the cache is not writable the digest is still
    computed and returned.

    Args:
        path: the file to fingerprint.

    Returns:
        The 64-character lowercase sha256 hex digest of the file content.
    """
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    key = str(resolved)
    memo_path = _gguf_dir() / _FINGERPRINT_MEMO

    entry = _read_memo(memo_path).get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])

    digest = _sha256_file(resolved)
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(memo_path) + ".lock"):
            # Keep the sidecar small: drop entries for files that are gone,
            # then the oldest entries beyond the cap (dicts keep insertion order,
            # and the fresh entry is re-inserted last).
            memo = {k: v for k, v in _read_memo(memo_path).items() if k != key and os.path.exists(k)}
            memo[key] = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": digest,
            }
            excess = len(memo) - _FINGERPRINT_MEMO_MAX_ENTRIES
            for stale in list(memo)[: max(excess, 0)]:
                del memo[stale]
            _write_json_atomic(memo_path, memo)
    except OSError:
        pass
    return digest


def is_gguf_file(path: str | Path) -> bool:
    """Return True if ``path`` is an existing file that starts with the GGUF magic."""
    candidate = Path(path).expanduser()
    if not candidate.is_file():
        return False
    try:
        with candidate.open("rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"Expected a GGUF file, got a directory or special file: {path}")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"Not a GGUF file (expected magic {GGUF_MAGIC!r} at the start, found {magic!r}): {path}")


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("cache_version", 1) >= _CACHE_VERSION


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Remove leftover ``.<name>.tmp-<pid>`` folders.

    Must be called while holding the entry's lock: no other process can then be
    building this entry, so every temp folder for it belongs to a crashed run.
    """
    for leftover in parent.glob(f".{name}{_TMP_INFIX}*"):
        _remove_tree(leftover)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled == was_enabled:
        yield
        return
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _build(gguf_path: Path, out_dir: Path, *, trust_remote_code: bool) -> None:
    """Dequantize ``gguf_path`` into ``out_dir`` (model, generation config, tokenizer)."""
    folder, filename = str(gguf_path.parent), gguf_path.name
    dequantize = {} if GgufConfig is None else {"quantization_config": GgufConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, trust_remote_code=trust_remote_code, **dequantize
    )
    # With dequantize=True transformers already drops the quantization config;
    # make sure of it, otherwise save_pretrained refuses ("not serializable").
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir, max_shard_size="2GB")
    del model

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(out_dir)
    _write_source_card(gguf_path, out_dir)


def _write_source_card(gguf_path: Path, out_dir: Path) -> None:
    """A README.md carrying the GGUF's `general.license` (and base model), so converted cards inherit it.

    transformers does not keep these metadata fields, so they are read with `gguf.GGUFReader` (parsing the
    whole header again: seconds, once per cache entry). A GGUF without them gets no card.
    """
    from gguf import GGUFReader
    from huggingface_hub import ModelCard, ModelCardData

    try:
        fields = GGUFReader(gguf_path).fields
    except Exception:  # an unreadable header only costs the card
        return

    def text(key: str) -> str | None:
        field = fields.get(key)
        value = field.contents() if field is not None else None
        return value if isinstance(value, str) and value else None

    license_id = text("general.license")
    repo_url = text("general.base_model.0.repo_url") or ""
    base_model = repo_url.split("huggingface.co/", 1)[1].strip("/") if "huggingface.co/" in repo_url else None
    if license_id is None and base_model is None:
        return
    data = ModelCardData(license=license_id, base_model=base_model)
    name = text("general.name") or gguf_path.stem
    ModelCard(f"---\n{data.to_yaml()}\n---\n# {name}\n\nDequantized by moeify from `{gguf_path.name}`.\n").save(
        out_dir / "README.md"
    )


def dequantize_gguf(path: str | Path, *, trust_remote_code: bool = False, progress: bool = True) -> Path:
    """Dequantize a GGUF file once into the cache and return the model folder.

    The returned folder (``<cache>/gguf/<sha256[:16]>/``) is an ordinary Hugging
    Face model folder: ``config.json``, ``generation_config.json`` (when the
    model has one), the tokenizer files and float32 safetensors shards. If the
    folder already exists and is complete it is returned without opening the
    GGUF. Otherwise the file is loaded with transformers (about a minute for a
    small model) while holding ``<cache>/gguf/<key>.lock``, written to a
    temporary sibling folder and renamed into place, so a crash never leaves a
    half-written entry and concurrent callers do the work only once.

    Args:
        path: the ``.gguf`` file.
        trust_remote_code: passed to transformers when loading model and tokenizer.
        progress: show transformers' progress bars while loading. A one-line
            notice is always printed to stderr when an entry is built.

    Returns:
        The path of the cached model folder.

    Raises:
        ValueError: if ``path`` does not exist or is not a GGUF file.
    """
    gguf_path = Path(path).expanduser().resolve()
    _check_gguf(gguf_path)

    key = file_fingerprint(gguf_path)[:16]
    cache = _gguf_dir()
    final = cache / key
    if _is_complete(final):
        return final

    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{key}.lock")):
        if _is_complete(final):  # another process finished it while we waited
            return final
        _remove_stale_temps(cache, key)
        if final.exists() or final.is_symlink():  # incomplete leftover entry
            _remove_tree(final)

        print(
            f"moeify: dequantizing {gguf_path} once into the cache at {final} "
            "(takes about a minute; later runs reuse it)",
            file=sys.stderr,
            flush=True,
        )
        tmp = cache / f".{key}{_TMP_INFIX}{os.getpid()}"
        try:
            _remove_tree(tmp)
            tmp.mkdir(parents=True)
            started = time.monotonic()
            with _progress_bars(progress):
                _build(gguf_path, tmp, trust_remote_code=trust_remote_code)
            marker = {
                "cache_version": _CACHE_VERSION,
                "source": str(gguf_path),
                "sha256": file_fingerprint(gguf_path),
                "transformers_version": transformers_version,
                "seconds": round(time.monotonic() - started, 1),
            }
            (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, final)
        finally:
            _remove_tree(tmp)
    return final
