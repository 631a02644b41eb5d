"""The `cpu` and `cuda` backends: thin callers of the extension's kernel operators (torch.ops.ptd_sparse_kernels).

Both backends share these callers; PyTorch's dispatcher sends each call to the C++ (csrc/cpu) or CUDA (csrc/cuda)
kernel by the device of the tensors."""
