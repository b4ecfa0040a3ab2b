"""Lazy access to a checkpoint folder's tensors: names, dtypes and shapes up front, data only when asked for.

Safetensors files are read with plain positioned reads rather than `safe_open`'s memory map: a memory map
keeps every page it touched resident in the process (the whole source, by the end of a conversion), while a
read into a fresh buffer costs only that tensor's memory, freed once it is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoeifyError
from .writer import TORCH_DTYPES

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0


class Checkpoint:
    """Tensor names, dtypes and shapes of a checkpoint folder; `get` reads one tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, _Entry] = {}

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, name: str, out: torch.Tensor, index: int | None = None) -> None:
        """Copy tensor `name` (or its `index`-th slice along the first dimension) into the contiguous `out`."""
        value = self.get(name)
        out.copy_(value if index is None else value[index])


class SafetensorsCheckpoint(Checkpoint):
    """The tensors of a folder's `*.safetensors` files (sharded or not)."""

    def __init__(self, folder: Path, files: list[str]) -> None:
        super().__init__(folder)
        self._fds: dict[str, int] = {}
        for name in files:
            path = folder / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise MoeifyError(f"cannot read {path}: {err.strerror}.") from None
            self._fds[name] = fd
            for key, entry in _read_header(path, fd, name).items():
                self._entries[key] = entry

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into a new buffer."""
        entry = self._entries[name]
        data = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        self._pread(name, data, entry.begin)
        return data.view(entry.dtype).reshape(entry.shape)

    def read_into(self, name: str, out: torch.Tensor, index: int | None = None) -> None:
        """Read tensor `name` (or its `index`-th slice along the first dimension) straight into `out`, no copy."""
        entry = self._entries[name]
        shape = entry.shape if index is None else entry.shape[1:]
        if out.dtype != entry.dtype or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
            raise ValueError(f"cannot read {name} {list(shape)} {entry.dtype} into {list(out.shape)} {out.dtype}")
        begin = entry.begin if index is None else entry.begin + index * out.numel() * entry.dtype.itemsize
        self._pread(name, out.view(-1).view(torch.uint8), begin)

    def _pread(self, name: str, data: torch.Tensor, offset: int) -> None:
        entry = self._entries[name]
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            count = os.preadv(self._fds[entry.file], [view[done:]], offset + done)
            if count == 0:
                raise MoeifyError(
                    f"{self.folder / entry.file} ended early while reading {name}: the file is truncated."
                )
            done += count

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


def _read_header(path: Path, fd: int, file_name: str) -> dict[str, _Entry]:
    """Parse and check a safetensors header (8-byte little-endian length, then JSON) against the file size."""
    broken = f"{path} is not a valid safetensors file (corrupt or truncated)"
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise MoeifyError(f"{broken}: only {size} bytes.")
    length = int.from_bytes(head, "little")
    if length > size - 8:
        raise MoeifyError(f"{broken}: its header claims {length} bytes, the file has {size}.")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoeifyError(f"{broken}: unreadable header.") from None
    header.pop("__metadata__", None)
    entries = {}
    data_end = 0
    for key, info in header.items():
        try:
            begin, end = (8 + length + offset for offset in info["data_offsets"])
            entry = _Entry(file_name, TORCH_DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise MoeifyError(f"{broken}: bad entry for {key}.") from None
        numel = 1
        for dim in entry.shape:
            numel *= dim
        if end - begin != numel * entry.dtype.itemsize:
            raise MoeifyError(f"{broken}: {key} has {end - begin} bytes for shape {list(entry.shape)}.")
        data_end = max(data_end, end)
        entries[key] = entry
    if data_end > size:
        raise MoeifyError(f"{broken}: the data needs {data_end} bytes and the file has {size}.")
    return entries


class PickleCheckpoint(Checkpoint):
    """`pytorch_model*.bin` / `*.pt` files, loaded with `torch.load(weights_only=True, mmap=True)`."""

    def __init__(self, folder: Path, files: list[str]) -> None:
        super().__init__(folder)
        self._tensors: dict[str, torch.Tensor] = {}
        for name in files:
            try:
                state = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many types for a bad pickle
                raise MoeifyError(f"cannot read {folder / name}: {err}") from None
            for key, tensor in state.items():
                self._tensors[key] = tensor
                self._entries[key] = _Entry(name, tensor.dtype, tuple(tensor.shape))

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def open_checkpoint(folder: Path, allow_pickle: bool = False) -> Checkpoint:
    """The weights of `folder`: safetensors; pickle files only with `allow_pickle` (they can run code)."""
    files = _weight_files(folder, "model.safetensors.index.json", ".safetensors")
    if files:
        return SafetensorsCheckpoint(folder, files)
    pickles = _weight_files(folder, "pytorch_model.bin.index.json", *PICKLE_SUFFIXES)
    if not pickles:
        raise MoeifyError(f"no weights in {folder}: expected *.safetensors files.")
    if not allow_pickle:
        raise MoeifyError(
            f"{folder} has only pickle weights ({', '.join(pickles)}). Unpickling can run arbitrary code, so moeify "
            "reads safetensors only by default; pass --allow-pickle if you trust this checkpoint."
        )
    return PickleCheckpoint(folder, pickles)


def _weight_files(folder: Path, index_name: str, *suffixes: str) -> list[str]:
    index = folder / index_name
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in folder.iterdir() if p.suffix in suffixes and p.is_file())
