"""The `triton` backend's entry points, importing the Triton kernels (ptd_sparse.kernels) on first use.

Importing ptd_sparse must work without triton (CPU-only torch builds do not ship it) and stay fast, so the operator
tables hold these thin functions and the kernels are imported when a call first reaches them. Installed, the kernels
are the subpackage ptd_sparse.kernels (setup.py maps the source folder kernels/ there); run from a source checkout
(PYTHONPATH pointing at it), that folder is loaded under the same name. The triton_op versions that torch.compile
traces are registered by ptd_sparse/ops/triton_sparse_conv2d.py, which needs no triton to register them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from torch import Tensor

PACKAGE = "ptd_sparse.kernels"


def _load_package() -> None:
    if PACKAGE in sys.modules:
        return
    try:
        importlib.import_module(PACKAGE)
        return
    except ModuleNotFoundError as error:
        if error.name != PACKAGE:
            raise
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__init__.py")
    if not os.path.exists(source):
        raise ModuleNotFoundError(f"the Triton kernels ({PACKAGE}) are not installed and no source folder "
                                  f"{os.path.dirname(source)} was found", name=PACKAGE)
    spec = importlib.util.spec_from_file_location(PACKAGE, source,
                                                  submodule_search_locations=[os.path.dirname(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


def kernel_module(name: str):
    """The module ptd_sparse.kernels.<name> (e.g. "sparse_conv2d", "kd_loss")."""
    _load_package()
    return importlib.import_module(f"{PACKAGE}.{name}")


class _SparseConv2d:
    """forward/backward of the common sparse_conv2d backend signature (see ptd_sparse.reference.sparse_conv2d)."""

    @staticmethod
    def forward(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int],
                bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                relu: bool) -> Tensor:
        return kernel_module("sparse_conv2d").forward(input, values, row_ptr, col_idx, weight_shape, bias, stride,
                                                      padding, dilation, relu)

    @staticmethod
    def backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                 t_ptr: Tensor, t_rows: Tensor, t_perm: Tensor, weight_shape: list[int], stride: list[int],
                 padding: list[int], dilation: list[int], output_mask: list[bool]):
        return kernel_module("sparse_conv2d").backward(grad_output, input, values, row_ptr, col_idx, t_ptr, t_rows,
                                                       t_perm, weight_shape, stride, padding, dilation, output_mask)


sparse_conv2d = _SparseConv2d()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, temperature: float, alpha: float,
            reduction: int, ignore_index: int, compute_grad: bool) -> tuple[Tensor, Tensor]:
    return kernel_module("kd_loss").kd_loss(student_logits, teacher_logits, target, temperature, alpha, reduction,
                                            ignore_index, compute_grad)


def kd_loss_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor, teacher_rest_mass: Tensor,
                 target: Tensor | None, temperature: float, alpha: float, reduction: int, ignore_index: int,
                 compute_grad: bool) -> tuple[Tensor, Tensor]:
    return kernel_module("kd_loss").kd_loss_topk(student_logits, teacher_indices, teacher_logits, teacher_rest_mass,
                                                 target, temperature, alpha, reduction, ignore_index, compute_grad)
