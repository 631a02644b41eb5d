"""The public functions: argument checks, the backend choice (ptd_sparse.backends), then the operator's route table
(ROUTES in ptd_sparse/ops/<operator>.py), which says what runs the call on the chosen backend."""
from __future__ import annotations

import weakref
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor

from ptd_sparse import _format_checks
from ptd_sparse import _validation as check
from ptd_sparse._kd_contract import reduction_code
from ptd_sparse import ops
from ptd_sparse.backends import DENSE, KD_LOSS, SPARSE_CONV, choose_backend, requested_backend
from ptd_sparse.fingerprint import content_key
from ptd_sparse.pattern import ConvPattern, SparseConvWeight, dense_weight
from ptd_sparse.topk_teacher import TopKTeacher
from ptd_sparse.topk_teacher import checked as topk_checked

DEFAULT_TEMPERATURE = 10.0  # the paper's setting (Park & No 2022, following their CIFAR experiments)
DEFAULT_ALPHA = 0.95  # the paper's weight of the distillation term

# Patterns of the masks seen by masked_conv2d, so a mask is compressed once, not on every call. Keyed by the mask
# tensor's identity and dropped when the mask is freed. An entry is rebuilt when the mask's contents change: on CPUs
# its key is a hash of the bytes (ptd_sparse.fingerprint; `.data` edits and NumPy writes move no version counter),
# elsewhere a copy of the mask is kept and compared.
_pattern_cache: dict[int, tuple[weakref.ref, tuple, Tensor | None, ConvPattern]] = {}


def _mask_key(mask: Tensor, groups: int) -> tuple:
    content = content_key(mask) if mask.device.type == "cpu" else None
    return mask.device, tuple(mask.shape), groups, content


def pattern_of(mask: Tensor, groups: int = 1) -> ConvPattern:
    """The cached ConvPattern of `mask` (of a convolution with `groups` groups), rebuilt whenever the mask's
    contents change."""
    key = id(mask)
    entry = _pattern_cache.get(key)
    mask_key = _mask_key(mask, groups)
    if entry is not None and entry[0]() is mask and entry[1] == mask_key and \
            (entry[2] is None or torch.equal(entry[2], mask)):
        return entry[3]
    with torch.inference_mode(False):
        pattern = ConvPattern.from_mask(mask.detach(), groups)
        snapshot = None if mask.device.type == "cpu" else mask.detach().clone()
    _pattern_cache[key] = (weakref.ref(mask, lambda _, key=key: _pattern_cache.pop(key, None)), mask_key, snapshot,
                           pattern)
    return pattern


def _same_dtype_unless_autocast(reference: Tensor, reference_name: str, **others) -> None:
    """Under torch.autocast the operators cast their floating inputs to one dtype themselves (as F.conv2d does), so
    an fp32 weight meeting a bf16 activation is expected there; anywhere else the dtypes must match."""
    if not torch.is_autocast_enabled(reference.device.type):
        check.same_dtype(reference, reference_name, **others)


def _conv_arguments(input, weight_shape, bias, stride, padding, dilation):
    batched, unbatched = check.conv_input(input, weight_shape[1])
    check.conv_bias(bias, weight_shape[0])
    stride, dilation = check.pair(stride, "stride", 1), check.pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        batched, padding = _string_padding(batched, padding, weight_shape, stride, dilation)
    else:
        padding = check.pair(padding, "padding", 0)
    check.conv_output_fits(batched.shape, weight_shape, stride, padding, dilation)
    return batched, unbatched, stride, padding, dilation


def _string_padding(batched: Tensor, padding: str, weight_shape, stride, dilation) -> tuple[Tensor, list[int]]:
    """(input, padding pair) of F.conv2d's padding='valid' (none) or 'same' (the output keeps the input's size;
    stride 1 only). As in PyTorch, an odd total padding (an even kernel) puts its extra row or column at the bottom
    or right: added to the input here, so the kernels see a symmetric padding."""
    if padding == "valid":
        return batched, [0, 0]
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    if stride != [1, 1]:
        raise ValueError(f"padding='same' is not supported for strided convolutions (as in F.conv2d); got stride "
                         f"{tuple(stride)}")
    totals = [d * (k - 1) for d, k in zip(dilation, weight_shape[2:])]
    if totals[0] % 2 or totals[1] % 2:
        batched = F.pad(batched, (0, totals[1] % 2, 0, totals[0] % 2))
    return batched, [totals[0] // 2, totals[1] // 2]


def masked_conv2d(input: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1, backend: str | None = None) -> Tensor:
    """F.conv2d(input, weight * mask, bias, stride, padding, dilation, groups) with sparse kernels.

    input [N, C_in, H, W] (or [C_in, H, W]), weight and mask [C_out, C_in / groups, KH, KW] (mask bool or 0/1),
    bias [C_out]. Returns [N, C_out, OH, OW]. padding: an int, a pair, "valid" or "same" (stride 1), as for F.conv2d
    (sparse_conv2d too). The gradient of weight is zero wherever mask is zero. The mask is
    compressed once and cached until it changes. Grouped and depthwise convolutions (groups > 1) run the same sparse
    kernels (ptd_sparse.pattern: the format indexes the full input-channel space). backend: None (automatic;
    PTD_BACKEND overrides), "cpu", "cuda", "triton", "reference" (the plain-PyTorch oracle) or "dense" (the dense
    route: F.conv2d on weight * mask).
    """
    check.tensor(weight, "weight", dims=(4,), floating=True)
    check.tensor(mask, "mask", dims=(4,))
    if mask.shape != weight.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has shape {tuple(weight.shape)}; "
                         "they must match")
    groups = _format_checks.check_groups(groups, weight.shape[0])
    check.same_device(weight, "weight", input=input, mask=mask, bias=bias)
    _same_dtype_unless_autocast(weight, "weight", input=input, bias=bias)
    full_shape = (weight.shape[0], weight.shape[1] * groups, weight.shape[2], weight.shape[3])
    batched, unbatched, stride, padding, dilation = _conv_arguments(input, full_shape, bias, stride, padding,
                                                                    dilation)
    if torch.compiler.is_compiling():
        # A compiled graph cannot key a cached pattern on the mask's values (nor build one: its size depends on them),
        # so it takes the dense masked path, which traces into the graph; sparse kernels under torch.compile come
        # with SparseConv2d (sparsify), whose pattern lives in buffers.
        pattern, chosen = None, DENSE
    elif batched.device.type != "cpu" and requested_backend(backend) is None:
        # On GPUs the automatic choice is cuDNN (docs/design.md, round 3): no pattern is needed, so none is built
        # or checked (which would synchronise with the device on every call).
        pattern, chosen = None, DENSE
    else:
        pattern = pattern_of(mask, groups)
        chosen = choose_backend(SPARSE_CONV, batched.device, backend, pattern.density, batched.shape[0])
    if chosen == DENSE:
        out = F.conv2d(batched, weight * mask.to(weight.dtype), bias, stride, padding, dilation, groups)
    else:
        out = _run_sparse_conv(batched, pattern_indices(pattern), list(pattern.shape), pattern.gather(weight), bias,
                               stride, padding, dilation, chosen, groups=groups)
    return out.squeeze(0) if unbatched else out


def sparse_conv2d(input: Tensor, sparse_weight: SparseConvWeight, bias: Tensor | None = None, stride=1, padding=0,
                  dilation=1, backend: str | None = None, relu: bool = False) -> Tensor:
    """Convolution with a weight in the canonical CSR format; gradients flow to input, sparse_weight.values and bias.

    input [N, C_in, H, W] (or [C_in, H, W]) -> [N, C_out, OH, OW]. backend as for masked_conv2d. relu=True fuses
    max(0, .) into the kernel's epilogue (used by sparsify for Conv-BN-ReLU inference). A grouped sparse_weight
    (sparse_weight.groups > 1) computes the grouped convolution.
    """
    if not isinstance(sparse_weight, SparseConvWeight):
        raise TypeError(f"sparse_weight must be a ptd_sparse.SparseConvWeight, got {type(sparse_weight).__name__}")
    pattern = sparse_weight.pattern
    return sparse_conv2d_indexed(input, sparse_weight.values, pattern_indices(pattern), pattern.shape,
                                 sparse_weight.density, bias, stride, padding, dilation, backend, relu,
                                 groups=pattern.groups)


def pattern_indices(pattern) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(row_ptr, col_idx, t_ptr, t_rows, t_perm) of a ConvPattern (SparseConv2d builds its own: it holds no transposed
    view while no gradient is wanted)."""
    return pattern.row_ptr, pattern.col_idx, pattern.t_ptr, pattern.t_rows, pattern.t_perm


def sparse_conv2d_indexed(input: Tensor, values: Tensor, indices: tuple, weight_shape, density: float,
                          bias: Tensor | None = None, stride=1, padding=0, dilation=1, backend: str | None = None,
                          relu: bool = False, groups: int = 1) -> Tensor:
    """sparse_conv2d on a pattern's index tensors `indices` = (row_ptr, col_idx, t_ptr, t_rows, t_perm), already
    validated (SparseConvWeight and SparseConv2d validate them once, when built or loaded). Builds no Python objects,
    so SparseConv2d's calls stay lean and trace into torch.compile graphs. weight_shape is the full (block-diagonal)
    [C_out, C_in, KH, KW]; groups is needed only by the dense route, which runs F.conv2d on the grouped weight."""
    check.same_device(values, "sparse_weight.values", input=input, bias=bias)
    _same_dtype_unless_autocast(values, "sparse_weight.values", input=input, bias=bias)
    batched, unbatched, stride, padding, dilation = _conv_arguments(input, weight_shape, bias, stride, padding,
                                                                    dilation)
    chosen = choose_backend(SPARSE_CONV, batched.device, backend, density, batched.shape[0])
    out = _run_sparse_conv(batched, indices, list(weight_shape), values, bias, stride, padding, dilation, chosen,
                           bool(relu), groups)
    return out.squeeze(0) if unbatched else out


def _run_sparse_conv(input: Tensor, indices: tuple, weight_shape: list, values: Tensor, bias, stride, padding,
                     dilation, backend: str, relu: bool = False, groups: int = 1) -> Tensor:
    if backend == DENSE:
        # The dense route, no operator's backend: the nonzeros scattered into the dense (grouped) weight
        # (differentiable, so values get their gradient), then PyTorch's own convolution.
        weight = dense_weight(values, indices[0], indices[1], weight_shape, groups)
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return F.relu(out) if relu else out
    run = ops.sparse_conv2d.ROUTES[backend].entry(input.device.type)
    return run(input, values, *indices, weight_shape, bias, stride, padding, dilation, relu)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | TopKTeacher, target: Tensor | None = None, *,
            temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA, reduction: str = "batchmean",
            ignore_index: int = -100, backend: str | None = None) -> Tensor:
    """alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, target), fused.

    student_logits [N, C] (float16, bfloat16, float32 or float64), teacher_logits [N, C] (any of those; a gradient
    never flows to it) or a ptd_sparse.TopKTeacher (the teacher's k most likely classes and the probability mass
    outside them at this temperature; see ptd_sparse.topk_teacher for the exact contract), target [N] integer class
    indices or None.
    - Rows whose target equals ignore_index contribute nothing to either term.
    - target=None means no hard labels: the loss is the distillation term alpha * T^2 * KL alone, with the same weight
      it has in the full loss, so adding or removing labels never rescales the distillation gradient; every row
      counts. alpha=0 with target=None is refused, as that loss is identically zero.
    - reduction: "batchmean" (the sum over rows divided by the number of rows not ignored; 0 when every row is
      ignored), "sum", or "none" (one loss per row, 0 for ignored rows).
    - Teacher entries of -inf mean the teacher rules that class out (probability 0). NaN or +inf anywhere, or a row
      with no finite entry, is an error, and so are a target outside [0, C) that is not ignore_index and a top-k
      teacher whose row lists a class twice or out of range. On CPU tensors each raises a ValueError naming the row.
      On CUDA tensors (cuda and triton backends) the call does not synchronise with the GPU: bad input ends in a
      device-side assert (the kernel prints the same sentence; the host sees "device-side assert triggered" at its
      next synchronisation, and the CUDA context is unusable afterwards). PTD_DEBUG_CHECKS=1 gives the ValueError on
      every device, at the cost of one synchronisation per call (ptd_sparse.debug_checks).
    Returns a float32 loss (float64 for float64 students): a scalar, or [N] for reduction="none".
    Defaults are the paper's: temperature 10, alpha 0.95.
    """
    check.tensor(student_logits, "student_logits", dims=(2,), floating=True)
    if student_logits.shape[1] == 0:
        raise ValueError("student_logits has 0 classes; expected at least 1")
    topk = None
    if isinstance(teacher_logits, TopKTeacher):
        topk = topk_checked(teacher_logits, student_logits)
    else:
        check.tensor(teacher_logits, "teacher_logits", dims=(2,), floating=True)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has shape "
                             f"{tuple(student_logits.shape)}; they must match")
        check.same_device(student_logits, "student_logits", teacher_logits=teacher_logits)
    check.same_device(student_logits, "student_logits", target=target)
    if target is not None:
        check.tensor(target, "target", dims=(1,))
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        if target.shape[0] != student_logits.shape[0]:
            raise ValueError(f"target has {target.shape[0]} labels but student_logits has "
                             f"{student_logits.shape[0]} rows")
    temperature = check.temperature(temperature)
    alpha = check.alpha(alpha)
    if target is None and alpha == 0:
        raise ValueError("alpha=0 with target=None leaves no loss term; give target or an alpha > 0")
    reduction_id = reduction_code(reduction)
    if type(ignore_index) is not int and (isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")

    device = student_logits.device
    chosen = choose_backend(KD_LOSS, device, backend)
    options = (target, temperature, alpha, reduction_id, int(ignore_index))
    if topk is not None:
        return ops.kd_loss.TOPK_ROUTES[chosen].entry(device.type)(student_logits, *topk, *options)
    return ops.kd_loss.ROUTES[chosen].entry(device.type)(student_logits, teacher_logits.detach(), *options)
