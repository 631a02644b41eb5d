"""The `reference` backend: plain PyTorch implementations of both operators, the oracle every backend is tested
against. It is never the automatic choice for the convolution: the dense route there is `dense` (F.conv2d on the
dense weight, see ptd_sparse.backends)."""
