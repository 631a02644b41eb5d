"""Files written atomically: to a temporary name in the same folder, then renamed into place in one step, so an
interruption leaves the old file or the new one, never half of one. Used by checkpoints, run records and the
teacher-logit cache alike."""
from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call write(temporary_path), then move the result onto `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    # A writer killed mid-write (SIGKILL, power loss) runs no cleanup and leaves its temporary behind; the next
    # successful write of the same file removes those. Only one process writes a given path (rank 0, or the rank that
    # owns a chunk), so no live writer's temporary is among them.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_json(path: Path, value) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n"))
