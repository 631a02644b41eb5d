"""Argument checks of the public API: each error names the argument and says what was expected."""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pair(value, name: str, minimum: int) -> list[int]:
    """An int or a pair of ints, each >= minimum, as a list of two ints."""
    # Fast path for what modules pass on every call (plain ints and tuples of them): the general checks below go
    # through the numbers ABCs, which cost microseconds per call.
    if type(value) is int and value >= minimum:
        return [value, value]
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and value[0] >= minimum and value[1] >= minimum:
        return [value[0], value[1]]
    items = None
    if isinstance(value, Integral):
        items = (value, value)
    elif isinstance(value, (tuple, list)):
        items = tuple(value)
    if items is None or len(items) != 2 or not all(isinstance(v, Integral) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return [int(v) for v in items]


def tensor(value, name: str, dims: tuple[int, ...] | None = None, floating: bool = False) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def same_device(reference: Tensor, reference_name: str, **others: Tensor | None) -> None:
    for name, other in others.items():
        if other is not None and other.device != reference.device:
            raise ValueError(f"{name} is on {other.device} but {reference_name} is on {reference.device}")


def same_dtype(reference: Tensor, reference_name: str, **others: Tensor | None) -> None:
    for name, other in others.items():
        if other is not None and other.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {other.dtype} but {reference_name} has dtype {reference.dtype}; "
                            "they must match")


def conv_input(input: Tensor, in_channels: int) -> tuple[Tensor, bool]:
    """The input as 4-D, and whether it was unbatched ([C, H, W]) like F.conv2d accepts."""
    tensor(input, "input", dims=(3, 4), floating=True)
    unbatched = input.dim() == 3
    batched = input.unsqueeze(0) if unbatched else input
    if batched.shape[1] != in_channels:
        raise ValueError(f"input has {batched.shape[1]} channels (shape {tuple(input.shape)}) but the weight expects "
                         f"{in_channels}")
    return batched, unbatched


def conv_bias(bias: Tensor | None, out_channels: int) -> None:
    if bias is None:
        return
    tensor(bias, "bias", dims=(1,), floating=True)
    if bias.shape[0] != out_channels:
        raise ValueError(f"bias must have C_out = {out_channels} entries, got shape {tuple(bias.shape)}")


def conv_output_fits(input_shape, weight_shape, stride, padding, dilation) -> None:
    for axis, name in ((2, "height"), (3, "width")):
        i = axis - 2
        span = dilation[i] * (weight_shape[axis] - 1) + 1
        if input_shape[axis] + 2 * padding[i] < span:
            raise ValueError(f"input {name} {input_shape[axis]} with padding {padding[i]} is smaller than the "
                             f"dilated kernel ({span}); the output would be empty")


def temperature(value) -> float:
    if type(value) is float and 0 < value < math.inf:  # the common case, without the numbers ABC (microseconds)
        return value
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def alpha(value) -> float:
    if type(value) is float and 0 <= value <= 1:  # the common case, without the numbers ABC
        return value
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {value!r}")
    return float(value)
