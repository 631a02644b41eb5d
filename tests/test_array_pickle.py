"""The CIFAR loader reads valid pickles of every protocol a Python 3 writes, and still runs no code from a file."""
from __future__ import annotations

import os
import pickle
import subprocess

import numpy as np
import pytest

from ptd_sparse import data
from ptd_sparse.data.array_pickle import load_arrays
from ptd_sparse.data.datasets import load_cifar

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(seed: int, rows: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch %d" % seed,
            b"labels": [int(x) for x in rng.integers(0, 10, rows)],
            b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            b"filenames": [b"image_%d.png" % i for i in range(rows)]}


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_cifar_batches_of_every_protocol_load(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {name: cifar_batch(seed) for seed, name in enumerate(BATCHES)}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    train, test, classes = load_cifar(tmp_path, 10)
    images = np.concatenate([batches[name][b"data"] for name in BATCHES[:5]]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batches[name][b"labels"] for name in BATCHES[:5]])
    assert np.array_equal(train.images.numpy(), images) and np.array_equal(train.labels.numpy(), labels)
    assert np.array_equal(test.images.numpy(), batches["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    assert np.array_equal(test.labels.numpy(), batches["test_batch"][b"labels"]) and classes == 10
    assert len(data.load_dataset("cifar10", str(tmp_path), val_fraction=0.2).train) == 28


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                   np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
                                   np.array([b"ab", b"c"]), np.array(["text", "u"]), np.zeros((0, 5), np.uint8)],
                         ids=["float32", "fortran", "bytes", "unicode", "empty"])
def test_numpy_arrays_and_scalars_round_trip(protocol, array):
    batch = {b"data": array, b"scalar": np.float64(2.5), "nested": (1, [2.0, None, True], bytearray(b"xy"), b"")}
    loaded = load_arrays(pickle.dumps(batch, protocol=protocol))
    assert loaded[b"data"].dtype == array.dtype and np.array_equal(loaded[b"data"], array)
    assert loaded[b"scalar"] == 2.5 and type(loaded[b"scalar"]) is np.float64
    assert loaded["nested"] == batch["nested"]


def test_pickles_of_numpy_1_name_numpy_core():
    # numpy 1.x writes numpy.core.multiarray._reconstruct (protocol 2: GLOBAL opcodes, names as plain text lines).
    written = pickle.dumps({b"data": np.arange(5, dtype=np.uint8)}, protocol=2)
    numpy_1 = written.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert numpy_1 != written
    assert np.array_equal(load_arrays(numpy_1)[b"data"], np.arange(5))


def test_out_of_band_buffers_are_refused():
    buffers = []
    written = pickle.dumps(np.arange(4), protocol=5, buffer_callback=buffers.append)
    assert buffers  # the array's bytes are not in the pickle: a file cannot hold them
    with pytest.raises(pickle.UnpicklingError, match="out-of-band"):
        load_arrays(written)


class Reduces:
    """Pickles as a call of `function` with `arguments`, as a malicious file would."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


# Protocol 2 names the builtins `__builtin__` and subprocess `commands`, as Python 2 did: the function name is matched.
@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("payload, refused", [
    (Reduces(os.system, "true"), "system"),
    (Reduces(eval, "1 + 1"), "eval"),
    (Reduces(exec, "x = 1"), "exec"),
    (Reduces(getattr, 0, "real"), "getattr"),
    (Reduces(__import__, "os"), "__import__"),
    (Reduces(subprocess.call, ["true"]), "call"),
    (Reduces(np.load, "x.npy"), "numpy.load"),
    (Reduces(np.frombuffer, b"\x00"), "numpy.frombuffer"),
    (Reduces(bytes.fromhex, "00"), "getattr")  # a bound method pickles as getattr(bytes, name),
])
def test_code_in_a_pickle_is_refused(protocol, payload, refused):
    written = pickle.dumps({b"data": np.zeros(3), b"labels": [payload]}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load [\\w.]*\\b{refused} "):
        load_arrays(written)


def test_codecs_encode_only_reencodes_latin1_text():
    import codecs

    for payload in (Reduces(codecs.encode, "text", "rot13"), Reduces(codecs.encode, b"x", "zlib_codec"),
                    Reduces(codecs.encode, "text", "latin1", "ignore")):
        with pytest.raises(pickle.UnpicklingError, match="refusing _codecs.encode"):
            load_arrays(pickle.dumps([payload], protocol=2))


def test_refusal_through_the_cifar_loader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for seed, name in enumerate(BATCHES):
        (folder / name).write_bytes(pickle.dumps(cifar_batch(seed), protocol=5))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Reduces(os.system, "true"), b"labels": [0]}, 5))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        data.load_dataset("cifar10", str(tmp_path))
