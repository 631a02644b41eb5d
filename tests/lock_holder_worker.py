"""Child process of tests/test_directory_lock.py: holds a directory with ptd_sparse.directory_lock.

    python lock_holder_worker.py hold DIRECTORY   # prints "held" once it holds DIRECTORY, then waits to be killed
    python lock_holder_worker.py once DIRECTORY   # holds DIRECTORY, prints "held", releases it and exits

Refused, it prints the DirectoryInUse message on stderr and exits with 3.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
from pathlib import Path

# Loaded from its file, not as ptd_sparse.directory_lock: the package's __init__ imports torch and the extension,
# seconds per process that the lock does not need.
_spec = importlib.util.spec_from_file_location(
    "directory_lock", Path(__file__).resolve().parents[1] / "ptd_sparse" / "directory_lock.py")
directory_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(directory_lock)


def main(mode: str, directory: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with directory_lock.hold(directory, "lock test"):
            print("held", flush=True)
            while mode == "hold":
                time.sleep(1)
    except directory_lock.DirectoryInUse as error:
        print(error, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
