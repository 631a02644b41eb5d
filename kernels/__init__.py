"""Triton kernels of ptd_sparse, installed as the subpackage ptd_sparse.kernels (never as a top-level `kernels`).

One file per operator: sparse_conv2d.py (forward, backward-data, backward-weight) and kd_loss.py (dense and top-k
teacher); _launch.py holds the shared launch settings (autotuning, interpreter detection). The `triton` rows of the
operators' route tables (ptd_sparse/ops/) import them on first use; setup.py maps this folder to the name."""
