"""A pruned model to ONNX: plain Conv2d and Linear layers whose pruned weights are stored as zeros, checked in ONNX
Runtime against PyTorch.

Accepted: a module with MaskedConv2d / MaskedLinear layers, a module pruned with torch.nn.utils.prune (its hooks are
folded into the weights of a copy), or a model folder of a run (model.json + weights; runs/<out>/teacher/model,
runs/<out>/prune/<sparsity>/model, runs/<out>/students/.../model, or one written by `ptd import`). The file is what
ONNX Runtime, TensorRT, OpenVINO and DeepSparse read; sparse engines find the zeros themselves.

The exporter is torch.onnx's TorchScript-based one (dynamo=False): it needs only the onnx package and works offline,
where the torch.export-based exporter (torch.onnx.export's default) also needs onnxscript. sparsify's output holds
the package's own operators, which ONNX does not know: export the pruned model instead (sparsify is a PyTorch
inference form).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from ptd_sparse.files import atomic_write
from ptd_sparse.nn import MaskedConv2d, MaskedLinear, SparseConv2d

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-4  # float32: a few hundred products summed in another order differ by ~1e-6 relative


class ExportError(ValueError):
    """The model cannot be exported, or ONNX Runtime's output differs from PyTorch's."""


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    max_abs_error: float | None  # ONNX Runtime against PyTorch on the example input; None when not checked
    zeros: int  # weights stored as zeros in the file's Conv and Gemm/MatMul initialisers
    weights: int


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every MaskedConv2d / MaskedLinear replaced by nn.Conv2d / nn.Linear holding
    weight * mask, and every torch.nn.utils.prune reparametrisation removed (weight = weight_orig * weight_mask)."""
    if any(isinstance(module, SparseConv2d) for module in model.modules()):
        raise ExportError("the model holds SparseConv2d layers (sparsify's output), whose operators ONNX does not "
                          "know; export the pruned model before sparsify")
    memo = {}
    for module in model.modules():  # torch.nn.utils.prune's computed weight is a non-leaf: deepcopy refuses it
        for tensor in module.__dict__.values():
            if isinstance(tensor, Tensor) and not tensor.is_leaf:
                memo[id(tensor)] = tensor.detach().clone()
    dense = copy.deepcopy(model, memo).eval()
    for module in dense.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)  # a PruningContainer (pruned twice) is one hook too
    for name, module in list(dense.named_modules()):
        if isinstance(module, MaskedConv2d):
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.groups, module.bias is not None,
                              module.padding_mode, device=module.weight.device, dtype=module.weight.dtype)
        elif isinstance(module, MaskedLinear):
            plain = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                              device=module.weight.device, dtype=module.weight.dtype)
        else:
            continue
        with torch.no_grad():
            plain.weight.copy_(module.weight * module.mask.to(module.weight.dtype))
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, plain.eval())
    return dense


def export(model: nn.Module | str | Path, path: str | Path, example_input: Tensor | None = None, *,
           opset_version: int = DEFAULT_OPSET, check: bool = True, atol: float = DEFAULT_ATOL) -> OnnxExport:
    """Write `model` (a module, or a run's model folder) to the ONNX file `path`, pruned weights as zeros.

    example_input: an input batch [N, C, H, W] to trace with (needed for a module; a model folder's default is one
    image of its recorded shape). The batch dimension of the file is dynamic. check=True (default) runs the file in
    ONNX Runtime (the `export` extra) on the example input and raises ExportError when its output differs from the
    PyTorch model's by more than atol * max(1, max |output|). Returns the path, the measured error and the count of
    zero weights in the file.
    """
    if isinstance(model, (str, Path)):
        from ptd_sparse.pipeline.checkpoint import load_model

        model, spec = load_model(Path(model))
        if example_input is None:
            example_input = torch.randn(1, spec["in_channels"], spec["image_size"], spec["image_size"],
                                        generator=torch.Generator().manual_seed(0))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a model folder, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError("example_input must be a tensor of the model's input shape, e.g. torch.randn(1, 3, 32, 32); "
                        f"got {type(example_input).__name__}")
    if type(opset_version) is not int or opset_version < 9:
        raise ValueError(f"opset_version must be an int >= 9, got {opset_version!r}")
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol > 0):
        raise ValueError(f"atol must be a finite number > 0, got {atol!r}")
    try:
        import onnx
    except ImportError as error:
        raise ImportError("ONNX export needs the onnx package: pip install 'ptd-sparse[export]'") from error
    path = Path(path)
    dense = dense_copy(model)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (module docstring); its deprecation notices say nothing the
        # caller can act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        try:
            atomic_write(path, lambda tmp: torch.onnx.export(
                dense, (example_input,), tmp, dynamo=False, opset_version=opset_version, input_names=["input"],
                output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}))
        except torch.onnx.OnnxExporterError as error:
            raise ExportError(f"torch.onnx cannot export this model: {error}") from error
    zeros, weights = _count_zeros(onnx.load(str(path)))
    error = _check(model, path, example_input, atol) if check else None
    return OnnxExport(path, error, zeros, weights)


def _count_zeros(graph_model) -> tuple[int, int]:
    from onnx import numpy_helper

    weight_names = {node.input[1] for node in graph_model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
                    and len(node.input) > 1}
    zeros = weights = 0
    for initializer in graph_model.graph.initializer:
        if initializer.name in weight_names:
            array = numpy_helper.to_array(initializer)
            zeros += int((array == 0).sum())
            weights += int(array.size)
    return zeros, weights


def _check(model: nn.Module, path: Path, example_input: Tensor, atol: float) -> float:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("checking the exported file needs onnxruntime: pip install 'ptd-sparse[export]', or pass "
                          "check=False") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example_input.detach().cpu().numpy()})
    training = model.training
    try:
        with torch.no_grad():
            expected = model.eval()(example_input)
    finally:
        model.train(training)
    expected = [expected] if isinstance(expected, Tensor) else list(expected)
    error = 0.0
    for want, have in zip(expected, got, strict=True):
        want = want.detach().cpu().double()
        difference = float((torch.from_numpy(have).double() - want).abs().max()) if want.numel() else 0.0
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        if not difference <= atol * scale:
            raise ExportError(f"ONNX Runtime's output differs from PyTorch's by {difference:.3g} (allowed "
                              f"{atol * scale:.3g}) in {path}")
        error = max(error, difference)
    return error
