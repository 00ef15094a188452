"""An exclusive lock on a run directory (``OUT/.diffattn.lock``, ``fcntl.flock``).

Two ``diffattn train`` processes on the same ``out`` would interleave checkpoints and metrics;
the second one to start finds the lock taken and refuses (:class:`OutDirLocked`, a ValueError: one
line, exit code 2). The kernel releases a flock when its process dies, even on SIGKILL, so a
crashed run never leaves a stale lock behind. The file records the holder's pid and host for the
message. On platforms without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".diffattn.lock"


class OutDirLocked(ValueError):
    """Another process holds the run directory's lock."""


_held: dict[str, int] = {}  # lock files this process holds -> nesting depth (flock is per open file)


class DirLock:
    """``with DirLock(out, what="diffattn train"):`` — hold ``out/.diffattn.lock`` for the block.
    Re-entrant within a process (an inner DirLock on a directory this process already holds is a no-op)."""

    def __init__(self, directory: str | os.PathLike, what: str = "diffattn"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._nested = False

    def _refuse(self, fd: int) -> OutDirLocked:
        try:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        return OutDirLocked(f"{self.directory} is in use by another {self.what} ({holder}); wait for it to "
                            f"finish or choose another out")

    def check(self) -> None:
        """Raise OutDirLocked when another process holds the lock; creates nothing."""
        if fcntl is None or str(self.path.absolute()) in _held:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or no directory): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refuse(fd) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def acquire(self) -> "DirLock":
        key = str(self.path.absolute())
        if fcntl is None:
            return self
        if key in _held:
            _held[key] += 1
            self._nested = True
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refuse(fd) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        _held[key] = 1
        return self

    def release(self) -> None:
        key = str(self.path.absolute())
        if self._nested:
            self._nested = False
            _held[key] -= 1
            return
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _held.pop(key, None)
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["DirLock", "OutDirLocked", "LOCK_NAME"]
