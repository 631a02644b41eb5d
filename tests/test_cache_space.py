"""A full disk while a teacher cache is written is a CacheSpaceError naming the file and the bytes it needs, never a
SIGBUS from a write through a memory map into a sparse file; the same write finishes the cache once space is there."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from ptd_sparse.cache import CacheError, CacheSpaceError, CacheSpec, TeacherCache
from ptd_sparse.cache import space
from ptd_sparse.cache.store import StoreWriter

ROOT = Path(__file__).resolve().parents[1]
# 2000 samples x 10 classes of float32 logits: 80,000 bytes of logits.bin, more than the 64 KiB file system.
SPEC = dict(teacher="t", dataset={"name": "synthetic"}, samples=2000, views=1, crop_padding=0, flip=False, view_seed=0,
            classes=10, form="full", dtype="float32", chunk=500)
LOGITS_BYTES = 2000 * 10 * 4

# Writes the whole store (every chunk, then the manifest) into argv[1]: what `ptd cache` does, without a teacher.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from ptd_sparse.cache.store import CacheSpec, StoreWriter
    writer = StoreWriter(sys.argv[1], CacheSpec(**eval(sys.argv[2])))
    writer.create()
    for chunk in writer.pending():
        start, stop = writer.chunk_range(chunk)
        logits = np.arange(start * 10, stop * 10, dtype=np.float32).reshape(stop - start, 1, 10)
        writer.write(chunk, {"views.bin": np.zeros((stop - start, 1, 3), np.uint8), "logits.bin": logits})
    writer.finish()
    print("written")
""")


def write_store(folder: Path) -> subprocess.CompletedProcess:
    """In a child process: a SIGBUS kills the child, not pytest."""
    return subprocess.run([sys.executable, "-c", WRITER, str(folder), repr(SPEC)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def expected_logits() -> np.ndarray:
    return np.arange(2000 * 10, dtype=np.float32).reshape(2000, 1, 10)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (as root, where mounting is permitted)."""
    mount = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_tmpfs_is_a_clear_error_and_the_cache_finishes_once_space_is_there(tiny_tmpfs):
    folder = tiny_tmpfs / "cache"
    failed = write_store(folder)
    assert failed.returncode == 1, f"the writer died with {failed.returncode} (SIGBUS is {-7}): {failed.stderr}"
    assert "CacheSpaceError: no space for teacher cache file" in failed.stderr
    assert f"{folder / 'logits.bin'}: it needs {LOGITS_BYTES:,} bytes" in failed.stderr
    # Nothing was written yet: the space taken by the files created so far is given back, and no layout claims them.
    assert not (folder / "layout.json").exists() and not (folder / "logits.bin").exists()
    assert not (folder / "views.bin").exists()

    subprocess.run(["mount", "-o", "remount,size=1m", "tmpfs", str(tiny_tmpfs)], check=True)
    finished = write_store(folder)
    assert finished.returncode == 0, finished.stderr
    cache = TeacherCache(folder)
    assert np.array_equal(cache._files.arrays["logits.bin"], expected_logits())


def failing_fallocate(code: int):
    def fallocate(fd, offset, length):
        raise OSError(code, os.strerror(code))
    return fallocate


def test_no_space_from_fallocate_is_a_cache_space_error_and_nothing_is_lost(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(os, "posix_fallocate", failing_fallocate(errno.ENOSPC), raising=False)
    writer = StoreWriter(folder, CacheSpec(**SPEC))
    with pytest.raises(CacheSpaceError, match=f"{folder / 'views.bin'}: it needs 6,000 bytes .* run the same "
                                              "command again") as raised:
        writer.create()
    assert isinstance(raised.value, CacheError) and isinstance(raised.value, OSError)
    assert raised.value.errno == errno.ENOSPC
    assert not (folder / "layout.json").exists() and not (folder / "views.bin").exists()
    monkeypatch.undo()

    assert write_store(folder).returncode == 0
    assert np.array_equal(TeacherCache(folder)._files.arrays["logits.bin"], expected_logits())


def test_resuming_reserves_the_space_a_sparse_store_lacks(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    writer = StoreWriter(folder, CacheSpec(**SPEC))
    writer.create()
    start, stop = writer.chunk_range(0)
    logits = expected_logits()
    writer.write(0, {"views.bin": np.zeros((stop - start, 1, 3), np.uint8), "logits.bin": logits[start:stop]})
    writer._files = None  # the memory maps are closed, as when the writing process ends
    # A store left by a writer that made sparse files: its first chunk written, the rest of logits.bin holes.
    path = folder / "logits.bin"
    written = path.read_bytes()[:stop * 40]
    with open(path, "wb") as f:
        f.write(written)
        f.truncate(LOGITS_BYTES)
    if os.stat(path).st_blocks * 512 >= LOGITS_BYTES:
        pytest.skip("this file system does not keep sparse files")

    for variant in ("fallocate", "writes"):
        if variant == "writes":  # no posix_fallocate (or a file system without it): each block written back
            with open(path, "wb") as f:
                f.write(written)
                f.truncate(LOGITS_BYTES)
            monkeypatch.setattr(os, "posix_fallocate", failing_fallocate(errno.EOPNOTSUPP), raising=False)
        StoreWriter(folder, CacheSpec(**SPEC)).create()
        assert os.stat(path).st_blocks * 512 >= LOGITS_BYTES, variant
        assert path.read_bytes()[:stop * 40] == written and path.stat().st_size == LOGITS_BYTES  # records kept
    monkeypatch.undo()
    assert write_store(folder).returncode == 0
    assert np.array_equal(TeacherCache(folder)._files.arrays["logits.bin"], logits)


def test_other_errors_of_the_file_system_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    monkeypatch.setattr(os, "posix_fallocate", failing_fallocate(errno.EIO), raising=False)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)) as raised:
        space.reserve(path, 10)
    assert not isinstance(raised.value, CacheSpaceError)
