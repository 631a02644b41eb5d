"""fuse_graph(model): a sparsified model's forward rewritten as a torch.fx GraphModule, with the epilogues fused that
module replacement cannot reach.

sparsify changes modules only and keeps the model's own forward, so two things stay separate passes over every
activation they touch: a ReLU module that the forward applies at two places (torchvision's blocks apply one
`self.relu` after bn1 and again after the addition), and a residual addition followed by a ReLU. In the traced graph
each call site is its own node, so:
- a ReLU (module or function) whose input is a SparseConv2d's output, read by nothing else, moves into that layer's
  epilogue (its `relu`, set only where the layer is called once and pools nothing) and the call goes;
- an addition `conv_output + other` (operator.add or +=, torch.add, Tensor.add / add_ without alpha) whose only reader
  is a ReLU, where conv_output is a SparseConv2d's output read by nothing else, becomes one in-place pass over
  conv_output (add_relu_into: torch.ops.aten._add_relu_) instead of two;
- calls of nn.Identity (the BatchNorms, ReLUs and pools sparsify folded away) go.
Everything else runs as the model's forward does, with the same modules. A layer with forward hooks is not fused
(its hooks would see the fused output, or one overwritten by the addition after them); hooks registered on the fused
graph's layers see what the layers compute there. A model whose inputs sparsify converts to channels_last does the
conversion inside the graph (to_channels_last), so copies and pickles of the fused graph keep it. On a CIFAR-size
torchvision-style ResNet18 this removes 16 of its 17 ReLU calls and makes its 8 additions single passes
(docs/benchmarks.md, "On the Intel Xeon machine").

The rewrite is exact: each fused step computes what the calls it replaces computed (max(0, x) in the kernel's
epilogue, or the addition then max(0, .)), and add_relu_into falls back to the two operations wherever the in-place
pass would differ (broadcasting, another dtype, autograd). What the rewrite cannot see is torch.fx's own limit: it
records `a += b` as `a = a + b`, so a forward that reads the tensor `a` named before the `+=` through another name
afterwards (expecting it changed) runs differently as a graph. Given an example input, fuse_graph runs the model and
the fused graph on it and refuses a graph whose output differs.
"""
from __future__ import annotations

import copy
import logging
import operator

import torch
import torch.fx
from torch import Tensor, nn

from ptd_sparse.nn import module_graph
from ptd_sparse.nn.activation_layout import keeps_channels_last
from ptd_sparse.nn.pooling import MaxPool2d, MaxPool2x2
from ptd_sparse.nn.sparse_conv2d import SparseConv2d

_logger = logging.getLogger("ptd_sparse")

# Leaves of the trace: the layers of an inference model, sparsify's included, as single call_module nodes.
_LEAVES = module_graph.LEAF_TYPES + (SparseConv2d, MaxPool2d, MaxPool2x2, nn.Identity)


def add_relu_into(conv_output: Tensor, other) -> Tensor:
    """max(0, conv_output + other), written into conv_output (a tensor nothing else reads) where that can be done in
    place (`other` a tensor of the same shape, dtype and device, no autograd): one pass on the CPU
    (torch.ops.aten._add_relu_, which has no GPU kernel), the addition and the ReLU in place elsewhere. Otherwise
    (broadcasting, type promotion, a number, autograd) computed out of place."""
    # Compared as shapes, not by torch.broadcast_shapes: that takes ~40 us a call, more than a batch-1 pass.
    in_place = (isinstance(other, Tensor) and conv_output.shape == other.shape and
                conv_output.dtype == other.dtype and conv_output.device == other.device and
                not (torch.is_grad_enabled() and (conv_output.requires_grad or other.requires_grad)))
    if not in_place:
        return torch.relu(conv_output + other)
    if conv_output.device.type == "cpu":
        return torch.ops.aten._add_relu_(conv_output, other)
    return conv_output.add_(other).relu_()


def to_channels_last(input):
    """A 4-D tensor input as channels_last (what the channels_last pre-hook of sparsify's models does), anything
    else as it is."""
    if isinstance(input, Tensor) and input.dim() == 4:
        return input.contiguous(memory_format=torch.channels_last)
    return input


# Leaves when a fused graph is traced again (each call node also carries meta["is_wrapped"], which its generated
# code needs to keep the call a leaf after pickling).
torch.fx.wrap("add_relu_into")
torch.fx.wrap("to_channels_last")


def _wrapped_call(graph: torch.fx.Graph, function, args: tuple) -> torch.fx.Node:
    node = graph.call_function(function, args)
    node.meta["is_wrapped"] = True
    return node


def _sole_reader(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _first_argument(node: torch.fx.Node):
    """A call's first positional argument (None where it has none: an input passed by keyword)."""
    return node.args[0] if node.args else None


def _has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks) or bool(nn.modules.module._global_forward_hooks)


def _is_plain_add(node: torch.fx.Node) -> bool:
    """A two-tensor addition without alpha or out."""
    if not module_graph.is_call(node, module_graph.ADD_FUNCTIONS) or node.kwargs or len(node.args) != 2:
        return False
    return all(isinstance(arg, torch.fx.Node) for arg in node.args)


class _Fuser:
    def __init__(self, model: nn.Module, graph: torch.fx.Graph):
        self.model, self.graph = model, graph
        self.calls = module_graph.module_calls(graph)
        self.fused_relus = self.fused_additions = 0

    def sparse_conv_output(self, node: torch.fx.Node) -> SparseConv2d | None:
        """The SparseConv2d whose sole-reader output `node` is (called once in the graph), else None."""
        module = module_graph.module_of(self.model, node)
        if isinstance(module, SparseConv2d) and self.calls[node.target] == 1 and len(node.users) == 1 \
                and not _has_forward_hooks(module):
            return module
        return None

    def drop_identities(self) -> None:
        for node in list(self.graph.nodes):
            # nn.Identity itself, not a subclass (whose forward may compute something).
            if type(module_graph.module_of(self.model, node)) is nn.Identity and len(node.args) == 1 \
                    and not node.kwargs:
                node.replace_all_uses_with(node.args[0])
                self.graph.erase_node(node)

    def fuse_relus(self) -> None:
        for node in list(self.graph.nodes):
            source = _first_argument(node)
            if not module_graph.is_relu(self.model, node) or source is None:
                continue
            conv = self.sparse_conv_output(source) if isinstance(source, torch.fx.Node) else None
            if conv is None or conv.max_pool is not None:
                continue
            conv.relu = True
            node.replace_all_uses_with(source)
            self.graph.erase_node(node)
            self.fused_relus += 1

    def convert_inputs_to_channels_last(self) -> None:
        """The channels_last pre-hook of a sparsify'd model as calls in the graph (a GraphModule's copies and pickles
        drop hooks)."""
        for node in [n for n in self.graph.nodes if n.op == "placeholder"]:
            with self.graph.inserting_after(node):
                converted = _wrapped_call(self.graph, to_channels_last, (node,))
            node.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)

    def fuse_additions(self) -> None:
        for node in list(self.graph.nodes):
            if not _is_plain_add(node):
                continue
            relu = _sole_reader(node)
            if relu is None or not module_graph.is_relu(self.model, relu) or _first_argument(relu) is not node:
                continue
            left, right = node.args
            # An in-place addition (+=, add_) writes into its left operand, which may have other readers: fused only
            # where that operand is the convolution's output.
            in_place = node.target in (operator.iadd, "add_")
            if self.sparse_conv_output(left) is not None:
                conv_output, other = left, right
            elif self.sparse_conv_output(right) is not None and not in_place:
                conv_output, other = right, left
            else:
                continue
            with self.graph.inserting_before(node):
                fused = _wrapped_call(self.graph, add_relu_into, (conv_output, other))
            relu.replace_all_uses_with(fused)
            self.graph.erase_node(relu)
            self.graph.erase_node(node)
            self.fused_additions += 1


def _output_in_eval_mode(model: nn.Module, example_input: Tensor):
    """model(example_input) without autograd and in eval mode (no BatchNorm statistics updated, no dropout drawn),
    the model's modes restored after."""
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            return model.eval()(example_input.clone())
    finally:
        for module, training in modes.items():
            module.training = training


def fuse_graph(model: nn.Module, example_input: Tensor | None = None, inplace: bool = False) -> torch.fx.GraphModule:
    """`model` (a sparsified model, ptd_sparse.sparsify; a copy unless inplace) as a torch.fx GraphModule whose
    forward has the ReLUs and residual additions fused that sparsify leaves separate (see the module docstring). The
    GraphModule holds the model's modules, under the same names, with their routes; a model whose inputs sparsify
    converts to channels_last keeps that (in the graph). With `example_input`, the fused forward's output on it is
    checked against the model's, both run in eval mode without autograd (ValueError where they differ: a forward
    whose in-place additions torch.fx cannot record). Raises ValueError where torch.fx cannot trace the model's
    forward."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a Tensor or None, got {type(example_input).__name__}")
    if example_input is not None:
        expected = _output_in_eval_mode(model, example_input)  # before an inplace rewrite changes any module
    target = model if inplace else copy.deepcopy(model)
    graph = module_graph.trace(target, _LEAVES)
    if graph is None:
        raise ValueError(f"fuse_graph: torch.fx cannot trace {type(model).__name__}.forward (data-dependent control "
                         f"flow?); run the model as sparsify returned it")
    fuser = _Fuser(target, graph)
    fuser.drop_identities()
    fuser.fuse_relus()
    fuser.fuse_additions()
    if keeps_channels_last(target):
        fuser.convert_inputs_to_channels_last()
    graph.lint()
    fused = torch.fx.GraphModule(target, graph, class_name=f"Fused{type(model).__name__}")
    fused.train(target.training)
    _logger.info("ptd_sparse.fuse_graph: %d ReLUs fused into SparseConv2d epilogues, %d residual additions fused "
                 "with their ReLU", fuser.fused_relus, fuser.fused_additions)
    if example_input is not None:
        got = _output_in_eval_mode(fused, example_input)
        try:
            # Routes may differ between the two calls (each measures a new shape), so float32 rounding may too.
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
        except AssertionError as difference:
            raise ValueError(f"fuse_graph: the fused graph of {type(model).__name__} computes another output than "
                             f"its forward on example_input (an in-place `+=` whose target is read afterwards "
                             f"under another name? torch.fx records it as an addition): {difference}") from None
    return fused


__all__ = ["add_relu_into", "fuse_graph", "to_channels_last"]
