"""Atomic file writes: a temp file in the same folder, fsync, os.replace. A crash or a full disk
never leaves a half-written checkpoint or export in place of the last good one.

Every failure to write is an OSError (with errno ENOSPC when the disk is full), whatever library
did the writing: torch.save reports a full disk as a RuntimeError ("unexpected pos") and
safetensors as a SafetensorError ("os error 28"), which would otherwise slip past the callers'
"cannot write" handling.

Temp files carry the writing process's id (`.<name>.<pid>.<random>.tmp`); one left behind by a
process that was killed mid-write is removed by the next write of the same file.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

FULL_DISK_BYTES = 1 << 20  # a write that failed with less than this free on its filesystem: disk full


def atomic_write(path, write_fn) -> Path:
    """Call write_fn(tmp_path) to produce the file, then move it over `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write_fn(tmp)
        except Exception as e:
            failure = _as_os_error(e, tmp, path)
            if failure is None:
                raise
            raise failure from e
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; weights must be readable like any file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignore():
            os.unlink(tmp)
        raise
    with _ignore():  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _as_os_error(e: Exception, tmp, path: Path) -> OSError | None:
    """The OSError a library's write failure stands for, or None when it is not a write failure."""
    if isinstance(e, OSError):
        return None
    if isinstance(e.__context__, OSError):  # torch.save to a Python file keeps the real error here
        cause = e.__context__
        return OSError(cause.errno, cause.strerror or str(cause), str(path))
    text = str(e)
    code = re.search(r"os error (\d+)", text)
    if code:
        number = int(code.group(1))
        return OSError(number, os.strerror(number), str(path))
    if any(marker in text for marker in ("unexpected pos", "PytorchStreamWriter", "I/O error", "failed writing")):
        number = errno.ENOSPC if _nearly_full(tmp) else errno.EIO
        return OSError(number, os.strerror(number), str(path))
    return None


def _nearly_full(tmp) -> bool:
    try:
        return shutil.disk_usage(os.path.dirname(tmp) or ".").free < FULL_DISK_BYTES
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete temp files of `path` left by processes that no longer run (killed during a save)."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        match = re.match(rf"^\.{re.escape(path.name)}\.(\d+)\.", tmp.name)
        if match and _pid_alive(int(match.group(1))):
            continue  # a write in progress (this process or another that is alive)
        with _ignore():
            tmp.unlink()
            removed.append(tmp)
    return removed


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class _ignore:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def save_torch(path, obj) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def save_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    import safetensors.torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def save_json(path, obj) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    return atomic_write(path, write)
