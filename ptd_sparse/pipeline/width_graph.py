"""Which convolutions must share an output width, read from the model's fx trace (ptd_sparse.nn.module_graph).

Every tensor between layers carries its channels as a list of width variables (one per concatenated part). A
convolution with groups=1 starts a new variable; ties join variables into one width group:
- an addition (or other elementwise product of two tensors) joins its operands' variables: added tensors must have
  equal widths (residual connections);
- a depthwise convolution (groups = C_in = C_out) outputs its input's variable: its width is its input's;
- a concatenation along channels keeps its parts' variables side by side: the reader of the concatenation reads
  their sum;
- a convolution inside a residual block (strictly between the tensor the block forks from and the addition that
  joins it, not itself an addend) joins the block's group with its teacher proportion: a basic block's inner width
  equals its stage width (ratio 1), an inverted residual's expansion keeps its ratio (6). Without this tie a stage's
  blocks would depend on each other in a cycle; with it each residual stage is one group, as the paper's rule wants.
Within a group every variable keeps its teacher proportion to the group's base width w, so the dense weights of the
group's convolutions are a quadratic in w (a residual stage) or linear (a chain), solved against the group's teacher
nonzeros (ptd_sparse.pipeline.design).

What cannot be modelled is refused with the reason: grouped convolutions other than depthwise, depthwise with a
channel multiplier, a model fx cannot trace.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from ptd_sparse.nn import module_graph

IMAGE = 0  # the variable of the model's input channels (fixed: the data's channels)

_NO_CHANNELS = {"size", "dim", "numel", "shape", "dtype", "device"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}


class WidthGraphError(ValueError):
    """The model's widths cannot be designed generically; the message says why."""


@dataclass
class ConvUse:
    """One convolution: its qualified name, the variable of its output and those of its input's parts."""

    name: str
    out: int
    inputs: tuple[int, ...]
    area: int  # kernel height * width
    depthwise: bool
    nonzeros: int


@dataclass
class WidthGraph:
    teacher_width: dict[int, int]  # variable -> teacher channels
    parent: dict[int, int]
    convs: list[ConvUse] = field(default_factory=list)
    bns: dict[str, tuple[int, ...]] = field(default_factory=dict)  # BatchNorm name -> its input's variables
    linears: dict[str, tuple[int, ...]] = field(default_factory=dict)  # Linear name -> its input's variables
    residual: set = field(default_factory=set)  # roots of groups joined by an addition

    def root(self, var: int) -> int:
        while self.parent[var] != var:
            self.parent[var] = self.parent[self.parent[var]]
            var = self.parent[var]
        return var

    def union(self, a: int, b: int) -> int:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return ra
        if IMAGE in (ra, rb):
            raise WidthGraphError("the model adds its input image to a computed tensor; its width cannot change")
        keep, drop = min(ra, rb), max(ra, rb)  # the earlier variable stays the root: groups are named by first use
        self.parent[drop] = keep
        if drop in self.residual:
            self.residual.discard(drop)
            self.residual.add(keep)
        return keep

    def new_var(self, width: int) -> int:
        var = len(self.parent)
        self.parent[var] = var
        self.teacher_width[var] = width
        return var

    def groups(self) -> list[tuple[int, list[ConvUse]]]:
        """(root, its convolutions) of every group that a convolution writes, ordered by first convolution."""
        order: dict[int, list[ConvUse]] = {}
        for conv in self.convs:
            order.setdefault(self.root(conv.out), []).append(conv)
        return list(order.items())


def _nnz(conv: nn.Conv2d) -> int:
    mask = getattr(conv, "mask", None)
    if mask is None:
        mask = getattr(conv, "weight_mask", None)  # torch.nn.utils.prune
    if mask is None:
        return int((conv.weight != 0).sum())
    return int((mask != 0).sum())


def _channel_dim(node: torch.fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim in (1, -3)


def analyse(model: nn.Module, in_channels: int) -> WidthGraph:
    """The width variables, ties and convolutions of `model` (see the module docstring); raises WidthGraphError
    for what cannot be modelled."""
    graph = module_graph.trace(model)
    if graph is None:
        raise WidthGraphError(f"torch.fx cannot trace {type(model).__name__} (data-dependent control flow in "
                              "forward?); design its student by hand")
    widths = WidthGraph({IMAGE: in_channels}, {IMAGE: IMAGE})
    channels: dict[torch.fx.Node, tuple[int, ...] | None] = {}
    adds: list[torch.fx.Node] = []

    def parts(arg) -> tuple[int, ...] | None:
        return channels.get(arg) if isinstance(arg, torch.fx.Node) else None

    for node in graph.nodes:
        out = None
        if node.op == "placeholder":
            out = (IMAGE,) if not channels else None
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            source = parts(node.args[0]) if node.args else None
            if isinstance(module, nn.Conv2d):
                if source is None:
                    raise WidthGraphError(f"cannot follow the channels reaching {node.target}")
                depthwise = module.groups > 1 and module.groups == module.in_channels
                if module.groups > 1 and not depthwise:
                    raise WidthGraphError(f"{node.target} is a grouped convolution (groups={module.groups}) that is "
                                          "not depthwise; its width rule is not modelled")
                if depthwise and module.out_channels != module.in_channels:
                    raise WidthGraphError(f"{node.target} is depthwise with a channel multiplier "
                                          f"({module.in_channels} -> {module.out_channels}); not modelled")
                if depthwise and len(source) != 1:
                    raise WidthGraphError(f"{node.target} is depthwise over a concatenation; not modelled")
                var = source[0] if depthwise else widths.new_var(module.out_channels)
                widths.convs.append(ConvUse(node.target, var, source, module.kernel_size[0] * module.kernel_size[1],
                                            depthwise, _nnz(module)))
                out = (var,)
            elif isinstance(module, nn.Linear):
                widths.linears[node.target] = source
            elif isinstance(module, nn.BatchNorm2d):
                widths.bns[node.target] = source
                out = source
            elif sum(1 for _ in module.parameters(recurse=True)) and not isinstance(module, nn.Linear):
                raise WidthGraphError(f"{node.target} ({type(module).__name__}) holds parameters whose shapes "
                                      "depend on widths in a way this rule does not know")
            else:
                out = source  # activations, pooling, dropout, flatten: channels pass through
        elif node.op in ("call_function", "call_method"):
            if node.target in _NO_CHANNELS or node.target is getattr:
                out = None
            elif module_graph.is_call(node, module_graph.CAT_FUNCTIONS):
                pieces = [parts(a) for a in node.args[0]]
                if any(p is None for p in pieces):
                    raise WidthGraphError(f"cannot follow the channels of every part of {node.name}")
                if _channel_dim(node):
                    out = tuple(v for p in pieces for v in p)
                else:
                    for p in pieces[1:]:
                        _join(widths, pieces[0], p, node)
                    out = pieces[0]
            else:
                tensors = [parts(a) for a in list(node.args) + list(node.kwargs.values())
                           if parts(a) is not None]
                if len(tensors) >= 2 and (module_graph.is_call(node, module_graph.ADD_FUNCTIONS) or
                                          module_graph.is_call(node, _PRODUCTS)):
                    for other in tensors[1:]:
                        _join(widths, tensors[0], other, node)
                    for var in tensors[0]:
                        widths.residual.add(widths.root(var))
                    adds.append(node)
                out = tensors[0] if tensors else None
        channels[node] = out
    _tie_residual_blocks(graph, widths, adds, channels)
    return widths


def _join(widths: WidthGraph, a: tuple[int, ...], b: tuple[int, ...], node: torch.fx.Node) -> None:
    if len(a) != len(b):
        raise WidthGraphError(f"{node.name} combines tensors made of different concatenations; not modelled")
    for x, y in zip(a, b):
        widths.union(x, y)


def _tie_residual_blocks(graph: torch.fx.Graph, widths: WidthGraph, adds: list, channels: dict) -> None:
    order = {node: i for i, node in enumerate(graph.nodes)}
    ancestors: dict[torch.fx.Node, set] = {}
    for node in graph.nodes:
        seen = {node}
        for parent in node.all_input_nodes:
            seen |= ancestors[parent]
        ancestors[node] = seen
    convs = {conv.name: conv for conv in widths.convs}
    for add in adds:
        operands = [a for a in add.all_input_nodes if channels.get(a) is not None]
        common = set.intersection(*(ancestors[a] for a in operands))
        fork = max(common, key=order.get)
        group = widths.root(channels[add][0])
        for node in ancestors[add]:
            if order[fork] < order[node] < order[add] and node.op == "call_module" and node.target in convs \
                    and fork in ancestors[node]:
                conv = convs[node.target]
                if conv.depthwise or widths.root(conv.out) in widths.residual:
                    continue
                widths.union(conv.out, group)
