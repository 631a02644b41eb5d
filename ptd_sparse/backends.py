"""Which backend runs an operator call.

Four backends compute the same functions (docs/design.md, section 3): `cpu` and `cuda` (the C++/CUDA extension,
ptd_sparse.native), `triton` (kernels/), and `reference` (plain PyTorch, the oracle the others are tested against).
The convolution has one more route, `dense`: F.conv2d on the dense weight (oneDNN on CPUs, cuDNN on GPUs), which is
faster than any sparse kernel for dense enough weights. Every backend answers `unsupported_reasons(...)`: an empty
list means it can run the call. The choice, in order of precedence:
  1. `backend=` given to the call, else 2. the environment variable PTD_BACKEND, else 3. automatic.
An explicit choice (1 or 2) that cannot run raises an error listing why; an explicit `dense` always takes the dense
route for the convolution (the KD loss has no dense route: `backend="dense"` is refused there, and PTD_BACKEND=dense
leaves its choice automatic). The automatic choice takes the first backend of the device's preference list that can
run and logs once why it skipped the others. For the sparse convolution it picks `dense` when the weight is denser
than the measured crossover of the preferred sparse backend (early pruning rounds, the first layer), and when no
sparse backend can run.

On CUDA devices the automatic choice for the convolution is `dense` (cuDNN) at every density: the sparse GPU kernels
(cuda, triton) do one global load per multiply-add on SIMT cores, read estimates put them at 0.3-0.6x of cuDNN with
PyTorch's default TF32 convolutions (0.2-0.4x of bf16) on VGG's 256@8x8 and 512@4x4 layers at batch 64 and 90-95%
sparsity, and no measurement on a GPU has shown them faster. They run when asked for (backend="cuda"/"triton" or
PTD_BACKEND), and where SparseConv2d's measured route (ptd_sparse.nn.measured_route) times them faster than cuDNN on
that GPU for that layer. The KD loss keeps its fused GPU kernels: they beat the eager composition.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from ptd_sparse._extension import extension_problem, has_compiled_cuda

# What runs each backend's call of an operator is that operator's route table (ROUTES in ptd_sparse/ops/).
BACKENDS = ("cpu", "cuda", "triton", "reference")
# The convolution's dense route: F.conv2d on the dense (masked) weight. Not a backend of the operators (it runs no
# kernel of this package), but a name the automatic choice returns and PTD_BACKEND / backend= accept.
DENSE = "dense"
SPARSE_CONV = "sparse_conv2d"
KD_LOSS = "kd_loss"

# Automatic preference per device type: the sparse backends, then the plain-PyTorch fallback (for the convolution
# that is the dense route, which computes the same function faster than the oracle).
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

# Density above which the dense masked path (oneDNN through F.conv2d) beats the sparse kernel of that backend,
# measured with bench/bench_sparse_conv2d.py on the CIFAR VGG layers (docs/benchmarks.md); 1.0 never goes dense.
# None: no density at which the sparse kernel is known to win, so the automatic choice takes the dense route at every
# density. That is the GPU backends' value (see the module docstring); bench/gpu_check prints their measured speed
# against cuDNN (PyTorch's default TF32 convolutions, and bf16), the measurement that would justify a number here.
DENSE_CROSSOVER: dict[str, float | None] = {"cpu": 0.30, "cuda": None, "triton": None}
# Below SMALL_BATCH images per call (batch-1 inference) the sparse kernels have less work to amortise their set-up,
# and the crossover is lower.
SMALL_BATCH = 8
SMALL_BATCH_CROSSOVER: dict[str, float | None] = {"cpu": 0.20, "cuda": None, "triton": None}


def dense_crossover(backend: str, batch: int | None = None) -> float | None:
    """Density above which the dense path is faster than `backend`'s sparse kernel for a batch of `batch` images;
    None where the dense path is taken at every density."""
    table = SMALL_BATCH_CROSSOVER if batch is not None and batch < SMALL_BATCH else DENSE_CROSSOVER
    return table[backend]


_logger = logging.getLogger("ptd_sparse")
_already_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _already_logged:
        _already_logged.add(message)
        _logger.warning(message)


def unsupported_reasons(backend: str, op: str, device: torch.device) -> list[str]:
    """Why `backend` cannot run `op` on `device`; empty when it can."""
    reasons = []
    if backend == DENSE and op != SPARSE_CONV:
        reasons.append(f"the dense route exists for {SPARSE_CONV} only, not for {op}")
    if backend == "cpu":
        if device.type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, the inputs are on {device}")
        problem = extension_problem()
        if problem:
            reasons.append(problem)
    elif backend == "cuda":
        if device.type != "cuda":
            reasons.append(f"the cuda backend runs on CUDA tensors, the inputs are on {device}")
        if not has_compiled_cuda():
            reasons.append(extension_problem() or "the C++ extension was built without its CUDA kernels")
    elif backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
        problem = _triton_problem()
        if problem:
            reasons.append(problem)
    return reasons


@functools.cache
def _triton_problem() -> str | None:
    """Why the Triton kernels cannot be imported here, or None. Looked up once: the installed packages do not change
    while a process runs."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("ptd_sparse.kernels") is None:
        return ("the Triton kernels (ptd_sparse.kernels) are not installed; from a source checkout, install it with "
                "`pip install --no-build-isolation -e .`")
    return None


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for explicitly (the call's `backend`, else PTD_BACKEND), or None for the automatic choice."""
    name = backend if backend is not None else os.environ.get("PTD_BACKEND")
    if name is None or name == "auto":
        return None
    if name not in BACKENDS + (DENSE,):
        source = "backend" if backend is not None else "the environment variable PTD_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS + (DENSE, 'auto')}, got {name!r}")
    return name


def choose_backend(op: str, device: torch.device, backend: str | None = None, density: float | None = None,
                   batch: int | None = None) -> str:
    """Name of the backend that runs `op` for inputs on `device` (and, for the convolution, weight `density` and
    the number of images `batch`). For the convolution with density=None the automatic choice is the device's
    preferred sparse backend whatever the crossover: the sparse route that a measurement times against dense."""
    name = requested_backend(backend)
    if name == DENSE and backend is None and op != SPARSE_CONV:
        name = None  # PTD_BACKEND=dense fixes the convolution's route; the KD loss keeps its automatic choice
    if name is not None:
        reasons = unsupported_reasons(name, op, device)
        if reasons:
            raise RuntimeError(f"{op}: the requested backend {name!r} cannot run: " + "; ".join(reasons))
        return name
    for candidate in AUTO_ORDER.get(device.type, ()):
        reasons = unsupported_reasons(candidate, op, device)
        if reasons:
            _log_once(f"ptd_sparse: {op} on {device.type} skips the {candidate} backend: " + "; ".join(reasons))
            continue
        if op == SPARSE_CONV and density is not None:
            crossover = dense_crossover(candidate, batch)
            if crossover is None or density > crossover:
                return DENSE
        return candidate
    return DENSE if op == SPARSE_CONV else "reference"
