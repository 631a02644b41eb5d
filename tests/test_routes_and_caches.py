"""sparsify's output never computes with old weights, and its route choice is bounded, fixable and traceable.

Each case is something a user does to an inference model: fused optimizer steps, `.data` edits, inference mode,
deepcopy and torch.save, torch.jit.trace and torch.export, inputs of many sizes, autocast, oneDNN switched off, a
route that fails, routes fixed or loaded from a saved plan.
"""
from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import random_mask
from torch import nn

import ptd_sparse
from ptd_sparse.functional import masked_conv2d
from ptd_sparse.nn import MaskedConv2d, SparseConv2d, measured_route

FIXED_ROUTES = [route for route in measured_route.ROUTES
                if route != measured_route.DENSE_PREPACKED or torch.backends.mkldnn.is_available()]


def pruned_net(generator, density: float = 0.3) -> nn.Module:
    """Two pruned convolutions with BatchNorm and ReLU, in eval mode."""
    model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          MaskedConv2d(8, 6, 3, padding=1, bias=True)).eval()
    for index in (0, 3):
        model[index].set_mask(random_mask(model[index].weight.shape, density, generator))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def reference_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inference form's function computed from its current values with plain F.conv2d."""
    out = x
    for module in model:
        if isinstance(module, SparseConv2d):
            out = F.conv2d(out, module.sparse_weight.to_dense().detach(), module.bias.detach(), module.stride,
                           module.padding, module.dilation, module.groups)
            out = out.relu() if module.relu else out
        else:
            out = module(out)
    return out


def sparse_layers(model: nn.Module) -> list[SparseConv2d]:
    return [m for m in model.modules() if isinstance(m, SparseConv2d)]


@pytest.mark.parametrize("route", FIXED_ROUTES + ["measure"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fused_optimizer_steps_reach_inference(generator, route, optimizer):
    model = ptd_sparse.sparsify(pruned_net(generator), routes=route)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        model(x)  # builds the route's derived weights
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    try:
        opt = make(model.parameters(), lr=0.1, fused=True)
    except (RuntimeError, ValueError) as error:
        pytest.skip(f"fused {optimizer} unavailable on this CPU build: {error}")
    for _ in range(3):
        opt.zero_grad()
        model.train()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_output(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("route", FIXED_ROUTES + ["measure"])
def test_data_edits_reach_inference(generator, route):
    model = ptd_sparse.sparsify(pruned_net(generator), routes=route)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        before = model(x)
        for layer in sparse_layers(model):
            layer.values.data.mul_(2)  # moves no version counter
        after = model(x)
        torch.testing.assert_close(after, reference_output(model, x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(after, before)
        # A write through a NumPy view of the same storage, too.
        sparse_layers(model)[0].values.detach().numpy()[:] = 0.5
        torch.testing.assert_close(model(x), reference_output(model, x), atol=1e-5, rtol=1e-5)


def test_masked_conv2d_sees_data_edits_of_weight_and_mask(generator):
    conv = MaskedConv2d(4, 6, 3, padding=1, backend="cpu")
    conv.set_mask(random_mask(conv.weight.shape, 0.1, generator))
    x = torch.randn(2, 4, 7, 7, generator=generator)
    with torch.no_grad():
        conv(x)
        new = torch.randn(conv.weight.shape, generator=generator)
        conv.weight.data.copy_(new)
        conv.mask.data.fill_(True)
        torch.testing.assert_close(conv(x), F.conv2d(x, new, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(masked_conv2d(x, new, conv.mask, conv.bias, padding=1, backend="cpu"),
                                   F.conv2d(x, new, conv.bias, padding=1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("route", FIXED_ROUTES)
def test_a_first_call_under_inference_mode_does_not_break_autograd(generator, route):
    model = ptd_sparse.sparsify(pruned_net(generator), routes=route)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.inference_mode():
        first = model(x)
    for layer in sparse_layers(model):
        layer.values.requires_grad_(False)  # gradients for the input only: the cached weight is used
    x.requires_grad_(True)
    out = model(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("route", FIXED_ROUTES)
def test_deepcopy_and_torch_save_work_whatever_the_route(generator, route):
    model = ptd_sparse.sparsify(pruned_net(generator), routes=route)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        expected = model(x)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own bytes, written just above
    with torch.no_grad():
        torch.testing.assert_close(twin(x), expected)
        torch.testing.assert_close(loaded(x), expected)
        # The copies share nothing derived: editing the copy leaves the original's answer alone.
        sparse_layers(twin)[0].values.data.mul_(3)
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("routes", ["measure", "dense", "sparse", "density"])
def test_torch_jit_trace_of_sparsify_output(generator, routes):
    model = ptd_sparse.sparsify(pruned_net(generator), routes=routes)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        expected = model(x)  # measures, where measuring
        traced = torch.jit.trace(model, x, check_inputs=[(x,), (x * 2,)])
        torch.testing.assert_close(traced(x), expected, atol=1e-5, rtol=1e-5)
        # The trace holds no copy of the weights: an edit of values reaches it.
        sparse_layers(model)[0].values.mul_(2)
        torch.testing.assert_close(traced(x), reference_output(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", [None, torch.channels_last])
def test_torch_export_of_sparsify_output_runs_in_a_new_process(generator, tmp_path, memory_format):
    model = ptd_sparse.sparsify(pruned_net(generator, density=0.1), memory_format=memory_format)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-5)
    path = tmp_path / "model.pt2"
    torch.export.save(exported, path)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = (f"import torch, ptd_sparse\n"
              f"program = torch.export.load({str(path)!r})\n"
              f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
              f"torch.testing.assert_close(program.module()(io['x']), io['expected'], atol=1e-5, rtol=1e-5)\n"
              f"print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("memory_format", [None, torch.channels_last])
def test_torch_compile_fullgraph_of_sparsify_output(generator, memory_format):
    model = ptd_sparse.sparsify(pruned_net(generator, density=0.1), routes="sparse", memory_format=memory_format)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_many_input_sizes_measure_a_bounded_number_of_times(generator, monkeypatch):
    model = ptd_sparse.sparsify(pruned_net(generator))
    measured = []
    original = measured_route.fastest
    monkeypatch.setattr(measured_route, "fastest", lambda routes, x: measured.append(x.shape) or original(routes, x))
    with torch.no_grad():
        for size in range(3, 40, 3):  # 13 sizes, 5 size buckets
            for batch in (1, 2, 3, 5, 9, 17):
                model(torch.randn(batch, 3, size, size, generator=generator))
    layers = sparse_layers(model)
    assert all(len(layer.routes) <= measured_route.MAX_BUCKETS for layer in layers)
    assert len(measured) <= measured_route.MAX_BUCKETS * len(layers)
    # Sizes within one bucket share its measurement.
    count = len(measured)
    with torch.no_grad():
        model(torch.randn(2, 3, 30, 31, generator=generator))
        model(torch.randn(2, 3, 29, 32, generator=generator))
    assert len(measured) == count


@pytest.mark.parametrize("route", FIXED_ROUTES + ["measure"])
def test_routes_agree_in_dtype_and_layout_under_autocast(generator, route):
    model = ptd_sparse.sparsify(pruned_net(generator), routes=route)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            out = model(x.contiguous(memory_format=layout))
            assert out.dtype == torch.bfloat16, route
            assert out.is_contiguous(memory_format=layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert measured_route.DENSE_PREPACKED not in measured_route.routes_for(x)


def test_prepacked_route_is_not_offered_with_onednn_disabled(generator):
    x = torch.randn(2, 3, 8, 8)
    with torch.backends.mkldnn.flags(enabled=False):
        assert measured_route.DENSE_PREPACKED not in measured_route.routes_for(x)
        model = ptd_sparse.sparsify(pruned_net(generator))
        with torch.no_grad():
            model(x)
        assert all(route != measured_route.DENSE_PREPACKED for layer in sparse_layers(model)
                   for route in layer.routes.values())


def test_a_route_that_raises_is_dropped_with_a_warning(generator, monkeypatch):
    model = ptd_sparse.sparsify(pruned_net(generator))
    layer = sparse_layers(model)[0]
    run = SparseConv2d._run

    def broken(self, route, input):
        if route == measured_route.DENSE_CHANNELS_LAST:
            raise RuntimeError("this route is broken here")
        return run(self, route, input)

    monkeypatch.setattr(SparseConv2d, "_run", broken)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="dense_channels_last route failed .*broken"):
        out = model(x)
    assert measured_route.DENSE_CHANNELS_LAST not in layer.routes.values()
    torch.testing.assert_close(out, reference_output(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seconds_per_call, timed_runs", [(1e-5, measured_route.MAX_REPEATS),
                                                            (1e-2, measured_route.MIN_REPEATS), (2.5e-3, 7)])
def test_fast_routes_are_timed_more_often_and_every_measurement_is_bounded(monkeypatch, seconds_per_call, timed_runs):
    # A clock that advances by seconds_per_call per route call: two routes, rounds until MIN_MEASURE_SECONDS
    # (0.05 s) have passed in all, never fewer than MIN_REPEATS nor more than MAX_REPEATS.
    now = [0.0]
    monkeypatch.setattr(measured_route.time, "perf_counter", lambda: now[0])
    calls = {"a": 0, "b": 0}

    def route(name, cost):
        def run(x):
            calls[name] += 1
            now[0] += cost
        return run

    best, medians = measured_route.fastest({"a": route("a", seconds_per_call), "b": route("b", 2 * seconds_per_call)},
                                           torch.zeros(1))
    assert best == "a" and medians == pytest.approx({"a": seconds_per_call, "b": 2 * seconds_per_call})
    assert calls == {"a": 1 + timed_runs, "b": 1 + timed_runs}  # one warm-up each


@pytest.mark.parametrize("dense_share, expected", [(0.95, "sparse"), (0.91, "sparse"), (0.85, "dense"),
                                                   (1.2, "sparse")])
def test_a_dense_route_must_beat_the_sparse_kernel_by_the_margin(generator, monkeypatch, dense_share, expected):
    # A layer on a clock where the sparse route takes 1 ms a call and every dense route dense_share of that: within
    # DENSE_MARGIN (10%) the layer keeps the sparse kernel and holds no dense copy of its weight.
    now = [0.0]
    monkeypatch.setattr(measured_route.time, "perf_counter", lambda: now[0])
    run = SparseConv2d._run

    def timed(self, route, input):
        now[0] += 1e-3 * (1.0 if route == measured_route.SPARSE else dense_share)
        return run(self, route, input)

    monkeypatch.setattr(SparseConv2d, "_run", timed)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.5, generator)).eval()
    x = torch.randn(2, 4, 7, 7, generator=generator)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, F.conv2d(x, layer.sparse_weight.to_dense(), layer.bias, 1, 1), atol=1e-5,
                               rtol=1e-5)
    (route,) = layer.routes.values()
    assert (route == measured_route.SPARSE) == (expected == "sparse")
    if expected == "sparse":
        assert layer._dense_cache is None and layer._prepacked is None
    assert measured_route.preferred({"sparse": 1.0, "dense": 0.9 * (1 - 1e-9)}) == "dense"
    assert measured_route.preferred({"dense": 2.0, "dense_channels_last": 1.0}) == "dense_channels_last"
    # Off the CPU no dense copy is kept (the weight is scattered per call): no margin there.
    assert measured_route.preferred({"sparse": 1.0, "dense": 0.95}, dense_margin=0.0) == "dense"


def test_fixed_routes_measure_nothing(generator, monkeypatch):
    monkeypatch.setattr(measured_route, "fastest", lambda *a: pytest.fail("a fixed route was measured"))
    x = torch.randn(2, 3, 8, 8, generator=generator)
    for routes in FIXED_ROUTES + ["density"]:
        model = ptd_sparse.sparsify(pruned_net(generator), routes=routes)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference_output(model, x), atol=1e-5, rtol=1e-5)
        assert all(layer.route_policy == routes for layer in sparse_layers(model))


def test_a_saved_route_plan_replays_without_measuring(generator, tmp_path, monkeypatch):
    pruned = pruned_net(generator)
    model = ptd_sparse.sparsify(pruned)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    with torch.no_grad():
        model(x)
        model(x[:1])
    path = tmp_path / "routes.json"
    ptd_sparse.save_route_plan(model, path)
    plan = json.loads(path.read_text())
    assert set(plan["layers"]) == {"0", "3"} and all(len(e["buckets"]) == 2 for e in plan["layers"].values())
    monkeypatch.setattr(measured_route, "fastest", lambda *a: pytest.fail("a planned route was measured"))
    replayed = ptd_sparse.sparsify(pruned, routes=path)
    with torch.no_grad():
        replayed(x)
        replayed(torch.randn(64, 3, 30, 30, generator=generator))  # a bucket the plan lacks: its nearest one
    for mine, theirs in zip(sparse_layers(replayed), sparse_layers(model)):
        assert mine.routes == theirs.routes
    assert ptd_sparse.route_plan(replayed) == plan


def test_a_route_plan_that_does_not_fit_is_refused(generator, tmp_path):
    pruned = pruned_net(generator)
    plan = ptd_sparse.route_plan(ptd_sparse.sparsify(pruned, routes="sparse"))
    wrong = copy.deepcopy(plan)
    wrong["layers"]["9"] = wrong["layers"].pop("3")
    with pytest.raises(ValueError, match=r"no entry for \['3'\].*lacks: \['9'\]"):
        ptd_sparse.sparsify(pruned, routes=wrong)
    corruptions = [
        (lambda p: p.update(format="other"), "format"),
        (lambda p: p.update(version=7), "version must be 1"),
        (lambda p: p["layers"]["0"].update(default="fast"), r"'0'.*default must be one of"),
        (lambda p: p["layers"]["0"].update(buckets={}), "buckets must be a list"),
        (lambda p: p["layers"]["0"].update(buckets=[{"batch": 3}]), r"buckets\[0\] must be an object"),
    ]
    bucket = {"batch": 4, "height": 8, "width": 8, "dtype": "float32", "device": "cpu", "channels_last": False,
              "autocast": None, "route": "sparse"}
    for field, value, message in [("batch", 3, "batch must be 0 or a power of two"),
                                  ("dtype", "int8", "dtype must be one of"),
                                  ("route", "fastest", "route must be one of"),
                                  ("channels_last", "no", "channels_last must be true or false")]:
        corruptions.append((lambda p, f=field, v=value: p["layers"]["0"].update(buckets=[{**bucket, f: v}]),
                            message))
    for corrupt, message in corruptions:
        broken = copy.deepcopy(plan)
        corrupt(broken)
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            ptd_sparse.sparsify(pruned, routes=path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ptd_sparse.load_route_plan(path)
    with pytest.raises(ValueError, match="routes must be one of .* got 'fastest', which is neither"):
        ptd_sparse.sparsify(pruned, routes="fastest")


def test_memory_holds_one_dense_form_only_where_a_layer_runs_dense(generator):
    model = ptd_sparse.sparsify(pruned_net(generator))
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad(), warnings.catch_warnings():
        model(x)
    for layer in sparse_layers(model):
        used = set(layer.routes.values())
        layouts = set(layer._dense_cache[1]) if layer._dense_cache is not None else set()
        assert layouts == ({False} if measured_route.DENSE in used else set()) | \
            ({True} if measured_route.DENSE_CHANNELS_LAST in used else set())
        assert (layer._prepacked is not None) == (measured_route.DENSE_PREPACKED in used)
