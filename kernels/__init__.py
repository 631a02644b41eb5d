"""Triton kernels of ptd_sparse, installed as the subpackage ptd_sparse.kernels (never as a top-level `kernels`).

The `triton` backend's kernels land here, one file per operator; ptd_sparse.backends reports the backend as not
implemented until they do."""
