"""Child process of tests/test_directory_lock.py and tests/test_run_directory.py: holds a directory with
ptd_sparse.directory_lock.

    python lock_holder_worker.py hold DIRECTORY   # prints "held" once it holds DIRECTORY, then waits to be killed
    python lock_holder_worker.py once DIRECTORY   # holds DIRECTORY, prints "held", releases it and exits

Refused, it prints the DirectoryInUse message on stderr and exits with 3. Imported by the tests, it gives them
start_holder, hold_once and kill.
"""
from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path


def load_directory_lock():
    """ptd_sparse/directory_lock.py loaded from its file, not imported as ptd_sparse.directory_lock: the package's
    __init__ imports torch and the extension, seconds per process that the lock does not need."""
    spec = importlib.util.spec_from_file_location(
        "directory_lock", Path(__file__).resolve().parents[1] / "ptd_sparse" / "directory_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(mode: str, directory: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory_lock = load_directory_lock()
    try:
        with directory_lock.hold(directory, "lock test"):
            print("held", flush=True)
            while mode == "hold":
                time.sleep(1)
    except directory_lock.DirectoryInUse as error:
        print(error, file=sys.stderr)
        return 3
    return 0


def start_holder(directory: Path) -> subprocess.Popen:
    """A process that holds `directory` until it is killed."""
    holder = subprocess.Popen([sys.executable, __file__, "hold", str(directory)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = holder.stdout.readline()  # "held" once it holds the directory, "" if it died
    if line.strip() != "held":
        holder.kill()
        raise AssertionError(f"the holder did not start: {holder.communicate()[1][-2000:]}")
    return holder


def hold_once(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, "once", str(directory)], capture_output=True, text=True,
                          timeout=300)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
