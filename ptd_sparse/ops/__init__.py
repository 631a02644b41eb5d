"""The operators, one module per operator: each holds the operator's Python schemas (torch.library, namespace
ptd_sparse) with their fake kernels, their one autograd rule and their autocast rule, and ends with the operator's
route table, ROUTES: backend name -> the schema and function that run a call (ptd_sparse/ops/route.py). The public
functions (ptd_sparse/functional.py) dispatch every call through those tables.

- sparse_conv2d.py: ROUTES of the sparse convolution (native, Python custom op, and the triton_op torch.compile
  traces);
- kd_loss.py: ROUTES (dense teacher) and TOPK_ROUTES (top-k teacher) of the fused KD loss.
"""
from ptd_sparse.ops import kd_loss, sparse_conv2d  # noqa: F401  (importing registers the operators)
