"""The errors of the teacher-logit cache, below every module that raises them."""
from __future__ import annotations

import errno


class CacheError(ValueError):
    """A teacher cache is missing, incomplete, truncated, corrupt, or made for something else."""


class CacheSpaceError(CacheError, OSError):
    """The file system cannot hold a cache's files. Nothing written is lost: once space is freed, running the same
    command again resumes the cache. An OSError too (errno ENOSPC), for callers that handle full disks alike."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC
