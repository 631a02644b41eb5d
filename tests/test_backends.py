"""The backend choice (per call, PTD_BACKEND, automatic with the density crossover) and the extension's errors."""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest
import torch

import ptd_sparse
from ptd_sparse import _extension, backends
from ptd_sparse.backends import KD_LOSS, SPARSE_CONV, choose_backend

CPU = torch.device("cpu")
needs_extension = pytest.mark.skipif(_extension.extension_problem() is not None,
                                     reason=str(_extension.extension_problem()))


@needs_extension
def test_auto_uses_sparse_kernel_below_the_crossover_and_dense_above():
    crossover = backends.DENSE_CROSSOVER["cpu"]
    assert choose_backend(SPARSE_CONV, CPU, density=crossover / 2) == "cpu"
    assert choose_backend(SPARSE_CONV, CPU, density=min(1.0, crossover + 0.05)) == "dense"
    assert choose_backend(KD_LOSS, CPU) == "cpu"


def test_explicit_choice_wins_over_environment(monkeypatch):
    monkeypatch.setenv("PTD_BACKEND", "reference")
    assert choose_backend(KD_LOSS, CPU) == "reference"
    assert choose_backend(SPARSE_CONV, CPU, backend="reference", density=0.01) == "reference"
    monkeypatch.setenv("PTD_BACKEND", "auto")
    assert choose_backend(SPARSE_CONV, CPU, density=1.0) == "dense"


def test_dense_names_the_dense_route_of_the_convolution_only(monkeypatch, generator):
    monkeypatch.setenv("PTD_BACKEND", "dense")
    assert choose_backend(SPARSE_CONV, CPU, density=0.01) == "dense"
    assert choose_backend(KD_LOSS, CPU) != "dense"  # the KD loss has no dense route: its choice stays automatic
    with pytest.raises(RuntimeError, match="the dense route exists for sparse_conv2d only"):
        choose_backend(KD_LOSS, CPU, backend="dense")
    weight = torch.randn(4, 3, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) < 0.1
    layer = ptd_sparse.nn.SparseConv2d(ptd_sparse.SparseConvWeight.from_dense(weight, mask), padding=1)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, weight * mask, padding=1))
    assert layer.routes == {}  # an explicit dense route measures nothing


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        choose_backend(KD_LOSS, CPU, backend="fast")
    monkeypatch.setenv("PTD_BACKEND", "fast")
    with pytest.raises(ValueError, match="the environment variable PTD_BACKEND must be one of"):
        choose_backend(KD_LOSS, CPU)


def test_explicit_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="the cuda backend runs on CUDA tensors, the inputs are on cpu"):
        ptd_sparse.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_missing_extension_falls_back_once_in_the_log_and_explicit_cpu_raises(monkeypatch, caplog):
    sentence = "the C++ extension ptd_sparse._C is missing or does not load (test); build it with ..."
    monkeypatch.setattr(backends, "extension_problem", lambda: sentence)
    monkeypatch.setattr(backends, "_already_logged", set())
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    mask = torch.rand(w.shape) < 0.1
    with caplog.at_level(logging.WARNING, logger="ptd_sparse"):
        for _ in range(3):
            ptd_sparse.masked_conv2d(x, w, mask)
    skips = [r for r in caplog.records if "skips the cpu backend" in r.getMessage()]
    assert len(skips) == 1 and sentence in skips[0].getMessage()
    with pytest.raises(RuntimeError, match="requested backend 'cpu' cannot run: the C\\+\\+ extension"):
        ptd_sparse.masked_conv2d(x, w, mask, backend="cpu")


def test_missing_extension_message_is_one_sentence(tmp_path):
    """Run a fresh interpreter in which ptd_sparse._C cannot be imported."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ptd_sparse._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n")
    code = ("import ptd_sparse, ptd_sparse._extension as e; print(e.extension_problem()); "
            "import torch; ptd_sparse.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend='cpu')")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    first_line = result.stdout.strip().splitlines()[0]
    assert first_line.startswith("the C++ extension ptd_sparse._C is missing or does not load")
    assert "pip install --no-build-isolation -e ." in first_line
    assert "RuntimeError: kd_loss: the requested backend 'cpu' cannot run" in result.stderr


@needs_extension
def test_stale_extension_is_detected(monkeypatch):
    from ptd_sparse import _C

    monkeypatch.setattr(_C, "torch_version", lambda: "1.0.0")
    monkeypatch.setitem(sys.modules, "ptd_sparse._C", _C)
    problem, _ = _extension._load()
    assert problem.startswith("the C++ extension ptd_sparse._C is stale: it was built for torch 1.0.0")
    assert "rebuild it with `pip install --no-build-isolation -e .`" in problem


@pytest.mark.parametrize("built", [True, False], ids=["cuda_built", "triton_only"])
def test_automatic_convolution_on_cuda_devices_is_cudnn_at_every_density(monkeypatch, built):
    """The GPU's sparse kernels are not known to beat cuDNN at any density, so the automatic choice is the dense
    route; an explicit backend still runs them, the density-free choice (a measured route's sparse candidate) names
    them, and the KD loss keeps its GPU kernels. Decided from the device type alone, so checked without a GPU."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "has_compiled_cuda", lambda: built)
    monkeypatch.setattr(backends, "extension_problem", lambda: None)
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    sparse = "cuda" if built else "triton"
    for density in (0.0, 0.01, 0.05, 0.1, 0.3, 1.0):
        for batch in (None, 1, 64, 128):
            assert choose_backend(SPARSE_CONV, cuda, density=density, batch=batch) == "dense", (density, batch)
    assert choose_backend(SPARSE_CONV, cuda) == sparse
    assert choose_backend(SPARSE_CONV, cuda, backend=sparse, density=0.05, batch=64) == sparse
    assert choose_backend(SPARSE_CONV, cuda, backend="triton", density=0.05) == "triton"
    monkeypatch.setenv("PTD_BACKEND", sparse)
    assert choose_backend(SPARSE_CONV, cuda, density=0.05, batch=64) == sparse
    monkeypatch.delenv("PTD_BACKEND")
    assert choose_backend(KD_LOSS, cuda) == sparse
    assert backends.dense_crossover("cuda") is None and backends.dense_crossover("triton", 1) is None
