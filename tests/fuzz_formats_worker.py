"""Fuzzing the sparse format's boundaries on one backend (run by tests/test_fuzz_formats.py, one process per backend,
so that a crash is reported as that backend's failure instead of killing pytest).

    python fuzz_formats_worker.py BACKEND CASES SEED

Every case starts from a valid random pattern, corrupts it in one way (truncation, decreasing row_ptr, indices out of
range, wrong dtypes, NaN values, mismatched shapes, ...) and feeds it to every entry point that can receive it:
ConvPattern / SparseConvWeight construction, SparseConv2d and MaskedConv2d state-dict loads, the registered operator
ptd_sparse::sparse_conv2d on this backend, and for the cpu backend the raw kernels
torch.ops.ptd_sparse_kernels.conv_forward / conv_backward_input / conv_backward_values. Each call must raise
ValueError, TypeError or RuntimeError with a message; one that returns is a failure. After a refused state-dict load
the layer must be unchanged and still run on the backend. Prints one JSON line: the counts.
"""
from __future__ import annotations

import copy
import json
import random
import sys

import torch
from torch import nn

from ptd_sparse import ops
from ptd_sparse.nn import MaskedConv2d, SparseConv2d
from ptd_sparse.pattern import ConvPattern, SparseConvWeight

INDEX = ConvPattern.index_names()
CLEAR_ERRORS = (ValueError, TypeError, RuntimeError)


class Silent(Exception):
    """A corrupted input was accepted."""


def expect_refusal(what: str, call) -> None:
    try:
        call()
    except CLEAR_ERRORS as error:
        if not str(error).strip():
            raise Silent(f"{what}: {type(error).__name__} without a message") from error
        return
    raise Silent(f"{what}: accepted")


# --- valid starting points --------------------------------------------------------------------------------------

def random_case(rng: random.Random):
    """(shape, pattern, values, input, geometry) with nnz >= 2 and a row of >= 2 entries."""
    while True:
        shape = (rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 3))
        generator = torch.Generator().manual_seed(rng.getrandbits(32))
        mask = torch.rand(shape, generator=generator) < rng.uniform(0.2, 0.9)
        pattern = ConvPattern.from_mask(mask)
        if pattern.nnz >= 2 and int((pattern.row_ptr[1:] - pattern.row_ptr[:-1]).max()) >= 2:
            break
    values = torch.randn(pattern.nnz, generator=generator)
    padding = [rng.randint(0, 1), rng.randint(0, 1)]
    geometry = ([rng.randint(1, 2), rng.randint(1, 2)], padding, [1, 1])
    x = torch.randn(rng.randint(1, 2), shape[1], rng.randint(3, 5), rng.randint(3, 5), generator=generator)
    return shape, pattern, values, x, geometry


def fields(pattern: ConvPattern) -> dict:
    return {name: getattr(pattern, name).clone() for name in INDEX}


def rows_of(pattern: ConvPattern) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(pattern.shape[0]), (pattern.row_ptr[1:] - pattern.row_ptr[:-1]).long())


# --- corruptions: each returns (tensors, values, shape, kinds) or None when it does not apply -----------------------
# `kinds` says which entry points can see the corruption: "python" (construction and state-dict loads), "op" (the
# O(1) checks of ptd_sparse::sparse_conv2d: dtypes and sizes only), "forward"/"values"/"input" (the raw C++ kernels
# that receive the corrupted tensor and can detect it: content checks run there, but backward-input has no row_ptr).

PY = {"python"}
SIZES = {"python", "op"}
ROW_PTR = {"forward", "values"}
COLUMNS = {"forward", "values", "input"}


def truncate(rng, pattern, values, shape):
    f = fields(pattern)
    name = rng.choice(INDEX + ("values",))
    cut = rng.randint(1, 2)
    if name == "values":
        return f, values[:-cut], shape, SIZES | {"forward", "input"}
    f[name] = f[name][:-cut]
    seen_by = {"row_ptr": ROW_PTR, "col_idx": COLUMNS, "t_ptr": {"input"}, "t_rows": {"input"}, "t_perm": {"input"},
               "flat_index": set()}[name]
    return f, values, shape, SIZES | seen_by if name != "flat_index" else PY


def extend(rng, pattern, values, shape):
    f = fields(pattern)
    name = rng.choice(("row_ptr", "t_ptr", "t_rows", "t_perm"))
    f[name] = torch.cat([f[name], f[name][-1:]])
    return f, values, shape, SIZES | ({"forward", "values"} if name == "row_ptr" else {"input"})


def decreasing_pointers(rng, pattern, values, shape):
    f = fields(pattern)
    name = rng.choice(("row_ptr", "t_ptr"))
    p = f[name]
    i = rng.randint(1, p.numel() - 1)
    p[i] = int(p[i - 1]) - rng.randint(1, 5)
    return f, values, shape, PY | (ROW_PTR if name == "row_ptr" else {"input"})


def pointers_off_the_ends(rng, pattern, values, shape):
    f = fields(pattern)
    name = rng.choice(("row_ptr", "t_ptr"))
    if rng.random() < 0.5:
        f[name][0] = rng.choice((-3, 1, 10**6))
    else:
        f[name][-1] = int(f[name][-1]) + rng.choice((-1, 1, 10**6))
    return f, values, shape, PY | (ROW_PTR if name == "row_ptr" else {"input"})


def column_out_of_range(rng, pattern, values, shape):
    f = fields(pattern)
    columns = shape[1] * shape[2] * shape[3]
    f["col_idx"][rng.randrange(pattern.nnz)] = rng.choice((-1, -(2**31), columns, columns + 7, 2**31 - 1))
    return f, values, shape, PY | COLUMNS


def compact_column_out_of_range(rng, pattern, values, shape):
    # col_idx as int16, the compact form the CPU kernels read (and nothing else takes), with an entry out of range.
    f = fields(pattern)
    columns = shape[1] * shape[2] * shape[3]
    f["col_idx"] = f["col_idx"].to(torch.int16)
    f["col_idx"][rng.randrange(pattern.nnz)] = rng.choice((-1, -(2**15), columns, columns + 7, 2**15 - 1))
    return f, values, shape, PY | COLUMNS


def columns_out_of_order(rng, pattern, values, shape):
    f = fields(pattern)
    counts = pattern.row_ptr[1:] - pattern.row_ptr[:-1]
    row = rng.choice([r for r in range(shape[0]) if int(counts[r]) >= 2])
    start = int(pattern.row_ptr[row])
    e = rng.randint(start + 1, int(pattern.row_ptr[row + 1]) - 1)
    if rng.random() < 0.5:
        f["col_idx"][e] = f["col_idx"][e - 1]  # a duplicate
    else:
        f["col_idx"][e - 1], f["col_idx"][e] = int(f["col_idx"][e]), int(f["col_idx"][e - 1])
    return f, values, shape, PY | ROW_PTR


def transposed_out_of_range(rng, pattern, values, shape):
    f = fields(pattern)
    j = rng.randrange(pattern.nnz)
    if rng.random() < 0.5:
        f["t_rows"][j] = rng.choice((-1, shape[0], shape[0] + 100))
    else:
        f["t_perm"][j] = rng.choice((-1, pattern.nnz, 2**31 - 1))
    return f, values, shape, PY | {"input"}


def transposed_not_a_permutation(rng, pattern, values, shape):
    f = fields(pattern)
    i, j = rng.sample(range(pattern.nnz), 2)
    f["t_perm"][j] = f["t_perm"][i]
    return f, values, shape, PY | {"input"}


def transposed_across_channels(rng, pattern, values, shape):
    """Two transposed entries of different input channels swapped: t_perm then points into another channel."""
    f = fields(pattern)
    taps = shape[2] * shape[3]
    channel = pattern.col_idx.long()[pattern.t_perm.long()] // taps
    pairs = [(i, j) for i in range(pattern.nnz) for j in range(i + 1, pattern.nnz) if channel[i] != channel[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    f["t_perm"][i], f["t_perm"][j] = int(f["t_perm"][j]), int(f["t_perm"][i])
    return f, values, shape, PY | {"input"}


def transposed_rows_wrong(rng, pattern, values, shape):
    if shape[0] < 2:
        return None
    f = fields(pattern)
    j = rng.randrange(pattern.nnz)
    f["t_rows"][j] = (int(f["t_rows"][j]) + rng.randint(1, shape[0] - 1)) % shape[0]  # in range, inconsistent
    return f, values, shape, PY


def flat_index_wrong(rng, pattern, values, shape):
    f = fields(pattern)
    e = rng.randrange(pattern.nnz)
    f["flat_index"][e] = int(f["flat_index"][e]) + rng.choice((-1, 1, 10**9))
    return f, values, shape, PY


def wrong_index_dtype(rng, pattern, values, shape):
    f = fields(pattern)
    name = rng.choice(INDEX)
    # int16 col_idx is the CPU kernels' compact form, not a corruption there (compact_column_out_of_range).
    dtype = rng.choice([d for d in (torch.int64, torch.int32, torch.int16, torch.float32, torch.uint8)
                        if d != getattr(pattern, name).dtype and (name, d) != ("col_idx", torch.int16)])
    f[name] = f[name].to(dtype)
    seen_by = {"row_ptr": ROW_PTR, "col_idx": COLUMNS, "t_ptr": {"input"}, "t_rows": {"input"}, "t_perm": {"input"},
               "flat_index": set()}[name]
    return f, values, shape, (SIZES if name != "flat_index" else PY) | seen_by


def index_not_1d(rng, pattern, values, shape):
    f = fields(pattern)
    name = rng.choice(("row_ptr", "col_idx", "t_ptr"))
    f[name] = f[name].reshape(1, -1)
    return f, values, shape, SIZES | (ROW_PTR if name == "row_ptr" else COLUMNS if name == "col_idx" else {"input"})


def non_finite_values(rng, pattern, values, shape):
    bad = values.clone()
    bad[rng.randrange(pattern.nnz)] = rng.choice((float("nan"), float("inf"), float("-inf")))
    return fields(pattern), bad, shape, PY


def wrong_values_dtype_or_shape(rng, pattern, values, shape):
    choice = rng.randrange(3)
    if choice == 0:
        return fields(pattern), values.to(rng.choice((torch.int32, torch.int64, torch.bool))), shape, \
            PY | {"forward", "input"}
    if choice == 1:
        return fields(pattern), values.reshape(1, -1), shape, SIZES | {"forward", "input"}
    return fields(pattern), torch.cat([values, values[:1]]), shape, SIZES | {"forward", "input"}


def mismatched_shape(rng, pattern, values, shape):
    c_out, c_in, kh, kw = shape
    choice = rng.randrange(4)
    if choice == 0:
        other = (c_out + rng.randint(1, 2), c_in, kh, kw)
        seen_by = ROW_PTR
    elif choice == 1:
        other = (c_out, c_in + 1, kh, kw)  # the input keeps c_in channels: make_geometry refuses the raw calls
        seen_by = COLUMNS
    elif choice == 2:
        other = (c_out, c_in, 0, kw)
        seen_by = COLUMNS
    else:
        other = (max(c_out - 1, 0), c_in, kh, kw) if c_out > 1 else (c_out, c_in, kh, -1)
        seen_by = COLUMNS
    return fields(pattern), values, other, SIZES | seen_by


CORRUPTIONS = [truncate, extend, decreasing_pointers, pointers_off_the_ends, column_out_of_range,
               compact_column_out_of_range, columns_out_of_order,
               transposed_out_of_range, transposed_not_a_permutation, transposed_across_channels,
               transposed_rows_wrong, flat_index_wrong, wrong_index_dtype, index_not_1d, non_finite_values,
               wrong_values_dtype_or_shape, mismatched_shape]


# --- entry points -----------------------------------------------------------------------------------------------

def python_entry_points(backend, shape, pattern, values, x, geometry, f, bad_values, bad_shape, run_after):
    """Construction and state-dict loads. Returns the number of calls made."""
    stride, padding, dilation = geometry
    calls = 0
    if f is not None:
        expect_refusal("ConvPattern", lambda: SparseConvWeight(ConvPattern(bad_shape, *f.values()), bad_values))
        calls += 1
    if bad_shape == shape:
        weight = SparseConvWeight(pattern, values)
        layer = SparseConv2d(weight, torch.zeros(shape[0]), stride, padding, dilation, backend=backend)
        good = copy.deepcopy(layer.state_dict())
        state = dict(good, values=bad_values, **(f or {}))
        expect_refusal("SparseConv2d.load_state_dict", lambda: layer.load_state_dict(state))
        calls += 1
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in good.items()), "a refused load changed the layer"
        if run_after:
            expected = torch.nn.functional.conv2d(x, pattern.scatter(values), layer.bias, stride, padding, dilation)
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    return calls


def masked_entry_points(rng) -> int:
    """MaskedConv2d state dicts with a mask of the wrong shape or values, or a NaN weight or bias."""
    layer = MaskedConv2d(rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3))
    good = copy.deepcopy(layer.state_dict())
    state = dict(good)
    choice = rng.randrange(5)
    if choice == 0:
        state["mask"] = good["mask"].reshape(-1)
    elif choice == 1:
        state["mask"] = good["mask"][:-1] if good["mask"].shape[0] > 1 else good["mask"][..., :0]
    elif choice == 2:
        mask = good["mask"].float()
        mask.view(-1)[rng.randrange(mask.numel())] = rng.choice((0.5, 2.0, -1.0, float("nan")))
        state["mask"] = mask
    elif choice == 3:
        weight = good["weight"].clone()
        weight.view(-1)[rng.randrange(weight.numel())] = rng.choice((float("nan"), float("inf")))
        state["weight"] = weight
    else:
        state["bias"] = torch.full_like(good["bias"], float("nan"))
    expect_refusal("MaskedConv2d.load_state_dict", lambda: layer.load_state_dict(state))
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in good.items()), "a refused load changed the layer"
    return 1


def operator_entry_point(backend, shape, pattern, values, x, geometry, f, bad_values, bad_shape) -> int:
    """ptd_sparse::sparse_conv2d on a backend it serves (reference, triton): its O(1) checks see dtype and size
    corruptions. The native backends' operators are fuzzed by kernel_entry_points."""
    if ops.sparse_conv2d.ROUTES[backend].kernels is None:
        return 0
    expect_refusal("ptd_sparse::sparse_conv2d", lambda: ops.sparse_conv2d.sparse_conv2d(
        x, bad_values, f["row_ptr"], f["col_idx"], f["t_ptr"], f["t_rows"], f["t_perm"], list(bad_shape), None,
        *geometry, backend))
    return 1


def kernel_entry_points(kinds, shape, pattern, values, x, geometry, f, bad_values, bad_shape) -> int:
    """The raw C++ kernels, each with the corrupted tensors it receives."""
    kernels = torch.ops.ptd_sparse_kernels
    stride, padding, dilation = geometry
    out_h = (x.shape[2] + 2 * padding[0] - (shape[2] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + 2 * padding[1] - (shape[3] - 1) - 1) // stride[1] + 1
    grad_output = torch.randn(x.shape[0], shape[0], out_h, out_w)
    calls = 0
    if "forward" in kinds:
        expect_refusal("conv_forward", lambda: kernels.conv_forward(
            x, bad_values, f["row_ptr"], f["col_idx"], list(bad_shape), None, stride, padding, dilation))
        calls += 1
    if "values" in kinds:
        expect_refusal("conv_backward_values", lambda: kernels.conv_backward_values(
            grad_output, x, f["row_ptr"], f["col_idx"], list(bad_shape), stride, padding, dilation))
        calls += 1
    if "input" in kinds:
        expect_refusal("conv_backward_input", lambda: kernels.conv_backward_input(
            grad_output, bad_values, f["col_idx"], f["t_ptr"], f["t_rows"], f["t_perm"], list(bad_shape),
            list(x.shape), stride, padding, dilation))
        calls += 1
    return calls


def grad_output_of_another_shape(rng, shape, pattern, values, x, geometry) -> int:
    """The raw backward kernels with a grad_output that does not match the convolution."""
    kernels = torch.ops.ptd_sparse_kernels
    stride, padding, dilation = geometry
    good = kernels.conv_forward(x, values, pattern.row_ptr, pattern.col_idx, list(shape), None, *geometry)
    sizes = list(good.shape)
    axis = rng.randrange(4)
    sizes[axis] += rng.choice((-1, 1)) if sizes[axis] > 1 else 1
    grad_output = torch.randn(sizes)
    expect_refusal("conv_backward_values", lambda: kernels.conv_backward_values(
        grad_output, x, pattern.row_ptr, pattern.col_idx, list(shape), stride, padding, dilation))
    expect_refusal("conv_backward_input", lambda: kernels.conv_backward_input(
        grad_output, values, pattern.col_idx, pattern.t_ptr, pattern.t_rows, pattern.t_perm, list(shape),
        list(x.shape), stride, padding, dilation))
    return 2


def main(backend: str, cases: int, seed: int) -> int:
    torch.set_num_threads(1)  # tiny tensors: waking a thread pool would cost more than the work
    rng = random.Random(seed)
    counts = {"backend": backend, "cases": 0, "calls": 0, "kinds": {}}
    failures = []
    runs_after = 0
    # Under Triton's interpreter every kernel program is a Python loop: only a few refused loads are followed by a
    # real forward on the backend.
    run_every = 25 if backend == "triton" else 5
    while counts["cases"] < cases:
        shape, pattern, values, x, geometry = random_case(rng)
        corruption = rng.choice(CORRUPTIONS + [masked_entry_points, grad_output_of_another_shape])
        try:
            if corruption is masked_entry_points:
                counts["calls"] += masked_entry_points(rng)
            elif corruption is grad_output_of_another_shape:
                if backend != "cpu":
                    continue
                counts["calls"] += grad_output_of_another_shape(rng, shape, pattern, values, x, geometry)
            else:
                made = corruption(rng, pattern, values, shape)
                if made is None:
                    continue
                f, bad_values, bad_shape, kinds = made
                run_after = counts["cases"] % run_every == 0
                runs_after += run_after
                counts["calls"] += python_entry_points(backend, shape, pattern, values, x, geometry, f, bad_values,
                                                       bad_shape, run_after)
                if "op" in kinds:
                    counts["calls"] += operator_entry_point(backend, shape, pattern, values, x, geometry, f,
                                                            bad_values, bad_shape)
                if backend == "cpu":
                    counts["calls"] += kernel_entry_points(kinds, shape, pattern, values, x, geometry, f, bad_values,
                                                           bad_shape)
        except (Silent, AssertionError) as failure:
            failures.append(f"case {counts['cases']} ({corruption.__name__}, shape {shape}): {failure}")
        counts["cases"] += 1
        counts["kinds"][corruption.__name__] = counts["kinds"].get(corruption.__name__, 0) + 1
    counts["forward_runs_after_refusal"] = runs_after
    counts["failures"] = len(failures)
    print(json.dumps(counts))
    for failure in failures[:20]:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
