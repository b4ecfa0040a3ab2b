"""Output folders written atomically: everything goes into a temporary folder beside OUT, renamed into place at the
end, so a failure or a kill never leaves a half-written OUT (`convert`, `merge`)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MoeifyError

_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space or choose an OUT on another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose an OUT on another disk",
    errno.EROFS: "the file system is read-only; choose a writable OUT",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
}


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or a non-empty folder without `overwrite` (before any work starts)."""
    if out.parent.is_dir():
        _clean_stale_temporaries(out)
    if out.exists() and not out.is_dir():
        raise MoeifyError(f"OUT {out} exists and is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MoeifyError(f"OUT {out} exists and is not empty; pass --overwrite to replace it, or choose another path.")


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` (an old `out` is kept until the new one
    is in place), on any error it is removed and disk errors become one clear `MoeifyError`."""
    tmp = out.parent / f".{out.name}.moeify-tmp-{_owner()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        _replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in _DISK_ERRORS:
            raise MoeifyError(f"cannot write {out}: {_DISK_ERRORS[err.errno]}; nothing was written.") from None
        raise


def _clean_stale_temporaries(out: Path) -> None:
    """Remove the temporary folders that killed runs left beside OUT.

    A previous OUT set aside by `--overwrite` (`.OUT.moeify-old-HOST-PID`) is put back if OUT itself is missing,
    i.e. the kill came between the two renames that swap the new output in. A folder named for another host is
    never touched: on a shared file system its process may be alive, and this host cannot ask.
    """
    for candidate in sorted(out.parent.glob(f".{out.name}.moeify-*")):
        match = re.search(r"\.moeify-(?:tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)$", candidate.name)
        if match and match["host"] is not None and match["host"] != _host():
            continue
        if match and _pid_alive(int(match["pid"])):
            continue
        if ".moeify-old-" in candidate.name and not out.exists():
            os.replace(candidate, out)
        else:
            shutil.rmtree(candidate, ignore_errors=True)


def _host() -> str:
    """This machine's name as it appears in temporary folder names (no path separators)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _owner() -> str:
    """`HOST-PID`: who a temporary folder belongs to, so that cleanup on a shared file system (several nodes writing
    beside the same OUT) can tell a live process of another host from a dead one of its own."""
    return f"{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an old `out` is kept until the new one is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.moeify-old-{_owner()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
