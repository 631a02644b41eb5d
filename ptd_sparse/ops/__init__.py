"""The operator contracts: each public operator registered once with torch.library (namespace ptd_sparse), with
its backward as an operator of its own, a fake kernel for torch.compile, and autograd registered here in Python.
Each operator routes a call to the backend named by its `backend` argument."""
from ptd_sparse.ops import kd_loss, sparse_conv2d, triton_sparse_conv2d  # noqa: F401  (importing registers them)
