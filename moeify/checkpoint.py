"""Lazy access to a checkpoint folder's safetensors tensors (nothing is read until asked for)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import MoeifyError
from .writer import TORCH_DTYPES


class SafetensorsCheckpoint:
    """The tensors of a folder's `*.safetensors` files (sharded or not), opened with `safe_open`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            found = f" (found {', '.join(pickles)})" if pickles else ""
            raise MoeifyError(
                f"no safetensors weights in {folder}{found}. moeify reads safetensors only; convert the checkpoint "
                "first (load it with transformers and call save_pretrained)."
            )
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            try:
                handle = safe_open(str(folder / name), framework="pt")
            except (SafetensorError, OSError) as err:
                raise MoeifyError(f"cannot read {folder / name}: {err}. The file is corrupt or truncated.") from None
            self._handles[name] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                self._file_of[key] = name

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._file_of)

    def __iter__(self):
        return iter(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self._handles[self._file_of[name]].get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped file, copied out)."""
        return self._handles[self._file_of[name]].get_tensor(name)
