"""Autocast rules of the Python operators (the native backends' operators carry theirs in C++, csrc/autograd/).

Registered on the AutocastCPU and AutocastCUDA dispatch keys, so torch.compile sees them as it sees F.conv2d's: the
convolution runs in the current autocast dtype, the KD loss in float32. As autocast does for its own operators,
only floating tensors of the autocast device are cast, and float64 never.
"""
from __future__ import annotations

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def register_autocast(qualname: str, cast_to: torch.dtype | None) -> None:
    """Autocast rule of the operator `qualname` ("namespace::name"): floating inputs cast to `cast_to`, or to the
    autocast dtype of the region when None (torch.library.register_autocast takes a fixed dtype only)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    library = torch.library.Library(namespace, "IMPL")
    for device_type in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, excluded=excluded):
            dtype = cast_to if cast_to is not None else torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*_cast(args, device_type, dtype))

        library.impl(name, kernel, key, with_keyset=True)
    _LIBRARIES.append(library)  # a Library's registrations last as long as the object


_LIBRARIES: list = []
