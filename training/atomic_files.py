"""Atomic file writes: a temp file in the same folder, fsync, os.replace. A crash or a full disk
never leaves a half-written checkpoint or export in place of the last good one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path, write_fn) -> Path:
    """Call write_fn(tmp_path) to produce the file, then move it over `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
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
