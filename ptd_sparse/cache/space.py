"""Disk space for a store's record files, reserved before any record is written.

The records are written through memory maps. A write through a map into a part of a file that owns no disk block
(a sparse file, or a file system that fills up meanwhile) cannot report ENOSPC: the kernel kills the process with
SIGBUS instead. So every byte of each file is allocated when the store is created, or resumed, and a full disk is
an ordinary CacheSpaceError naming the file and the bytes it needs, raised before any record is written.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ptd_sparse.cache.errors import CacheSpaceError

# Errors of posix_fallocate that mean "this file system does not allocate that way", not "no space".
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_BLOCK = 1 << 20


def _free_bytes(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path.parent).free:,}"
    except OSError:
        return "unknown"


def _fill(f, size: int) -> None:
    """Allocate by writing: each block's own bytes written back, so a resumed store's records are kept."""
    for offset in range(0, size, _BLOCK):
        f.seek(offset)
        block = f.read(min(_BLOCK, size - offset))
        f.seek(offset)
        f.write(block.ljust(min(_BLOCK, size - offset), b"\0"))
    f.flush()
    os.fsync(f.fileno())


def reserve(path: Path, size: int) -> None:
    """Give every byte of the `size`-byte file `path` its disk blocks (its contents unchanged), or raise
    CacheSpaceError naming the file and the bytes it needs. Called by one process only (rank 0 before the others
    open the store): the fallback writes every block back, which a concurrent writer of records would race."""
    path = Path(path)
    try:
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except (AttributeError, OSError) as error:  # AttributeError: no posix_fallocate (macOS, Windows)
                if isinstance(error, OSError) and error.errno not in _UNSUPPORTED:
                    raise
                _fill(f, size)
    except OSError as error:
        if error.errno not in _NO_SPACE:
            raise
        raise CacheSpaceError(f"no space for teacher cache file {path}: it needs {size:,} bytes and its file system "
                              f"has {_free_bytes(path)} bytes free ({os.strerror(error.errno)}); free space on it "
                              "and run the same command again (the chunks already written are kept), or choose "
                              "another cache folder") from error
