"""fuse_graph: a sparsified model's forward as an fx graph with its ReLUs and residual additions fused. The fused model
computes what the sparsified one computes (every route, NCHW and channels_last, with and without autograd), fuses
exactly the steps it may (a ReLU module applied at two places, `out += identity; relu(out)`), and leaves alone what it
may not (an output read twice, an in-place addition into a tensor that other code reads)."""
from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import ptd_sparse
from ptd_sparse.fuse_graph import add_relu_into, to_channels_last
from ptd_sparse.nn import SparseConv2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import user_models  # noqa: E402


def pruned_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = user_models.resnet18(num_classes=10, base_width=8).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0.8)
    return model


def call_nodes(fused: torch.fx.GraphModule, predicate) -> list:
    return [node for node in fused.graph.nodes if predicate(node)]


def relu_nodes(fused):
    return call_nodes(fused, lambda n: (n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.ReLU))
                      or (n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target)
                          in ("relu", "relu_")))


@pytest.mark.parametrize("routes", ["sparse", "dense", "dense_channels_last", "dense_prepacked"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet18_fuses_every_relu_and_addition_with_the_same_output(routes, channels_last):
    model = pruned_resnet18()
    sparse = ptd_sparse.sparsify(model, routes=routes,
                                 memory_format=torch.channels_last if channels_last else None)
    fused = ptd_sparse.fuse_graph(sparse, example_input=torch.randn(2, 3, 32, 32))
    # Eight residual additions, each with its ReLU; the eight ReLUs after bn1 into conv1's epilogue; the stem's
    # ReLU sparsify already fused. No ReLU and no nn.Identity call is left.
    assert len(call_nodes(fused, lambda n: n.target is add_relu_into)) == 8
    assert relu_nodes(fused) == []
    assert call_nodes(fused, lambda n: n.op == "call_module" and
                      isinstance(fused.get_submodule(n.target), nn.Identity)) == []
    assert all(fused.get_submodule(f"layer{i}.{j}.conv1").relu for i in range(1, 5) for j in range(2))
    # The model given is not changed (fuse_graph copies it by default).
    assert not any(sparse.get_submodule(f"layer{i}.{j}.conv1").relu for i in range(1, 5) for j in range(2))
    # The channels_last conversion sparsify's pre-hook does runs inside the graph.
    assert len(call_nodes(fused, lambda n: n.target is to_channels_last)) == (1 if channels_last else 0)
    for batch in (0, 1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected, got = sparse(x), fused(x)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)


def test_fused_model_keeps_the_routes_and_names_a_plan_reads():
    sparse = ptd_sparse.sparsify(pruned_resnet18())
    with torch.no_grad():
        sparse(torch.randn(2, 3, 32, 32))  # measures each layer's route
    fused = ptd_sparse.fuse_graph(sparse)
    assert ptd_sparse.route_plan(fused) == ptd_sparse.route_plan(sparse)
    inplace = ptd_sparse.fuse_graph(sparse, inplace=True)
    assert inplace.get_submodule("layer1.0.conv1") is sparse.get_submodule("layer1.0.conv1")


def layer_input_layouts(model) -> list[bool]:
    """Whether each SparseConv2d of `model` gets a channels_last input, over one call on an NCHW batch."""
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous(
        memory_format=torch.channels_last))) for m in model.modules() if isinstance(m, SparseConv2d)]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    for hook in hooks:
        hook.remove()
    return layouts, out


def test_copies_pickles_and_a_second_fusion_keep_the_graph():
    sparse = ptd_sparse.sparsify(pruned_resnet18(), routes="sparse", memory_format=torch.channels_last)
    fused = ptd_sparse.fuse_graph(sparse)
    layouts, expected = layer_input_layouts(fused)
    assert all(layouts)
    for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), ptd_sparse.fuse_graph(fused)):
        other_layouts, got = layer_input_layouts(other)
        assert other_layouts == layouts
        torch.testing.assert_close(got, expected)


def test_gradients_match_with_autograd():
    sparse = ptd_sparse.sparsify(pruned_resnet18(), routes="sparse")
    fused = ptd_sparse.fuse_graph(sparse)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (sparse, fused):
        leaf = x.clone().requires_grad_()
        model(leaf).square().sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def sparse_conv(channels: int = 4) -> SparseConv2d:
    weight = torch.randn(channels, channels, 3, 3)
    return SparseConv2d(ptd_sparse.SparseConvWeight.from_dense(weight, torch.rand(weight.shape) < 0.5),
                        padding=1, route="sparse")


class OutputReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) + y


class AddsIntoAnotherTensor(nn.Module):
    """`out += conv(x)` writes into `out`, which `identity` also names and the forward reads afterwards."""

    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()

    def forward(self, x):
        identity = x * 2
        out = identity
        out += self.conv(x)
        return torch.relu(out) + identity


class BroadcastResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()
        self.shift = nn.Parameter(torch.randn(4, 1, 1), requires_grad=False)

    def forward(self, x):
        return F.relu(self.conv(x) + self.shift)


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()

    def forward(self, x):
        return F.relu(self.conv(F.relu(self.conv(x))))


class KeywordReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()

    def forward(self, x):
        return torch.relu(input=self.conv(x) + x)  # the ReLU's input by keyword


class IdentitySubclass(nn.Identity):
    def forward(self, x):
        return x * 2


class ComputesInAnIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()
        self.scale = IdentitySubclass()

    def forward(self, x):
        return self.scale(F.relu(self.conv(x)))


class AddsANumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()

    def forward(self, x):
        return F.relu(self.conv(x) + x.size(0))


@pytest.mark.parametrize("model_type, fused_relus, fused_additions", [
    (OutputReadTwice, 0, 0), (BroadcastResidual, 0, 1), (ConvCalledTwice, 0, 0), (KeywordReLU, 0, 0),
    (ComputesInAnIdentity, 1, 0), (AddsANumber, 0, 1)])
def test_fuses_only_what_is_safe(model_type, fused_relus, fused_additions):
    torch.manual_seed(0)
    model = model_type().eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x.clone())
        fused = ptd_sparse.fuse_graph(model, example_input=x)
        got = fused(x.clone())
    torch.testing.assert_close(got, expected)
    assert len(call_nodes(fused, lambda n: n.target is add_relu_into)) == fused_additions
    assert sum(m.relu for m in fused.modules() if isinstance(m, SparseConv2d)) == fused_relus


def test_a_layer_with_forward_hooks_is_not_fused():
    torch.manual_seed(0)
    model = BroadcastResidual().eval()
    seen = []
    model.conv.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
        fused = ptd_sparse.fuse_graph(model, example_input=x)
        got = fused(x)
    torch.testing.assert_close(got, expected)
    assert call_nodes(fused, lambda n: n.target is add_relu_into) == []
    torch.testing.assert_close(seen[-1], seen[0])  # the hook saw the convolution's own output every time


def test_the_example_check_leaves_training_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(sparse_conv(), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()).train()
    statistics = model[1].running_mean.clone()
    fused = ptd_sparse.fuse_graph(model, example_input=torch.randn(2, 4, 6, 6))
    torch.testing.assert_close(model[1].running_mean, statistics)  # eval mode: no statistics updated, no dropout
    assert model.training and model[1].training and fused.training


def test_a_graph_that_loses_an_in_place_addition_is_refused():
    # torch.fx records `out += conv(x)` as an addition, so `identity` (the same tensor in eager) stays unchanged in
    # the graph: only running both on an example shows it.
    torch.manual_seed(0)
    model = AddsIntoAnotherTensor().eval()
    with pytest.raises(ValueError, match="computes another output than its forward on example_input"):
        ptd_sparse.fuse_graph(model, example_input=torch.randn(2, 4, 6, 6))
    with pytest.raises(TypeError, match="example_input must be a Tensor"):
        ptd_sparse.fuse_graph(model, example_input=[1.0])


def test_add_relu_into_falls_back_where_one_pass_would_differ():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 1)
    torch.testing.assert_close(add_relu_into(a.clone(), b), torch.relu(a + b))
    wide = torch.randn(3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(add_relu_into(a.clone(), wide), torch.relu(a + wide))
    same = torch.randn(2, 3, 4, 4)
    target = a.clone()
    assert add_relu_into(target, same) is target  # one in-place pass
    torch.testing.assert_close(target, torch.relu(a + same))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sparse_conv()

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


def test_untraceable_model_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot trace DataDependent"):
        ptd_sparse.fuse_graph(DataDependent())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ptd_sparse.fuse_graph(lambda x: x)
