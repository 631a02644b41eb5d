"""Reading pickled data files (the CIFAR python batches) without running code from them.

`load_arrays` admits the objects a pickled batch is made of, and nothing else: dicts, lists, tuples, strings, bytes,
bytearrays, numbers, numpy arrays and scalars. A pickle names every other object it builds by (module, name), and
`find_class` answers only the names below, with the objects themselves (never by importing what the file names):

- numpy arrays and scalars as numpy 1.x (`numpy.core.*`) and 2.x (`numpy._core.*`) pickle them: `_reconstruct`
  (protocols 2-4), `_frombuffer` (protocol 5: the array's bytes as an in-band bytearray), `scalar`, and the
  `ndarray` and `dtype` types;
- `_codecs.encode`, by which a Python 3 pickler writes bytes at protocol 2 (`encode(text, "latin1")`), replaced by
  a function that only re-encodes text as latin-1;
- `bytes` and `bytearray` under their Python 3 and Python 2 (`__builtin__`) module names.

Out-of-band buffers (protocol 5 with a buffer_callback) cannot live in a file and are refused by pickle itself.
"""
from __future__ import annotations

import io
import pickle

import numpy as np


def _latin1_encode(text, encoding="latin1", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}) in a data file: "
                                     "only latin-1 text (bytes written at protocol 2) is allowed")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], object]:
    # The functions numpy's own pickles name, taken from numpy's reductions so that both numpy 1.x and 2.x work
    # without importing the deprecated numpy.core.
    array = np.zeros(1, dtype=np.uint8)
    reconstruct, frombuffer, scalar = array.__reduce__()[0], array.__reduce_ex__(5)[0], np.uint8(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):
        allowed[(module, "bytes")] = bytes
        allowed[(module, "bytearray")] = bytearray
    return allowed


ALLOWED = _allowed()


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, strings, bytes, numbers and numpy arrays: a CIFAR batch, never code."""

    def find_class(self, module, name):
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file (only arrays are "
                                         "allowed)")
        return found


def load_arrays(data: bytes):
    """The object pickled in `data` (protocols 0-5), with Python 2 strings read as bytes, as CIFAR's batches need."""
    return ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
