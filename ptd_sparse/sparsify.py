"""sparsify(model): turn a pruned model into its fast inference form.

A convolution counts as pruned when it is a MaskedConv2d (its `mask` buffer) or carries a mask from
torch.nn.utils.prune (`weight_orig` and `weight_mask`). For each one:
- A BatchNorm2d that takes its output (and is its only reader) is folded into its weights and bias (with the running
  statistics: inference only), and a ReLU that is the BatchNorm's only reader is fused into the kernel's epilogue;
  both modules become nn.Identity. The pattern is found in the model's torch.fx trace (ptd_sparse.nn.module_graph),
  wherever it is: in an nn.Sequential, or in a forward such as torchvision's `self.relu(self.bn1(self.conv1(x)))`.
  Only modules change; the model's own forward stays as it is. So a BatchNorm called at two places, or a ReLU
  module or function that is also applied elsewhere (torchvision's blocks apply one `self.relu` after bn1 and again
  after the addition) is left to run on its own: the BatchNorm is then not folded, the ReLU not fused. A model fx
  cannot trace falls back to the nn.Sequential scan (a BatchNorm2d directly after the convolution in one).
- It becomes a SparseConv2d with the folded weights. With the automatic backend, each of its inference calls runs
  the fastest of the sparse kernel and the dense F.conv2d (NCHW or channels_last), measured on the first call of
  each batch-size bucket on the real input (ptd_sparse.nn.measured_route): no density constant decides, and no
  layer takes more than 1/0.9 times its dense form's time (measured_route.DENSE_MARGIN: on a CPU a dense route holds
  a dense copy of the weight, so it must take at most 90% of the sparse kernel's time). A backend given to sparsify
  always runs.
- Grouped and depthwise convolutions become grouped SparseConv2d layers (the same sparse kernels, see
  ptd_sparse.pattern). Layers SparseConv2d cannot express (asymmetric or non-zero padding) stay as they are, noted
  in the log.
- Max-pools in floor mode without indices become MaxPool2x2 (2x2, stride 2) or MaxPool2d (any other window): the
  same values; torch's NCHW max_pool2d on CPUs is several times slower (10-30x on a ResNet stem's 3x3 pool), a
  large share of a sparse network's time once its convolutions run sparse. A max-pool that is the only reader of a
  folded Conv-BN(-ReLU) chain (a ResNet stem's, a VGG block's last) moves into the SparseConv2d (its `max_pool`)
  and becomes nn.Identity: the kernel then pools in its epilogue where it can, and never writes the full-size
  output (SparseConv2d's docstring). Only the fx trace shows that a pool is the only reader: a model fx cannot trace
  keeps its pools as modules.
- Other modules pruned with torch.nn.utils.prune (a Linear head) keep weight_orig * weight_mask as a plain weight,
  instead of a hook recomputing it on every forward (with inplace=True, the caller's modules lose their pruning
  re-parametrisation: torch.nn.utils.prune.remove then finds nothing to remove).
- With memory_format=torch.channels_last the model converts its 4-D inputs to channels_last once and every layer
  keeps that layout (ptd_sparse.nn.activation_layout): the dense routes then convert nothing.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from ptd_sparse.nn import module_graph
from ptd_sparse.nn.activation_layout import keep_channels_last, wants_channels_last
from ptd_sparse.nn.masked_conv2d import MaskedConv2d
from ptd_sparse.nn.pooling import MaxPool2d, MaxPool2x2
from ptd_sparse.nn.sparse_conv2d import SparseConv2d, explicit_padding
from ptd_sparse.route_plan import apply_routes

_logger = logging.getLogger("ptd_sparse")


def pruned_weight_and_mask(conv: nn.Conv2d) -> tuple[Tensor, Tensor] | None:
    """(weight * mask, mask) of a pruned convolution, or None if it carries no mask."""
    if isinstance(conv, MaskedConv2d):
        return conv.weight * conv.mask, conv.mask
    if hasattr(conv, "weight_orig") and hasattr(conv, "weight_mask"):  # torch.nn.utils.prune
        return conv.weight_orig * conv.weight_mask, conv.weight_mask
    return None


def _plain_batch_norm(module) -> bool:
    """Exactly nn.BatchNorm2d: a subclass may do more in its forward (timm's BatchNormAct2d applies an activation
    too), which folding into the convolution would drop."""
    return type(module) is nn.BatchNorm2d


def fold_batch_norm(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weights and bias of conv followed by bn (running statistics): w * g / s, (b - mean) * g / s + beta."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale[:, None, None, None], (bias - bn.running_mean) * scale + shift


def _copy(model: nn.Module) -> nn.Module:
    """deepcopy, except that torch.nn.utils.prune's computed `weight` (a non-leaf tensor, which deepcopy refuses) is
    copied detached; the prune hook recomputes it from weight_orig * weight_mask on the next forward anyway."""
    memo = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "weight_mask") and isinstance(weight, Tensor) and not weight.is_leaf:
            memo[id(weight)] = weight.detach().clone()
    return copy.deepcopy(model, memo)


def _bake_prune_masks(model: nn.Module) -> None:
    """Make torch.nn.utils.prune's masks permanent in the modules sparsify keeps (a pruned nn.Linear head, a
    convolution left dense): its hook recomputes weight = weight_orig * weight_mask on every forward, 0.2 ms of a
    batch-1 ResNet18's 14 ms for the 1000 x 512 head alone (2 cores, Zen 4); afterwards weight is that product."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)


def _convert(name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, backend: str | None):
    """The inference module replacing conv (and bn, relu), or None to leave conv alone."""
    found = pruned_weight_and_mask(conv)
    if found is None:
        return None
    if explicit_padding(conv) is None:
        _logger.warning("ptd_sparse.sparsify: %s stays as it is (padding=%r, padding_mode=%r)", name,
                        conv.padding, conv.padding_mode)
        return None
    weight, mask = found
    bias = conv.bias
    if bn is not None:
        weight, bias = fold_batch_norm(weight, bias, bn)
    template = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv),
                         conv.dilation, conv.groups, bias=False, device="meta")
    template.weight = nn.Parameter(weight.detach())
    template.bias = nn.Parameter(bias.detach()) if bias is not None else None
    sparse = SparseConv2d.from_conv(template, mask, backend=backend)
    sparse.relu = relu
    return sparse


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _only_module_reader(node, calls, accepts):
    """node's only reader where that is a module call, of a module called once, that `accepts` (a node), else None."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and calls[users[0].target] == 1 and accepts(users[0]):
        return users[0]
    return None


def _graph_patterns(model: nn.Module) -> list[tuple[str, str | None, str | None, str | None]] | None:
    """(conv, bn or None, relu module or None, max-pool module or None) qualified names of the Conv-BN(-ReLU)(-MaxPool)
    chains that module replacement can fold, read from the fx trace; None when the model cannot be traced. A chain
    qualifies when each module is called once and each step is the previous one's only reader; the pool is one that
    MaxPool2d computes exactly (floor mode, no indices). A fused ReLU that is a function call (F.relu) stays in
    forward: applying it again to the fused output changes nothing, but the call is not removed, so it is not fused."""
    graph = module_graph.trace(model)
    if graph is None:
        return None
    calls = module_graph.module_calls(graph)
    found = []
    for node in graph.nodes:
        conv = module_graph.module_of(model, node)
        if not isinstance(conv, nn.Conv2d) or calls[node.target] != 1:
            continue
        users = list(node.users)
        bn_node = users[0] if len(users) == 1 else None
        bn = module_graph.module_of(model, bn_node) if bn_node is not None else None
        if not _plain_batch_norm(bn) or calls[bn_node.target] != 1 or bn.num_features != conv.out_channels:
            found.append((node.target, None, None, None))
            continue
        relu = _only_module_reader(bn_node, calls, lambda reader: module_graph.is_relu(model, reader))
        pool = _only_module_reader(bn_node if relu is None else relu, calls,
                                   lambda reader: MaxPool2d.replaces(module_graph.module_of(model, reader)))
        found.append((node.target, bn_node.target, None if relu is None else relu.target,
                      None if pool is None else pool.target))
    return found


def _fold_sequential(target: nn.Module, backend: str | None, handled: set) -> None:
    """The fallback for models fx cannot trace: Conv-BN(-ReLU) runs inside nn.Sequential containers. Max-pools stay
    where they are: without a trace, nothing shows that the pool is the ReLU's only reader (a forward that runs
    `features[:6]` reads the activation between the ReLU and the pool)."""
    for parent_name, parent in list(target.named_modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            following = [c for _, c in children[i + 1:i + 3]]
            if not isinstance(child, nn.Conv2d) or not following or not _plain_batch_norm(following[0]):
                continue
            relu = len(following) > 1 and isinstance(following[1], nn.ReLU)
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = _convert(full_name, child, following[0], relu, backend)
            if new is None:
                continue
            setattr(parent, child_name, new)
            setattr(parent, children[i + 1][0], nn.Identity())
            if relu:
                setattr(parent, children[i + 2][0], nn.Identity())
            handled.add(id(new))


def _fold_traced(target: nn.Module, patterns: list, backend: str | None, fuse_pools: bool, handled: set) -> None:
    for conv_name, bn_name, relu_name, pool_name in patterns:
        if bn_name is None:
            continue
        new = _convert(conv_name, target.get_submodule(conv_name), target.get_submodule(bn_name),
                       relu_name is not None, backend)
        if new is None:
            continue
        _replace(target, conv_name, new)
        _replace(target, bn_name, nn.Identity())
        if relu_name is not None:
            _replace(target, relu_name, nn.Identity())
        if fuse_pools and pool_name is not None:
            new.max_pool = MaxPool2d.of(target.get_submodule(pool_name))
            _replace(target, pool_name, nn.Identity())
        handled.add(id(new))


@torch.no_grad()
def sparsify(model: nn.Module, inplace: bool = False, backend: str | None = None,
             fold_bn: bool = True, fast_pooling: bool = True, routes=None, memory_format=None) -> nn.Module:
    """Return `model` (a copy unless inplace) in inference form, in eval mode: pruned convolutions stored sparse
    (or dense where measured faster), BatchNorm folded and ReLU fused where they follow a pruned convolution (found
    in the fx trace, see the module docstring), max-pools in floor mode as MaxPool2x2 (2x2)
    or MaxPool2d (other windows), or fused into the convolution they follow (fast_pooling).

    routes: how each SparseConv2d picks its inference route (ptd_sparse.nn.measured_route). None or "measure":
    timed on the first call of each shape bucket (bounded). "density": the deterministic density rule, for results
    that must not depend on timings. A route name ("sparse", "dense", "dense_channels_last", "dense_prepacked"):
    that route everywhere. A plan saved by ptd_sparse.save_route_plan (its path or the dict): the saved routes, no
    measurement.

    memory_format: None keeps the caller's layout; torch.channels_last converts the model's 4-D inputs to
    channels_last on entry and keeps every activation so (faster where layers run dense on oneDNN: docs/benchmarks.md,
    "Whole network"; 4-D outputs come back channels_last; a forward that calls `.view` on 4-D activations needs
    reshape instead)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    channels_last = wants_channels_last(memory_format)
    target = (model if inplace else _copy(model)).eval()
    handled = set()
    if fold_bn:
        patterns = _graph_patterns(target)
        if patterns is None:
            _logger.info("ptd_sparse.sparsify: torch.fx cannot trace %s; folding BatchNorm only inside nn.Sequential",
                         type(target).__name__)
            _fold_sequential(target, backend, handled)
        else:
            _fold_traced(target, patterns, backend, fast_pooling, handled)
    for name, module in list(target.named_modules()):
        if isinstance(module, nn.Conv2d) and id(module) not in handled:
            new = _convert(name, module, None, False, backend)
            if new is not None:
                _replace(target, name, new)
    _bake_prune_masks(target)
    if fast_pooling:
        for name, module in list(target.named_modules()):
            if MaxPool2x2.replaces(module):
                _replace(target, name, MaxPool2x2())
            elif MaxPool2d.replaces(module):
                _replace(target, name, MaxPool2d.of(module))
    target.eval()  # the modules put in above too: an inference model holds what its routes read (SparseConv2d)
    apply_routes(target, routes)
    return keep_channels_last(target) if channels_last else target
