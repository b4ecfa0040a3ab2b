"""Streaming safetensors writer: each shard's header first, then every tensor as it is produced.

The `safetensors` library serialises a whole dict of tensors at once, so a shard would sit in memory;
here every output tensor's name, dtype and shape is known before conversion starts, so each shard's
header is written first and tensor bytes follow as they are produced, then are freed. The files are
ordinary safetensors files (header layout per the safetensors spec) that `safe_open` and transformers read.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MoeifyError

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass
class TensorSpec:
    """One output tensor: its name, dtype, shape, and a producer of its data in row-major chunks."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split `specs` (in order) into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def shard_file_names(count: int) -> list[str]:
    """transformers' shard names: `model.safetensors`, or `model-00001-of-00003.safetensors`, ..."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(specs: list[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8 bytes with spaces
    return len(raw).to_bytes(8, "little") + raw


class SequentialWriter:
    """Writes one file front to back, bypassing the page cache (`O_DIRECT`) where the file system allows it.

    Bytes are copied into one of two page-aligned staging buffers; a full buffer is written by a background
    thread while the other fills, so producing tensors overlaps with the disk. Direct I/O writes near the
    disk's raw speed and keeps gigabytes of dirty pages out of memory; the last block is padded to alignment
    and the file truncated to its real size on `close`. Without `O_DIRECT` (tmpfs, ...) it writes buffered.
    """

    BLOCK = 4096
    STAGING = 32 * 2**20

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, flags, 0o644)
        self._buffers = [mmap.mmap(-1, self.STAGING), mmap.mmap(-1, self.STAGING)]  # page-aligned memory
        self._current = 0
        self._fill = 0
        self._size = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future[None] | None = None

    def write(self, data: memoryview) -> None:
        """Append `data` (a flat byte view)."""
        data = data.cast("B")
        offset = 0
        while offset < len(data):
            take = min(len(data) - offset, self.STAGING - self._fill)
            self._buffers[self._current][self._fill : self._fill + take] = data[offset : offset + take]
            self._fill += take
            offset += take
            if self._fill == self.STAGING:
                self._flush(self.STAGING)
        self._size += len(data)

    def _flush(self, length: int) -> None:
        if self._pending is not None:
            self._pending.result()  # the other buffer is free again (and errors surface here)
        view = memoryview(self._buffers[self._current])[:length]
        self._pending = self._pool.submit(self._write_all, view)
        self._current = 1 - self._current
        self._fill = 0

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])

    def close(self) -> None:
        """Write what is staged, truncate the block padding, fsync and close."""
        try:
            if self._fill:
                padded = -(-self._fill // self.BLOCK) * self.BLOCK
                self._buffers[self._current][self._fill : padded] = bytes(padded - self._fill)
                self._flush(padded)
            if self._pending is not None:
                self._pending.result()
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Release everything without finishing the file (the caller removes it)."""
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pending = None
        self._buffers = []  # freed once the last view of them is gone


def _write_tensor(handle: SequentialWriter, spec: TensorSpec) -> None:
    written = 0
    for chunk in spec.produce():
        data = chunk.detach().to(device="cpu", dtype=spec.dtype).contiguous().reshape(-1)
        buffer = data.view(torch.uint8).numpy()
        handle.write(memoryview(buffer))
        written += buffer.nbytes
    if written != spec.nbytes:
        raise RuntimeError(f"internal error: {spec.name} produced {written} bytes, expected {spec.nbytes}")


def write_safetensors(
    specs: list[TensorSpec], folder: Path, max_shard_size: int, progress: bool = True
) -> dict[str, str]:
    """Write `specs` as sharded safetensors (+ index when sharded) into `folder`; returns name -> file."""
    shards = plan_shards(specs, max_shard_size)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    total = sum(spec.nbytes for spec in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", disable=not progress) as bar:
        for shard, file_name in zip(shards, names, strict=True):
            handle = SequentialWriter(folder / file_name)
            try:
                handle.write(memoryview(_header(shard)))
                for spec in shard:
                    _write_tensor(handle, spec)
                    weight_map[spec.name] = file_name
                    bar.update(spec.nbytes)
            except BaseException:
                handle.abort()
                raise
            handle.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_max_shard_size(size: str | int) -> int:
    """`'5GB'` -> 5_000_000_000 (also KB/MB/TB, KiB/MiB/GiB, or a plain byte count)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if not match:
            raise MoeifyError(f"bad --max-shard-size '{size}': use a size such as 5GB, 500MB or 2GiB.")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise MoeifyError(f"--max-shard-size must be positive (got {size}).")
    return value
