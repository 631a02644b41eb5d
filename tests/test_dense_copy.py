"""SparseConv2d's dense route (the automatic choice above the crossover for a call's batch size) never runs stale
weights, sends gradients to values, and does not rebuild its dense weight on every inference call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_mask
from torch import nn

from ptd_sparse import backends
from ptd_sparse.nn import SparseConv2d
from ptd_sparse.nn import sparse_conv2d as sparse_conv2d_module


@pytest.fixture
def layer(generator, monkeypatch) -> SparseConv2d:
    """Density 0.25 between the crossovers: batches under 8 go dense, larger ones sparse (automatic choice)."""
    monkeypatch.setitem(backends.SMALL_BATCH_CROSSOVER, "cpu", 0.2)
    monkeypatch.setitem(backends.DENSE_CROSSOVER, "cpu", 0.3)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    sparse = SparseConv2d.from_conv(conv, random_mask(conv.weight.shape, 0.25, generator))
    sparse.keep_dense_copy()
    return sparse


def expected_output(layer: SparseConv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, layer.sparse_weight.to_dense().detach(), layer.bias.detach(), 1, 1)


def test_small_batch_after_training_uses_the_new_values_and_trains_them(layer, generator):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = layer.values.detach().clone()
    for _ in range(2):  # trained on the sparse route (batch 16)
        optimizer.zero_grad()
        layer(torch.randn(16, 4, 6, 6, generator=generator)).square().mean().backward()
        optimizer.step()
    assert not torch.allclose(layer.values, before)
    x = torch.randn(2, 4, 6, 6, generator=generator)  # dense route
    out = layer(x)
    torch.testing.assert_close(out, expected_output(layer, x), atol=1e-5, rtol=1e-5)
    layer.values.grad = None
    out.square().sum().backward()
    assert layer.values.grad is not None
    values = layer.values.detach().clone().requires_grad_()
    dense = layer.sparse_weight.pattern.scatter(values)
    F.conv2d(x, dense, layer.bias.detach(), 1, 1).square().sum().backward()
    torch.testing.assert_close(layer.values.grad, values.grad, atol=1e-5, rtol=1e-5)


def test_inference_builds_the_dense_weight_once_and_again_only_after_a_change(layer, generator, monkeypatch):
    from ptd_sparse.nn import measured_route

    # The measured route of this shape is the dense one (whatever this machine's timings would say).
    monkeypatch.setattr(measured_route, "fastest", lambda routes, x: (measured_route.DENSE, {}))
    builds = []
    scatter = sparse_conv2d_module.dense_weight
    monkeypatch.setattr(sparse_conv2d_module, "dense_weight", lambda *args: builds.append(1) or scatter(*args))
    x = torch.randn(1, 4, 6, 6, generator=generator)
    with torch.no_grad():
        first = layer(x)
        for _ in range(3):
            torch.testing.assert_close(layer(x), first)
    assert builds == []  # keep_dense_copy built it already
    with torch.no_grad():
        layer.values.mul_(2)  # an in-place change (what an optimizer step or load_state_dict does)
    with torch.inference_mode():
        changed = layer(x)
        layer(x)
    assert len(builds) == 1
    torch.testing.assert_close(changed - layer.bias.view(1, -1, 1, 1), 2 * (first - layer.bias.view(1, -1, 1, 1)),
                               atol=1e-5, rtol=1e-5)


def test_a_loaded_state_reaches_the_dense_route(layer, generator):
    other = SparseConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), random_mask((6, 4, 3, 3), 0.25, generator))
    x = torch.randn(1, 4, 6, 6, generator=generator)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), expected_output(other, x), atol=1e-5, rtol=1e-5)
