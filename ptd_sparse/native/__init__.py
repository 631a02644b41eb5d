"""The Python side of the C++/CUDA extension ptd_sparse._C (csrc/): the `cpu` and `cuda` backends.

The extension registers its operators under torch.ops.ptd_sparse_kernels, one schema each, with a CPU kernel
(csrc/cpu) and a CUDA kernel (csrc/cuda) that PyTorch's dispatcher picks by the tensors' device, and the autograd and
autocast rules of its differentiable operators (csrc/autograd). This package holds their Python callers and their
fake kernels for torch.compile."""
