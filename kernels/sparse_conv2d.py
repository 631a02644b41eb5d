"""Triton kernels of the masked sparse 2-D convolution: forward, backward-data and backward-weight.

All three walk the canonical CSR pattern (ptd_sparse.pattern) and gather input pixels directly, so the work scales
with the number of nonzeros, never with the dense weight:
- forward: a program owns one output channel and a block of output pixels (over N*OH*OW) and adds
  `value * shifted input` for every nonzero of its row, BLOCK_K nonzeros at a time into a [BLOCK_K, BLOCK_P]
  accumulator that is reduced once at the end (no cross-thread reduction inside the loop); bias and ReLU are fused
  into the epilogue.
- backward-data: the same over the transposed pattern (t_ptr/t_rows/t_perm): a program owns one input channel and a
  block of input pixels, and gathers the output gradient at oh = (ih + pad - kh*dil) / stride where that divides;
  race-free, no atomics.
- backward-weight: a program owns BLOCK_Q nonzeros and a contiguous chunk of pixels and accumulates
  grad_output * shifted input; chunks (a split over pixels, for layers with few nonzeros) are summed on the host
  side in a fixed order, so the result is deterministic.
Load balance: programs take output channels (input channels for backward-data) in order of decreasing nonzeros, so
the longest rows start first. That order is derived once per pattern and cached (see `_derived`).
Accumulation is float32 for float16/bfloat16/float32 and float64 for float64.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._launch import INTERPRET, configs, launch_context, tuning_bucket
from ptd_sparse.conv_geometry import output_size

INT32_LIMIT = 2**31 - 1


# Candidates for Hopper; the first of each list is the default (PTD_TRITON_AUTOTUNE=0).
FORWARD_CONFIGS = configs(
    [dict(BLOCK_P=256, BLOCK_K=8, num_warps=4), dict(BLOCK_P=128, BLOCK_K=16, num_warps=4),
     dict(BLOCK_P=256, BLOCK_K=16, num_warps=8), dict(BLOCK_P=512, BLOCK_K=8, num_warps=8)],
    dict(BLOCK_P=1024, BLOCK_K=32))
BACKWARD_DATA_CONFIGS = FORWARD_CONFIGS
BACKWARD_WEIGHT_CONFIGS = configs(
    [dict(BLOCK_Q=16, BLOCK_P=128, num_warps=4), dict(BLOCK_Q=8, BLOCK_P=256, num_warps=4),
     dict(BLOCK_Q=32, BLOCK_P=128, num_warps=8)],
    dict(BLOCK_Q=32, BLOCK_P=1024))
# Pixels per split of the backward-weight reduction; fixed (not tuned) because it sizes the host-side buffer.
WEIGHT_SPLIT_PIXELS = 1 << 30 if INTERPRET else 8192


@triton.jit
def _inside(index, size):
    """0 <= index < size in one unsigned comparison (a negative index wraps to a large unsigned one): the gathers
    test this for every (nonzero, pixel) pair, so it is worth halving."""
    return index.to(tl.uint32) < size


@triton.autotune(configs=FORWARD_CONFIGS, key=["tune_bucket", "KH", "KW"])
@triton.jit(do_not_specialize=["tune_bucket"])
def _forward_kernel(
    x_ptr,  # [N, C_in, H, W] contiguous
    values_ptr,  # [nnz]
    row_ptr_ptr,  # int32 [C_out + 1]
    col_idx_ptr,  # int32 [nnz]
    row_order_ptr,  # int32 [C_out], output channels by decreasing nonzeros
    bias_ptr,  # [C_out] (unused without bias)
    out_ptr,  # [N, C_out, OH, OW] contiguous
    tune_bucket,  # size class of the call, the autotuner's key (unused by the kernel)
    n_pixels, nnz, C_in, H, W, C_out, OH, OW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # Output channels vary fastest: programs running together share one block of pixels, whose input stays in L2.
    row = tl.load(row_order_ptr + pid % C_out)
    p = (pid // C_out) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < n_pixels
    ohw = OH * OW
    n = p // ohw
    rem = p % ohw
    oh = rem // OW
    ow = rem % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    if INDEX_64:
        n = n.to(tl.int64)
    x_pix = n * (C_in * H * W) + ih0 * W + iw0
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < end
        col = tl.load(col_idx_ptr + k, mask=k_ok, other=0)
        w = tl.load(values_ptr + k, mask=k_ok, other=0).to(ACC)
        c = col // (KH * KW)
        tap = col % (KH * KW)
        dh = (tap // KW) * dil_h
        dw = (tap % KW) * dil_w
        ih = ih0[None, :] + dh[:, None]
        iw = iw0[None, :] + dw[:, None]
        ok = k_ok[:, None] & p_ok[None, :] & _inside(ih, H) & _inside(iw, W)
        xv = tl.load(x_ptr + (x_pix[None, :] + (c * (H * W) + dh * W + dw)[:, None]), mask=ok, other=0)
        acc += xv.to(ACC) * w[:, None]
    result = tl.sum(acc, axis=0)
    if HAS_BIAS:
        result += tl.load(bias_ptr + row).to(ACC)
    if RELU:
        result = tl.maximum(result, 0)
    out = n * (C_out * ohw) + row * ohw + rem
    tl.store(out_ptr + out, result.to(out_ptr.dtype.element_ty), mask=p_ok)


@triton.autotune(configs=BACKWARD_DATA_CONFIGS, key=["tune_bucket", "KH", "KW"])
@triton.jit(do_not_specialize=["tune_bucket"])
def _backward_data_kernel(
    grad_out_ptr,  # [N, C_out, OH, OW] contiguous
    values_ptr,  # [nnz], CSR order
    col_idx_ptr,  # int32 [nnz], CSR order
    t_ptr_ptr,  # int32 [C_in + 1]
    t_rows_ptr,  # int32 [nnz], output channel of each transposed entry
    t_perm_ptr,  # int32 [nnz], CSR position of each transposed entry
    channel_order_ptr,  # int32 [C_in], input channels by decreasing nonzeros
    grad_in_ptr,  # [N, C_in, H, W] contiguous
    tune_bucket,  # size class of the call, the autotuner's key (unused by the kernel)
    n_pixels, nnz, C_in, H, W, C_out, OH, OW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    channel = tl.load(channel_order_ptr + pid % C_in)
    p = (pid // C_in) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < n_pixels
    hw = H * W
    n = p // hw
    rem = p % hw
    ih = rem // W
    iw = rem % W
    if INDEX_64:
        n = n.to(tl.int64)
    ohw = OH * OW
    go_image = n * (C_out * ohw)
    start = tl.load(t_ptr_ptr + channel)
    end = tl.load(t_ptr_ptr + channel + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
    for e0 in range(start, end, BLOCK_K):
        e = e0 + tl.arange(0, BLOCK_K)
        e_ok = e < end
        out_channel = tl.load(t_rows_ptr + e, mask=e_ok, other=0)
        q = tl.load(t_perm_ptr + e, mask=e_ok, other=0)
        tap = tl.load(col_idx_ptr + q, mask=e_ok, other=0) % (KH * KW)
        w = tl.load(values_ptr + q, mask=e_ok, other=0).to(ACC)
        # Output pixel (oh, ow) reads input pixel (oh*stride - pad + kh*dil, ...): invert where it divides.
        th = ih[None, :] + pad_h - ((tap // KW) * dil_h)[:, None]
        tw = iw[None, :] + pad_w - ((tap % KW) * dil_w)[:, None]
        oh = th // stride_h
        ow = tw // stride_w
        ok = (e_ok[:, None] & p_ok[None, :] & _inside(th, OH * stride_h) & _inside(tw, OW * stride_w)
              & (oh * stride_h == th) & (ow * stride_w == tw))
        go = tl.load(grad_out_ptr + (go_image[None, :] + (out_channel * ohw)[:, None] + oh * OW + ow), mask=ok,
                     other=0)
        acc += go.to(ACC) * w[:, None]
    result = tl.sum(acc, axis=0)
    tl.store(grad_in_ptr + (n * (C_in * hw) + channel * hw + rem), result.to(grad_in_ptr.dtype.element_ty),
             mask=p_ok)


@triton.autotune(configs=BACKWARD_WEIGHT_CONFIGS, key=["tune_bucket", "KH", "KW"])
@triton.jit(do_not_specialize=["tune_bucket"])
def _backward_weight_kernel(
    grad_out_ptr,  # [N, C_out, OH, OW] contiguous
    x_ptr,  # [N, C_in, H, W] contiguous
    col_idx_ptr,  # int32 [nnz]
    nz_rows_ptr,  # int32 [nnz], output channel of each nonzero
    partial_ptr,  # ACC [n_splits, nnz]: the sum over one chunk of pixels per split
    tune_bucket,  # size class of the call, the autotuner's key (unused by the kernel)
    n_pixels, nnz, split_pixels, C_in, H, W, C_out, OH, OW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < nnz
    col = tl.load(col_idx_ptr + q, mask=q_ok, other=0)
    row = tl.load(nz_rows_ptr + q, mask=q_ok, other=0)
    tap = col % (KH * KW)
    dh = (tap // KW) * dil_h
    dw = (tap % KW) * dil_w
    ohw = OH * OW
    go_tap = row * ohw
    x_tap = (col // (KH * KW)) * (H * W) + dh * W + dw
    acc = tl.zeros([BLOCK_Q, BLOCK_P], dtype=ACC)
    lo = split * split_pixels
    hi = tl.minimum(lo + split_pixels, n_pixels)
    for p0 in range(lo, hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < hi
        n = p // ohw
        rem = p % ohw
        oh = rem // OW
        ow = rem % OW
        if INDEX_64:
            n = n.to(tl.int64)
        ih = (oh * stride_h - pad_h)[None, :] + dh[:, None]
        iw = (ow * stride_w - pad_w)[None, :] + dw[:, None]
        ok = q_ok[:, None] & p_ok[None, :]
        go = tl.load(grad_out_ptr + ((n * (C_out * ohw) + rem)[None, :] + go_tap[:, None]), mask=ok, other=0)
        ok = ok & _inside(ih, H) & _inside(iw, W)
        x_pix = n * (C_in * H * W) + (oh * stride_h - pad_h) * W + ow * stride_w - pad_w
        xv = tl.load(x_ptr + (x_pix[None, :] + x_tap[:, None]), mask=ok, other=0)
        acc += go.to(ACC) * xv.to(ACC)
    tl.store(partial_ptr + split * nnz + q, tl.sum(acc, axis=1), mask=q_ok)


# --- layouts derived once per pattern ------------------------------------------------------------------------------

# (id(source tensor), layout name) -> (weak reference to the source, its version, layout). An entry goes when its
# source tensor is freed; a pattern's index tensors are never modified, the version check is a safeguard.
_derived_cache: dict[tuple[int, str], tuple[weakref.ref, int, Tensor]] = {}


def _derived(source: Tensor, name: str, build) -> Tensor:
    """build(source), computed once per source tensor of a pattern and cached."""
    key = (id(source), name)
    entry = _derived_cache.get(key)
    if entry is not None and entry[0]() is source and entry[1] == source._version:
        return entry[2]
    layout = build(source)
    _derived_cache[key] = (weakref.ref(source, lambda _, key=key: _derived_cache.pop(key, None)), source._version,
                           layout)
    return layout


def _order_by_decreasing_length(pointers: Tensor) -> Tensor:
    """int32 [len(pointers) - 1]: the rows of a CSR pointer array, longest first (for load balance)."""
    return torch.argsort((pointers[1:] - pointers[:-1]).long(), descending=True, stable=True).to(torch.int32)


def _row_of_each_nonzero(row_ptr: Tensor, nnz: int) -> Tensor:
    """int32 [nnz]: the output channel of each nonzero, in CSR order. A search rather than repeat_interleave, whose
    output size depends on the data: this also runs on fake tensors, when torch.compile traces the triton_op."""
    positions = torch.arange(nnz, device=row_ptr.device, dtype=row_ptr.dtype)
    return torch.searchsorted(row_ptr[1:].contiguous(), positions, right=True).to(torch.int32)


# --- launch wrappers with the common backend signature --------------------------------------------------------------

# True while the torch.library.triton_op versions below run: their launches then go through wrap_triton, so that
# torch.compile can trace them; the custom-op path launches directly (wrap_triton's dispatch costs time in eager).
_IN_TRITON_OP = contextvars.ContextVar("ptd_sparse_in_triton_op", default=False)


def _launch(kernel):
    return wrap_triton(kernel) if _IN_TRITON_OP.get() else kernel


def _accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(input_shape, weight_shape, stride, padding, dilation):
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    oh = output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = output_size(w, kw, stride[1], padding[1], dilation[1])
    return n, c_in, h, w, c_out, kh, kw, oh, ow


def _needs_int64(*numels: int) -> bool:
    return max(numels) > INT32_LIMIT


def forward(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_shape: list[int],
            bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], relu: bool) -> Tensor:
    """input [N, C_in, H, W], values [nnz] -> [N, C_out, OH, OW] (input's dtype)."""
    n, c_in, h, w, c_out, kh, kw, oh, ow = _geometry(input.shape, weight_shape, stride, padding, dilation)
    out = input.new_empty((n, c_out, oh, ow))
    n_pixels = n * oh * ow
    if out.numel() == 0:
        return out
    x = input.contiguous()
    row_order = _derived(row_ptr, "row_order", _order_by_decreasing_length)
    values = values.contiguous()
    bias_arg = bias.contiguous() if bias is not None else values

    def grid(meta):
        return (c_out * triton.cdiv(n_pixels, meta["BLOCK_P"]),)

    with launch_context(x.device):
        _launch(_forward_kernel)[grid](
            x, values, row_ptr, col_idx, row_order, bias_arg, out,
            tuning_bucket(n_pixels, col_idx.numel() // max(c_out, 1), c_out), n_pixels, col_idx.numel(),
            c_in, h, w, c_out, oh, ow,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, HAS_BIAS=bias is not None, RELU=bool(relu), ACC=_accumulator(input.dtype),
            INDEX_64=_needs_int64(x.numel(), out.numel()))
    return out


def backward(grad_output: Tensor, input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_ptr: Tensor,
             t_rows: Tensor, t_perm: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
             dilation: list[int], output_mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input [N, C_in, H, W], grad_values [nnz], grad_bias [C_out]), None where output_mask is False."""
    geometry = _geometry(input.shape, weight_shape, stride, padding, dilation)
    conv_args = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    grad_output = grad_output.contiguous()
    grad_input = grad_values = grad_bias = None
    if output_mask[0]:
        if t_ptr.numel() != weight_shape[1] + 1:
            raise ValueError(f"the input gradient needs the pattern's transposed view: t_ptr must have C_in + 1 = "
                             f"{weight_shape[1] + 1} entries, got {t_ptr.numel()} (an inference-only call passes "
                             f"an empty view)")
        grad_input = _backward_data(grad_output, input, values, col_idx, t_ptr, t_rows, t_perm, geometry, conv_args)
    if output_mask[1]:
        grad_values = _backward_weight(grad_output, input, values, row_ptr, col_idx, geometry, conv_args)
    if output_mask[2]:
        grad_bias = grad_output.sum(dim=(0, 2, 3))
    return grad_input, grad_values, grad_bias


def _backward_data(grad_output, input, values, col_idx, t_ptr, t_rows, t_perm, geometry, conv_args) -> Tensor:
    n, c_in, h, w, c_out, kh, kw, oh, ow = geometry
    grad_input = input.new_empty((n, c_in, h, w))
    n_pixels = n * h * w
    nnz = col_idx.numel()
    if grad_input.numel() == 0:
        return grad_input
    if nnz == 0 or grad_output.numel() == 0:
        return grad_input.zero_()
    channel_order = _derived(t_ptr, "channel_order", _order_by_decreasing_length)

    def grid(meta):
        return (c_in * triton.cdiv(n_pixels, meta["BLOCK_P"]),)

    with launch_context(input.device):
        _launch(_backward_data_kernel)[grid](
            grad_output, values.contiguous(), col_idx, t_ptr, t_rows, t_perm, channel_order, grad_input,
            tuning_bucket(n_pixels, nnz // max(c_in, 1), c_in), n_pixels, nnz, c_in, h, w, c_out, oh, ow, *conv_args,
            KH=kh, KW=kw, ACC=_accumulator(input.dtype),
            INDEX_64=_needs_int64(grad_input.numel(), grad_output.numel()))
    return grad_input


def _backward_weight(grad_output, input, values, row_ptr, col_idx, geometry, conv_args) -> Tensor:
    n, c_in, h, w, c_out, kh, kw, oh, ow = geometry
    n_pixels = n * oh * ow
    nnz = col_idx.numel()
    if nnz == 0 or n_pixels == 0:
        return values.new_zeros(nnz)
    x = input.contiguous()
    nz_rows = _derived(col_idx, "nz_rows", lambda col_idx: _row_of_each_nonzero(row_ptr, col_idx.numel()))
    split_pixels = min(n_pixels, WEIGHT_SPLIT_PIXELS)
    n_splits = triton.cdiv(n_pixels, split_pixels)
    acc_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    partial = torch.empty((n_splits, nnz), dtype=acc_dtype, device=input.device)

    def grid(meta):
        return (triton.cdiv(nnz, meta["BLOCK_Q"]), n_splits)

    with launch_context(input.device):
        _launch(_backward_weight_kernel)[grid](
            grad_output, x, col_idx, nz_rows, partial, tuning_bucket(split_pixels, nnz), n_pixels, nnz, split_pixels,
            c_in, h, w, c_out, oh, ow,
            *conv_args, KH=kh, KW=kw, ACC=_accumulator(values.dtype),
            INDEX_64=_needs_int64(x.numel(), grad_output.numel()))
    # Splits are summed in a fixed order: the result does not depend on scheduling.
    return (partial[0] if n_splits == 1 else partial.sum(0)).to(values.dtype)


@contextlib.contextmanager
def traced_launches():
    """Launch the kernels through wrap_triton while inside, as the body of a torch.library.triton_op must, so that
    torch.compile traces into them (the triton_op versions of the operator are in ptd_sparse/ops/)."""
    token = _IN_TRITON_OP.set(True)
    try:
        yield
    finally:
        _IN_TRITON_OP.reset(token)
