"""The data flow between a model's layers, read from a torch.fx trace: what sparsify and design_student need to know
about a model they did not build (a torchvision-style ResNet whose blocks add tensors in `forward`, a MobileNetV2,
a model that concatenates branches).

Convolutions, BatchNorms, activations and linear layers (any nn.Conv2d subclass included, MaskedConv2d too) are
traced as leaves: the graph shows each call of them, the additions, concatenations and the functions between them.
For a model fx cannot trace symbolically (data-dependent control flow in forward) `trace` returns None and the
caller falls back to what it can do without a graph (sparsify: the nn.Sequential scan; design_student: the zoo's
own rules, or a refusal that says why).
"""
from __future__ import annotations

import logging
import operator
from collections import Counter

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger("ptd_sparse")

LEAF_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.ReLU6)

# Calls that add or concatenate tensors (which then must agree in width, or whose widths add up).
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, "add", "add_"}
CAT_FUNCTIONS = {torch.cat, torch.concat, "cat"}
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf_types: tuple = LEAF_TYPES):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaf_types) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, leaf_types: tuple = LEAF_TYPES) -> torch.fx.Graph | None:
    """The fx graph of `model`'s forward with its layers (`leaf_types`, and torch.nn's own modules) as leaves
    (call_module nodes named by their qualified module names), or None when fx cannot trace it (the reason goes to
    the debug log)."""
    try:
        return _LeafTracer(leaf_types).trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        _logger.debug("ptd_sparse: torch.fx cannot trace %s: %s", type(model).__name__, error)
        return None


def is_call(node: torch.fx.Node, functions) -> bool:
    """Whether `node` is a call_function or call_method of one of `functions` (functions or method names)."""
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in functions
    return False


def module_calls(graph: torch.fx.Graph) -> Counter:
    """How often each module (by qualified name) is called in the graph: a module called twice cannot be rewritten
    for one of its call sites alone."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def module_of(model: nn.Module, node: torch.fx.Node) -> nn.Module | None:
    return model.get_submodule(node.target) if node.op == "call_module" else None


def is_relu(model: nn.Module, node: torch.fx.Node) -> bool:
    """A plain ReLU: the nn.ReLU module or the relu function/method (not ReLU6: its clamp at 6 is not fused)."""
    if node.op == "call_module":
        return type(module_of(model, node)) is nn.ReLU
    return is_call(node, RELU_FUNCTIONS)
