"""One process group at a time in a directory: a run directory, or a teacher-logit cache folder.

The holder takes an exclusive `flock` on `<directory>/.ptd-lock` and writes who it is there (pid, host, since when,
what for), so that a second process is refused with a message naming the holder. flock rather than a pid file: the
kernel drops the lock when its holder dies, however it dies (SIGKILL included), so a lock left by a killed process is
free to take over at once, and a pid recycled by another program can never keep a directory held. Under torchrun
rank 0 holds the lock for its whole group; the other ranks take nothing, they share it. Within one process the lock
is re-entrant (a stage called inside `ptd run` holds the directory the run already holds). The file is removed when
its holder releases it.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".ptd-lock"

logger = logging.getLogger("ptd_sparse.directory_lock")


class DirectoryInUse(RuntimeError):
    """Another process group holds the directory; the message names it (pid, host, since when)."""


def _leads_its_group() -> bool:
    # A process group exists only if torch.distributed was imported (this module imports no torch, so that it stays
    # cheap to load). torchrun's RANK is known before the group starts: the lock can be taken before or after.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _describe(record: dict) -> str:
    return (f"process {record.get('pid', '?')} on {record.get('host', '?')} ({record.get('what', '?')}, since "
            f"{record.get('since', '?')})")


def _read_record(fd: int) -> dict | None:
    raw = os.pread(fd, 4096, 0)
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class DirectoryLock:
    """This process's hold on one directory; `release` once per `acquire`."""

    def __init__(self, directory: Path, fd: int | None):
        self.directory = directory
        self._fd = fd  # None: nothing held (a torchrun rank other than 0, or a file system without locks)
        self._count = 1

    def release(self) -> None:
        with _guard:
            if self._count == 0:
                return
            self._count -= 1
            if self._count or self._fd is None:
                return
            _held.pop(self.directory, None)
            # Removed while still locked: a process that opened the old file meanwhile sees, once it has the lock,
            # that the path no longer names its file, and starts again on a new one (acquire).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / LOCK_NAME)
            os.close(self._fd)
            self._fd = None


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}  # flock's errors where locks do not exist
_guard = threading.Lock()
_held: dict[Path, DirectoryLock] = {}  # this process's locks by resolved directory


def acquire(directory: str | Path, what: str) -> DirectoryLock:
    """Hold `directory` (created if missing) for this process group, or raise DirectoryInUse naming its holder.
    what: for the holder's record, e.g. "ptd run directory"."""
    directory = Path(directory).expanduser().resolve()
    if not _leads_its_group():
        return DirectoryLock(directory, None)
    with _guard:
        if (lock := _held.get(directory)) is not None:
            lock._count += 1
            return lock
        directory.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(directory / LOCK_NAME)
        if fd is None:
            return DirectoryLock(directory, None)
        left = _read_record(fd)
        if left is not None:
            logger.warning("%s: taking over the lock left by %s, which no longer runs", directory, _describe(left))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        lock = _held[directory] = DirectoryLock(directory, fd)
        return lock


def _open_locked(path: Path) -> int | None:
    """A descriptor of the lock file `path` with this process's flock on it; None where the file system has no
    locks (warned)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DirectoryInUse(f"{path.parent} is in use by {holder}; wait for it to finish or stop it, or "
                                 "choose another directory") from None
        except OSError as error:
            empty = os.fstat(fd).st_size == 0
            os.close(fd)
            if error.errno not in _NO_LOCKS:
                raise
            if empty:  # the file this call created: nothing is to be left behind
                path.unlink(missing_ok=True)
            # A file system without locks (NFS mounted with nolock, some FUSE ones) must not make every run
            # impossible; the user is told that nothing guards the directory.
            logger.warning("%s: this file system cannot lock files (%s); nothing keeps a second process from using "
                           "the directory at the same time", path.parent, error.strerror)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return fd
        os.close(fd)  # the previous holder removed this file after we opened it: lock the path's new file


def _holder(fd: int) -> str:
    # The holder writes its record just after it takes the lock; give it a moment if the file is still empty.
    for _ in range(20):
        if (record := _read_record(fd)) is not None:
            return _describe(record)
        time.sleep(0.05)
    return "another process (it has not recorded who it is)"


@contextlib.contextmanager
def hold(directory: str | Path, what: str):
    """`with hold(folder, "ptd cache"):` the body runs with `folder` held by this process group (see acquire)."""
    lock = acquire(directory, what)
    try:
        yield lock
    finally:
        lock.release()
