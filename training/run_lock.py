"""One training run per run folder: a lock file (`.selfnpo.lock`) held with an OS file lock for as long
as the run is open. The OS drops the lock when the process ends, however it ends (crash, kill -9), so
a stale lock never blocks the next run. The file says who holds it, for the message to the second run.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".selfnpo.lock"


class FolderInUse(Exception):
    """Another process holds the folder's lock; `holder` describes it."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{str(folder)!r} is in use by another training run ({holder or 'unknown process'})")
        self.folder, self.holder = folder, holder


def _try_lock(fd: int) -> bool:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    except BlockingIOError:
        return False


class RunLock:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise FolderInUse naming the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = self.path.read_text(encoding="utf-8", errors="replace").strip()
            os.close(fd)
            raise FolderInUse(self.folder, holder)
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv[:1] + sys.argv[1:4])}")
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the OS lock; the file stays (deleting it would race)
            self._fd = None
