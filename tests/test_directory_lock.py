"""A directory is used by one process group at a time (ptd_sparse.directory_lock), tested with real processes: a
second one is refused with the holder's pid, host and start; a lock left by a SIGKILLed holder is taken over; a
recorded pid that is alive but holds no lock does not block; torchrun ranks other than 0 take nothing."""
from __future__ import annotations

import errno
import json
import os
import socket

from lock_holder_worker import hold_once, kill, start_holder

from ptd_sparse import directory_lock
from ptd_sparse.directory_lock import LOCK_NAME


def test_a_second_process_is_refused_until_the_holder_is_killed(tmp_path):
    directory = tmp_path / "run"
    holder = start_holder(directory)
    try:
        refused = hold_once(directory)
    finally:
        kill(holder)
    assert refused.returncode == 3 and refused.stdout == ""
    assert (f"{directory} is in use by process {holder.pid} on {socket.gethostname()} (lock test, since "
            in refused.stderr)
    # SIGKILL runs no cleanup: the file stays, naming a holder whose lock the kernel dropped.
    assert json.loads((directory / LOCK_NAME).read_text())["pid"] == holder.pid
    taken = hold_once(directory)
    assert taken.returncode == 0 and taken.stdout == "held\n", taken.stderr
    assert f"taking over the lock left by process {holder.pid} on {socket.gethostname()}" in taken.stderr
    assert not (directory / LOCK_NAME).exists()  # released normally: nothing is left in the directory


def test_a_recorded_pid_that_is_alive_does_not_hold_the_directory(tmp_path):
    """Only the flock holds: a record naming a running process (here this one, as a recycled pid would) without
    the lock is taken over."""
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "what": "stale", "since": "earlier"}))
    taken = hold_once(directory)
    assert taken.returncode == 0 and taken.stdout == "held\n", taken.stderr


def test_this_process_may_hold_a_directory_twice(tmp_path):
    directory = tmp_path / "run"
    with directory_lock.hold(directory, "outer"):
        with directory_lock.hold(directory / ".." / "run", "inner"):  # another spelling of the same directory
            pass
        record = json.loads((directory / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["what"] == "outer"  # still held after the inner release
        refused = hold_once(directory)
        assert refused.returncode == 3 and f"process {os.getpid()}" in refused.stderr
    assert not (directory / LOCK_NAME).exists()


def test_torchrun_ranks_other_than_0_share_their_groups_lock(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    holder = start_holder(directory)  # stands for rank 0 of the group
    try:
        monkeypatch.setenv("RANK", "1")
        with directory_lock.hold(directory, "rank 1"):
            assert json.loads((directory / LOCK_NAME).read_text())["pid"] == holder.pid
        monkeypatch.setenv("RANK", "0")
        refused = hold_once(directory)
        assert refused.returncode == 3 and f"process {holder.pid}" in refused.stderr
    finally:
        kill(holder)


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(directory_lock.fcntl, "flock", no_locks)
    with directory_lock.hold(tmp_path / "run", "test"):
        pass
    assert "cannot lock files (No locks available)" in caplog.text
    assert not (tmp_path / "run" / LOCK_NAME).exists()
