"""Safe writes and exclusive folders: what keeps data and runs intact under crashes, full disks and races.

- ``atomic_write``: a temp file in the same folder, fsync, rename. A crash leaves the old file or the new one; a
  full disk removes the temp file and raises one clear ``UserError`` naming the file. Files get the mode a plain
  ``open()`` would give (0666 minus the umask), not ``mkstemp``'s private 0600.
- ``FolderLock``: an exclusive lock on an output folder (collect, train, evaluate, export), so two processes never
  write one folder at once. It is an ``flock`` on ``<folder>/.gtmm.lock`` holding the owner's pid, host and
  command: the kernel drops the lock when its holder dies, so a lock left by a killed process is taken over
  without any staleness heuristic. (flock is advisory and local: on NFS use one host per folder.)
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gtmm.cli import UserError

LOCK_NAME = ".gtmm.lock"


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; respect the user's umask like open() does
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on device while writing {path} (nothing was replaced; "
                            "free some space and run the same command again)") from error
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``atomic_write`` of a bytes object."""
    atomic_write(path, lambda f: f.write(data))


class FolderLock:
    """Exclusive use of ``folder`` by this process, as a context manager: ``with FolderLock(out, "collect"): ...``.

    A second process gets a ``UserError`` naming the folder and the holder (pid, host, command, since when).
    """

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Take the lock without waiting and record this process as holder; UserError if another holds it."""
        import fcntl

        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder} is a file, expected a folder (choose another output folder)")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise UserError(f"{self.folder} is in use by another process ({holder}); wait for it to finish "
                                "or choose another output folder") from None
            # the previous holder may have unlinked the file between our open and our flock: then we hold a lock
            # on a deleted inode that a third process would not see; start again on the current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"{info.get('what', '?')}, pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"
        except (OSError, ValueError):
            return "holder unknown"

    def release(self) -> None:
        """Delete the lock file and drop the lock (nothing happens if it is not held)."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.unlink(self.path)  # unlink while still holding it: a waiting process re-checks the inode
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
