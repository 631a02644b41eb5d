"""Checks of input values that would cost a device-to-host synchronisation on a GPU.

On CPU tensors reading a value is free, so every check runs and raises an ordinary exception naming the offending
row. On CUDA tensors the KD loss's hot path must not wait for the GPU once per call, so by default its value checks
(NaN or +inf logits, labels out of range, top-k indices out of range or repeated, a bad rest mass) are device-side
asserts: the first synchronisation after the bad call raises "device-side assert triggered" (the kernel prints the
same sentence as the CPU error), and the CUDA context is unusable afterwards, as after F.cross_entropy's own label
assert. PTD_DEBUG_CHECKS=1 runs the synchronous checks on every device instead, with their exceptions; it is read on
every call, so it can be switched on for one part of a program.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

ENVIRONMENT_VARIABLE = "PTD_DEBUG_CHECKS"


def enabled() -> bool:
    """True when PTD_DEBUG_CHECKS=1: value checks synchronise and raise exceptions on every device."""
    return os.environ.get(ENVIRONMENT_VARIABLE) == "1"


def synchronous(tensor: Tensor) -> bool:
    """Whether value checks of `tensor` read it on the host (and raise exceptions): always on the CPU, on other
    devices only under PTD_DEBUG_CHECKS=1."""
    return tensor.device.type == "cpu" or enabled()


def assert_none(bad: Tensor, message: str) -> None:
    """Device-side assert that the bool tensor `bad` holds no True entry; no synchronisation. `message` says what
    was wrong (torch prints it where the device supports assert messages)."""
    torch._assert_async(~bad.any(), f"{message} (PTD_DEBUG_CHECKS=1 raises this as a ValueError naming the row)")
