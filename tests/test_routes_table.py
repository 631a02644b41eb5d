"""The route tables (ROUTES in ptd_sparse/ops/<operator>.py): every backend has a row in every operator's table, each
row names a schema that carries its autograd, autocast and fake rules, the public functions run their calls through
the tables, and the Triton kernels are imported by a plain import on first use only."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import random_mask

import ptd_sparse
from ptd_sparse._extension import extension_problem
from ptd_sparse.backends import BACKENDS
from ptd_sparse.ops import kd_loss as kd_loss_ops
from ptd_sparse.ops import sparse_conv2d as conv_ops
from ptd_sparse.ops.route import Route

TABLES = {"sparse_conv2d": conv_ops.ROUTES, "kd_loss": kd_loss_ops.ROUTES, "kd_loss_topk": kd_loss_ops.TOPK_ROUTES}


@pytest.mark.parametrize("table", TABLES, ids=list(TABLES))
def test_every_backend_has_a_row_in_every_table(table):
    assert set(TABLES[table]) == set(BACKENDS)


def routes_and_schemas():
    for table_name, table in TABLES.items():
        for backend, route in table.items():
            for schema in (route, route.traced) if route.traced else (route,):
                yield pytest.param(schema, id=f"{table_name}-{backend}-{schema.operator}")


@pytest.mark.parametrize("route", list(routes_and_schemas()))
def test_each_route_names_a_schema_with_its_autograd_autocast_and_fake_rules(route):
    if route.operator.startswith("ptd_sparse_kernels::") and extension_problem() is not None:
        pytest.skip(extension_problem())
    for key in ("Autograd", "AutocastCPU", "AutocastCUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(route.operator, key), f"{route.operator}: no {key}"


@pytest.mark.parametrize("table", TABLES, ids=list(TABLES))
def test_python_operators_serve_exactly_the_backends_with_python_kernels(table):
    """The rows with `kernels` run a ptd_sparse:: operator, the others the extension's (which has its own C++
    kernels)."""
    for backend, route in TABLES[table].items():
        assert (route.kernels is not None) == route.operator.startswith("ptd_sparse::"), backend


def test_a_python_operator_refuses_a_backend_it_does_not_serve(generator):
    refusal = r"backend 'cpu' has no Python kernels; this operator runs \['reference', 'triton'\]"
    student = torch.randn(2, 3, generator=generator)
    with pytest.raises(ValueError, match=refusal):
        kd_loss_ops.kd_loss(student, student, None, 2.0, 0.5, 2, -100, False, "cpu")
    with pytest.raises(ValueError, match=refusal):
        kd_loss_ops.kd_loss_topk(student, *ptd_sparse.topk_teacher(student, 2, 2.0), None, 2.0, 0.5, 2, -100, False,
                                 "cpu")
    p = ptd_sparse.ConvPattern.from_mask(random_mask((2, 3, 3, 3), 0.5, generator))
    with pytest.raises(ValueError, match=refusal):
        conv_ops.sparse_conv2d(torch.randn(1, 3, 5, 5), torch.randn(p.nnz), p.row_ptr, p.col_idx, p.t_ptr, p.t_rows,
                               p.t_perm, [2, 3, 3, 3], None, [1, 1], [0, 0], [1, 1], "cpu")


def spy(monkeypatch, table: dict, backend: str) -> list:
    """Replaces table[backend] by a route that records its calls and runs the original."""
    calls, original = [], table[backend]

    def call(*args):
        calls.append(len(args))
        return original.call(*args)

    monkeypatch.setitem(table, backend, Route(original.operator, call, original.kernels, original.traced,
                                              original.traced_on))
    return calls


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_public_functions_dispatch_through_the_tables(backend, monkeypatch, generator):
    if backend == "cpu" and extension_problem() is not None:
        pytest.skip(extension_problem())
    conv_calls = spy(monkeypatch, conv_ops.ROUTES, backend)
    weight = torch.randn(4, 3, 3, 3, generator=generator)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    sparse = ptd_sparse.SparseConvWeight.from_dense(weight, random_mask(weight.shape, 0.5, generator))
    ptd_sparse.sparse_conv2d(x, sparse, padding=1, backend=backend)
    assert conv_calls == [13]  # input, values, five index tensors, weight_shape, bias, stride, padding, dilation, relu
    loss_calls = spy(monkeypatch, kd_loss_ops.ROUTES, backend)
    topk_calls = spy(monkeypatch, kd_loss_ops.TOPK_ROUTES, backend)
    student, teacher = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    ptd_sparse.kd_loss(student, teacher, backend=backend)
    ptd_sparse.kd_loss(student, ptd_sparse.topk_teacher(teacher, 2, 10.0), backend=backend)
    assert (loss_calls, topk_calls) == ([7], [9])


def test_a_route_takes_its_traced_form_only_while_compiling_on_its_devices():
    route = Route("x::eager", lambda x: x + 1, traced=Route("x::traced", lambda x: x + 2), traced_on=("cuda",))
    x = torch.zeros(())
    assert route.entry("cuda")(x) == 1 and route.entry("cpu")(x) == 1

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(x, device_type: str):
        return route.entry(device_type)(x)

    assert compiled(x, "cuda") == 2 and compiled(x, "cpu") == 1


def test_importing_ptd_sparse_leaves_the_triton_kernels_unimported():
    """ptd_sparse.kernels (which imports triton) is imported by the first call that needs it, not by the package."""
    code = "import sys, ptd_sparse; print('ptd_sparse.kernels' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
