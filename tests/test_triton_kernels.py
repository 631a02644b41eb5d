"""The Triton backend's own paths, which the shared backend tests do not reach with their small shapes: several
pixel blocks per channel, rows of very different lengths (the load-balancing order), the backward-weight split over
pixels, 64-bit indexing, KD rows longer than one class block (online rescaling), top-k teachers longer than one
block of listed classes. On the CPU they run under TRITON_INTERPRET=1 (small shapes); the `gpu` tests run the
same comparisons at full size on a CUDA device and are skipped elsewhere."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, random_mask

import ptd_sparse
from ptd_sparse.backends import KD_LOSS, SPARSE_CONV, unsupported_reasons
from ptd_sparse.ops.kd_loss import kd_loss as kd_loss_op
from ptd_sparse.ops.kd_loss import kd_loss_topk as kd_loss_topk_op
from ptd_sparse.ops.sparse_conv2d import triton_sparse_conv2d
from ptd_sparse.pattern import ConvPattern
from ptd_sparse.reference import kd_loss as reference_kd

CPU_REASONS = unsupported_reasons("triton", SPARSE_CONV, torch.device("cpu"))
needs_triton_on_cpu = pytest.mark.skipif(bool(CPU_REASONS), reason="; ".join(CPU_REASONS))
HAS_CUDA = torch.cuda.is_available()
GPU_REASONS = (unsupported_reasons("triton", SPARSE_CONV, torch.device("cuda")) if HAS_CUDA
               else ["no CUDA device"])
needs_triton_on_gpu = pytest.mark.skipif(bool(GPU_REASONS), reason="; ".join(GPU_REASONS))


def kernel_module(name: str):
    """ptd_sparse.kernels.<name>: the Triton kernels, imported (they need triton) only by the tests that run them."""
    return importlib.import_module(f"ptd_sparse.kernels.{name}")


def conv_oracle(x, weight, mask, bias, stride, padding, dilation, grad_out):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    out = F.conv2d(x64, w64 * mask.double(), None if bias is None else bias.double(), stride, padding, dilation)
    grad_x, grad_w = torch.autograd.grad(out, (x64, w64), grad_out.double())
    return out, grad_x, grad_w


def check_conv(x, weight, mask, bias, stride, padding, dilation, generator, dtype=torch.float32):
    x = x.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
    bias = bias.to(dtype) if bias is not None else None
    out = ptd_sparse.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, backend="triton")
    grad_out = torch.randn(out.shape, generator=generator).to(device=x.device, dtype=dtype)
    want_out, want_grad_x, want_grad_w = conv_oracle(x, weight, mask, bias, stride, padding, dilation, grad_out)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out)
    assert_close(out, want_out, dtype, "output")
    assert_close(grad_x, want_grad_x, dtype, "grad_input")
    assert_close(grad_w, want_grad_w, dtype, "grad_weight")
    assert not grad_w[~mask].any()


def uneven_mask(shape, generator):
    """Rows (output channels) from empty to full, and input channels of very different lengths too."""
    c_out = shape[0]
    mask = torch.zeros(shape, dtype=torch.bool)
    for row in range(c_out):
        mask[row] = random_mask(shape[1:], row / (c_out - 1), generator)
    mask[:, 0] = False  # an input channel no output uses
    return mask


@needs_triton_on_cpu
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_conv_uneven_rows_and_several_pixel_blocks(stride, padding, dilation, generator):
    x = torch.randn(3, 5, 21, 19, generator=generator)  # 1197 pixels: more than one interpreter block of 1024
    weight = torch.randn(9, 5, 3, 3, generator=generator)
    check_conv(x, weight, uneven_mask(weight.shape, generator), torch.randn(9, generator=generator), stride, padding,
               dilation, generator)


@needs_triton_on_cpu
def test_conv_layouts_are_derived_once_per_pattern(generator):
    conv = kernel_module("sparse_conv2d")
    pattern = ConvPattern.from_mask(uneven_mask((7, 4, 3, 3), generator))
    order = conv._derived(pattern.row_ptr, "row_order", conv._order_by_decreasing_length)
    assert conv._derived(pattern.row_ptr, "row_order", conv._order_by_decreasing_length) is order
    lengths = (pattern.row_ptr[1:] - pattern.row_ptr[:-1])[order.long()]
    assert bool((lengths[:-1] >= lengths[1:]).all()) and sorted(order.tolist()) == list(range(7))
    rows = conv._row_of_each_nonzero(pattern.row_ptr, pattern.nnz)
    assert torch.equal(rows.long(), pattern.flat_index // (4 * 3 * 3))
    key = (id(pattern.row_ptr), "row_order")
    del pattern, order, lengths, rows
    assert key not in conv._derived_cache  # dropped with its pattern


@needs_triton_on_cpu
def test_conv_backward_weight_split_over_pixels(monkeypatch, generator):
    monkeypatch.setattr(kernel_module("sparse_conv2d"), "WEIGHT_SPLIT_PIXELS", 100)
    x = torch.randn(2, 4, 13, 11, generator=generator)  # 286 output pixels: 3 splits of at most 100
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    check_conv(x, weight, random_mask(weight.shape, 0.3, generator), None, 1, 1, 1, generator)


@needs_triton_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_conv_64_bit_indexing(monkeypatch, dtype, generator):
    """Tensors over 2**31 elements take 64-bit offsets; the limit is lowered here so small tensors take that path."""
    monkeypatch.setattr(kernel_module("sparse_conv2d"), "INT32_LIMIT", 10)
    x = torch.randn(2, 3, 9, 8, generator=generator)
    weight = torch.randn(5, 3, 3, 3, generator=generator)
    check_conv(x, weight, random_mask(weight.shape, 0.4, generator), torch.randn(5, generator=generator), 2, 1, 1,
               generator, dtype)


def kd_oracle(student, teacher, target, temperature, alpha, reduction):
    """The reference backend on float64 copies of the inputs (float64 accumulation)."""
    return reference_kd.kd_loss(student.double(), teacher.double(), target, temperature, alpha, reduction, -100, True)


def ascending_logits(rows, classes, generator, device="cpu"):
    """Logits that grow along the row, so the running maximum moves in every class block."""
    ramp = torch.linspace(-30, 30, classes)
    return (ramp + torch.randn(rows, classes, generator=generator) * 2).to(device)


@needs_triton_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("alpha,with_target", [(0.5, True), (1.0, False), (0.0, True)])
def test_kd_loss_rows_longer_than_one_block(dtype, alpha, with_target, generator):
    rows, classes = 5, 2500  # three interpreter blocks of 1024 classes
    s = ascending_logits(rows, classes, generator).to(dtype)
    t = ascending_logits(rows, classes, generator).to(dtype)
    t[1, :1100] = float("-inf")  # a teacher row whose first block holds nothing
    t[2, 1500:] = float("-inf")
    target = torch.randint(0, classes, (rows,), generator=generator) if with_target else None
    if with_target:
        target[3] = -100
    for reduction in (0, 2):
        loss, grad = kd_loss_op(s, t, target, 3.0, alpha, reduction, -100, True, "triton")
        want_loss, want_grad = kd_oracle(s, t, target, 3.0, alpha, reduction)
        assert_close(loss, want_loss, torch.float32, "loss")
        assert_close(grad, want_grad, dtype, "grad_student")


@needs_triton_on_cpu
@pytest.mark.parametrize("k", [3, 300])
def test_kd_loss_topk_rows_longer_than_one_block(k, generator):
    """k = 300 takes two blocks of listed classes; 2500 classes three blocks of the student row."""
    rows, classes = 4, 2500
    s = ascending_logits(rows, classes, generator)
    teacher = ptd_sparse.topk_teacher(ascending_logits(rows, classes, generator), k, 2.0)
    target = torch.randint(0, classes, (rows,), generator=generator)
    target[0] = teacher.indices[0, 0]  # a label among the listed classes
    loss, grad = kd_loss_topk_op(s, *teacher, target, 2.0, 0.7, 1, -100, True, "triton")
    want_loss, want_grad = reference_kd.kd_loss_topk(s.double(), *teacher, target, 2.0, 0.7, 1, -100, True)
    assert_close(loss, want_loss, torch.float32, "loss")
    assert_close(grad, want_grad, torch.float32, "grad_student")


@needs_triton_on_cpu
def test_kd_loss_errors_from_a_later_block(generator):
    s, t = logits_pair(3, 2100, generator)
    s[2, 2050] = float("nan")
    with pytest.raises(ValueError, match="student_logits row 2 holds NaN"):
        kd_loss_op(s, t, None, 2.0, 0.5, 2, -100, True, "triton")
    s[2, 2050] = 0.0
    t[1, :] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits row 1 holds NaN or \\+inf, or has no finite entry"):
        kd_loss_op(s, t, None, 2.0, 0.5, 2, -100, True, "triton")


def logits_pair(rows, classes, generator):
    return (torch.randn(rows, classes, generator=generator) * 3, torch.randn(rows, classes, generator=generator) * 3)


@needs_triton_on_cpu
def test_kernels_live_inside_the_package():
    kernel_module("kd_loss")
    assert "ptd_sparse.kernels.kd_loss" in sys.modules and "kernels" not in sys.modules


def test_automatic_choice_on_cuda_devices_takes_triton_for_the_loss_and_cudnn_for_convolutions():
    """Decided from the device type alone, so it is checked without a GPU."""
    cuda = torch.device("cuda")
    if unsupported_reasons("triton", SPARSE_CONV, cuda):
        pytest.skip("; ".join(unsupported_reasons("triton", SPARSE_CONV, cuda)))
    if not unsupported_reasons("cuda", SPARSE_CONV, cuda):
        pytest.skip("the cuda backend is built and comes first")
    assert ptd_sparse.backends.choose_backend(SPARSE_CONV, cuda, density=0.05, batch=128) == "dense"
    assert ptd_sparse.backends.choose_backend(SPARSE_CONV, cuda) == "triton"  # the measured route's sparse candidate
    assert ptd_sparse.backends.choose_backend(KD_LOSS, cuda) == "triton"


# --- full size on a GPU ----------------------------------------------------------------------------------------------

VGG_LAYERS = [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4), (512, 512, 2)]  # (c_in, c_out, size)


@needs_triton_on_gpu
@pytest.mark.parametrize("c_in,c_out,size", VGG_LAYERS)
@pytest.mark.parametrize("density", [0.05, 0.1])
def test_gpu_vgg_layers_at_batch_128(c_in, c_out, size, density, generator):
    torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(128, c_in, size, size, generator=generator).cuda()
    weight = torch.randn(c_out, c_in, 3, 3, generator=generator).cuda() / (c_in * 9 * density) ** 0.5
    mask = random_mask(weight.shape, density, generator).cuda()
    check_conv(x, weight, mask, torch.randn(c_out, generator=generator).cuda(), 1, 1, 1, generator)


@needs_triton_on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_conv_half_precision(dtype, generator):
    x = torch.randn(32, 64, 16, 16, generator=generator).cuda()
    weight = torch.randn(128, 64, 3, 3, generator=generator).cuda() / 10
    mask = random_mask(weight.shape, 0.1, generator).cuda()
    check_conv(x, weight, mask, None, 2, 1, 1, generator, dtype)


@needs_triton_on_gpu
@pytest.mark.parametrize("classes", [100, 32000, 128000])
def test_gpu_kd_loss_bf16(classes, generator):
    rows = 256
    s = (torch.randn(rows, classes, generator=generator) * 3).cuda().to(torch.bfloat16)
    t = (torch.randn(rows, classes, generator=generator) * 3).cuda().to(torch.bfloat16)
    target = torch.randint(0, classes, (rows,), generator=generator).cuda()
    loss, grad = kd_loss_op(s, t, target, 4.0, 0.9, 2, -100, True, "triton")
    want_loss, want_grad = kd_oracle(s, t, target, 4.0, 0.9, 2)
    assert_close(loss, want_loss, torch.float32, "loss")
    assert_close(grad, want_grad, torch.bfloat16, "grad_student")
    teacher = ptd_sparse.topk_teacher(t, 20, 4.0)
    loss, grad = kd_loss_topk_op(s, *teacher, target, 4.0, 0.9, 2, -100, True, "triton")
    want_loss, want_grad = reference_kd.kd_loss_topk(s.double(), *teacher, target, 4.0, 0.9, 2, -100, True)
    assert_close(loss, want_loss, torch.float32, "topk loss")
    assert_close(grad, want_grad, torch.bfloat16, "topk grad_student")


@needs_triton_on_gpu
def test_gpu_kd_loss_is_chosen_automatically_and_raises_on_nan(generator, monkeypatch):
    monkeypatch.setenv("PTD_DEBUG_CHECKS", "1")  # the ValueError; without it, a device-side assert
    s = torch.randn(8, 50, generator=generator).cuda()
    assert ptd_sparse.backends.choose_backend(KD_LOSS, s.device) in ("cuda", "triton")
    s[5, 7] = float("nan")
    with pytest.raises(ValueError, match="student_logits row 5"):
        ptd_sparse.kd_loss(s, torch.randn(8, 50).cuda(), backend="triton")


# --- the triton_op versions (torch.compile traces through them on CUDA) ----------------------------------------------

def triton_op_conv(x, values, pattern, bias, relu):
    return triton_sparse_conv2d(x, values, pattern.row_ptr, pattern.col_idx, pattern.t_ptr, pattern.t_rows,
                                pattern.t_perm, list(pattern.shape), bias, [2, 1], [1, 1], [1, 2], relu)


@needs_triton_on_cpu
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_triton_op_version_runs_eagerly_with_autograd(relu, generator):
    """Eager and autograd work under the interpreter; opcheck and torch.compile need a GPU (docs/design.md, 5)."""
    weight = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64)
    pattern = ConvPattern.from_mask(random_mask(weight.shape, 0.4, generator))
    values = pattern.gather(weight).requires_grad_()
    x = torch.randn(2, 4, 9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
    out = triton_op_conv(x, values, pattern, bias, relu)
    expected = F.conv2d(x, pattern.scatter(values), bias, [2, 1], [1, 1], [1, 2])
    expected = torch.relu(expected) if relu else expected
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, values, bias), grad_out)
    want = torch.autograd.grad(expected, (x, values, bias), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@needs_triton_on_gpu
def test_gpu_triton_op_opcheck_and_compile(generator):
    weight = torch.randn(16, 8, 3, 3, generator=generator).cuda()
    mask = random_mask(weight.shape, 0.2, generator).cuda()
    pattern = ConvPattern.from_mask(mask)
    values = pattern.gather(weight).requires_grad_()
    x = torch.randn(4, 8, 12, 12, generator=generator).cuda().requires_grad_()
    bias = torch.randn(16, generator=generator).cuda()
    torch.library.opcheck(triton_sparse_conv2d, (x, values, pattern.row_ptr, pattern.col_idx, pattern.t_ptr,
                                                 pattern.t_rows, pattern.t_perm, list(pattern.shape), bias,
                                                 [1, 1], [1, 1], [1, 1], False))

    def fn(x, weight):
        return torch.relu(ptd_sparse.masked_conv2d(x, weight, mask, bias, padding=1, backend="triton"))

    compiled = torch.compile(fn)
    weight = weight.requires_grad_()
    out = compiled(x, weight)
    expected = fn(x, weight)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    got = torch.autograd.grad(out.sum(), (x, weight))
    want = torch.autograd.grad(expected.sum(), (x, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-4)


# --- every kernel compiles for Hopper (sm_90), checked without a GPU -------------------------------------------------

def _hopper_compiler():
    """triton.compile for sm_90 with Triton's bundled ptxas, or the reason it is unavailable."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError as error:
        return None, f"triton is not installed ({error})"
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as error:
        return None, f"this triton has no NVIDIA backend ({error})"

    def compile_kernel(kernel, signature: dict, constexprs: dict, num_warps: int = 4):
        while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
            kernel = kernel.fn  # autotuner -> jit function; under the interpreter -> the Python function
        if not isinstance(kernel, JITFunction):
            kernel = JITFunction(kernel)
        full = {name: "constexpr" if name in constexprs else signature.get(name, "i32") for name in kernel.arg_names}
        positions = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
        source = ASTSource(fn=kernel, signature=full, constexprs=positions)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    return compile_kernel, None


HOPPER_COMPILE, NO_HOPPER_COMPILE = _hopper_compiler()


@pytest.mark.skipif(HOPPER_COMPILE is None, reason=str(NO_HOPPER_COMPILE))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_hopper(dtype):
    """The interpreter runs kernels as Python and cannot catch what only the compiler refuses; this compiles every
    kernel of the backend down to a cubin for sm_90 with a Hopper configuration (Triton bundles ptxas). Under
    TRITON_INTERPRET=1 the kernels are interpreted functions, so the test reruns itself in a process without it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        test_id = f"{__file__}::test_triton_kernels_compile_for_hopper[{dtype}]"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id], env=env,
                                cwd=os.path.dirname(__file__), capture_output=True, text=True)
        assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
        return
    import triton.language as tl

    conv, kd = kernel_module("sparse_conv2d"), kernel_module("kd_loss")
    tensor = "*" + dtype
    conv_common = dict(KH=3, KW=3, ACC=tl.float32, INDEX_64=False)
    cases = [
        (conv._forward_kernel, dict(x_ptr=tensor, values_ptr=tensor, row_ptr_ptr="*i32", col_idx_ptr="*i32",
                                    row_order_ptr="*i32", bias_ptr=tensor, out_ptr=tensor),
         dict(conv_common, HAS_BIAS=True, RELU=True, BLOCK_P=256, BLOCK_K=8), 4),
        (conv._backward_data_kernel, dict(grad_out_ptr=tensor, values_ptr=tensor, col_idx_ptr="*i32",
                                          t_ptr_ptr="*i32", t_rows_ptr="*i32", t_perm_ptr="*i32",
                                          channel_order_ptr="*i32", grad_in_ptr=tensor),
         dict(conv_common, BLOCK_P=256, BLOCK_K=8), 4),
        (conv._backward_weight_kernel, dict(grad_out_ptr=tensor, x_ptr=tensor, col_idx_ptr="*i32",
                                            nz_rows_ptr="*i32", partial_ptr="*fp32"),
         dict(conv_common, BLOCK_Q=16, BLOCK_P=128), 4),
    ]
    loss_flags = dict(HAS_TARGET=True, KL_TERM=True, CE_TERM=True, WRITE_GRAD=True, ACC=tl.float32)
    loss_common = dict(target_ptr="*i64", scale_ptr="*fp32", loss_ptr="*fp32", grad_ptr=tensor, flags_ptr="*i32",
                       inv_T="fp32", T="fp32", alpha="fp32")
    for block_r, block_c, warps in ((4, 128, 4), (1, 4096, 8)):
        cases.append((kd._kd_loss_kernel, dict(loss_common, s_ptr=tensor, t_ptr="*bf16"),
                      dict(loss_flags, BLOCK_R=block_r, BLOCK_C=block_c), warps))
        cases.append((kd._kd_loss_topk_kernel, dict(loss_common, s_ptr=tensor, index_ptr="*i32", l_ptr="*bf16",
                                                    rest_ptr="*fp32", inv_unlisted="fp32"),
                      dict(loss_flags, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_K=32), warps))
    for kernel, signature, constexprs, warps in cases:
        compiled = HOPPER_COMPILE(kernel, signature, constexprs, warps)
        assert compiled.asm["cubin"], f"{kernel}: no cubin"
