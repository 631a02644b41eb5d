"""ptd_sparse.export and `ptd export`: pruned models to ONNX with the pruned weights as zeros, run in ONNX Runtime
against PyTorch (skipped when the `export` extra, onnx and onnxruntime, is absent)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import ptd_sparse
from ptd_sparse import cli
from ptd_sparse.nn import MaskedConv2d, MaskedLinear, SparseConv2d
from ptd_sparse.onnx_export import ExportError, _check, dense_copy
from ptd_sparse.pipeline.checkpoint import save_model
from ptd_sparse.pipeline.models import build_model

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def masked_net(generator: torch.Generator) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          MaskedConv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), MaskedLinear(32, 5))
    for module in model.modules():
        if isinstance(module, (MaskedConv2d, MaskedLinear)):
            module.set_mask(torch.rand(module.weight.shape, generator=generator) < 0.3)
    model[1].running_mean.uniform_(-0.5, 0.5, generator=generator)
    return model


def ort_output(path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def file_weights(path) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def test_masked_modules_export_as_plain_layers_with_zeros(tmp_path, generator):
    model = masked_net(generator).train()
    x = torch.randn(4, 3, 8, 8, generator=generator)
    result = ptd_sparse.export(model, tmp_path / "m.onnx", x)
    pruned = sum(int((~m.mask).sum()) for m in model.modules() if isinstance(m, (MaskedConv2d, MaskedLinear)))
    assert result.max_abs_error is not None and result.max_abs_error <= 1e-4
    assert result.zeros >= pruned and result.weights == sum(m.weight.numel() for m in model.modules()
                                                            if isinstance(m, (MaskedConv2d, MaskedLinear)))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Conv" in ops and not any(op.startswith("ptd") for op in ops)
    # The batch dimension is dynamic: another batch size runs and matches.
    other = torch.randn(7, 3, 8, 8, generator=generator)
    with torch.no_grad():
        expected = model.eval()(other)
    np.testing.assert_allclose(ort_output(tmp_path / "m.onnx", other), expected.numpy(), atol=1e-4, rtol=0)
    # The caller's model is left as it was: masked layers and its mode.
    assert isinstance(model[0], MaskedConv2d)


def test_the_caller_model_keeps_its_training_mode(tmp_path, generator):
    model = masked_net(generator).train()
    ptd_sparse.export(model, tmp_path / "m.onnx", torch.randn(2, 3, 8, 8, generator=generator))
    assert model.training and model[1].training


def test_torch_prune_hooks_fold_into_zeros(tmp_path, generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # twice: one PruningContainer hook
    prune.random_unstructured(model[3], "weight", amount=0.8)
    mask_zeros = int((model[0].weight_mask == 0).sum() + (model[3].weight_mask == 0).sum())
    x = torch.randn(3, 3, 6, 6, generator=generator)
    result = ptd_sparse.export(model, tmp_path / "p.onnx", x)
    assert result.max_abs_error <= 1e-4
    assert result.zeros >= mask_zeros
    conv_weight = [w for w in file_weights(tmp_path / "p.onnx").values() if w.shape == (6, 3, 3, 3)][0]
    np.testing.assert_array_equal(conv_weight == 0, (model[0].weight_mask == 0).numpy())
    assert hasattr(model[0], "weight_orig")  # the caller's hooks stay


def test_dense_copy_has_no_masked_layers(generator):
    dense = dense_copy(masked_net(generator))
    assert not any(isinstance(m, (MaskedConv2d, MaskedLinear)) for m in dense.modules())
    assert not dense.training


def test_a_run_model_folder_exports_and_the_cli_writes_it(tmp_path, generator, capsys):
    model = build_model("vgg_fmnist", [8, "M", 8, "M"], in_channels=1, image_size=28)
    for module in model.modules():
        if isinstance(module, (MaskedConv2d, MaskedLinear)):
            module.set_mask(torch.rand(module.weight.shape, generator=generator) < 0.5)
    spec = {"name": "vgg_fmnist", "plan": [8, "M", 8, "M"], "in_channels": 1, "num_classes": 10, "image_size": 28}
    save_model(model, tmp_path / "model", spec)
    result = ptd_sparse.export(tmp_path / "model", tmp_path / "a.onnx")
    assert result.max_abs_error <= 1e-4 and result.zeros > 0
    assert cli.main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "b.onnx")]) == 0
    assert "weights zero" in capsys.readouterr().out
    x = torch.randn(2, 1, 28, 28, generator=generator)
    with torch.no_grad():
        expected = model.eval()(x)
    np.testing.assert_allclose(ort_output(tmp_path / "b.onnx", x), expected.numpy(), atol=1e-4, rtol=0)


def test_the_cli_reports_a_missing_folder(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_the_check_sees_a_different_output(tmp_path, generator):
    model = masked_net(generator)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    ptd_sparse.export(model, tmp_path / "m.onnx", x, check=False)
    other = masked_net(torch.Generator().manual_seed(99))
    with pytest.raises(ExportError, match="differs from PyTorch's"):
        _check(other, tmp_path / "m.onnx", x, 1e-4)


def test_bad_arguments_are_named(tmp_path, generator):
    model = masked_net(generator)
    with pytest.raises(TypeError, match="example_input"):
        ptd_sparse.export(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset_version"):
        ptd_sparse.export(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), opset_version=3)
    with pytest.raises(ValueError, match="atol"):
        ptd_sparse.export(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), atol=float("nan"))
    with pytest.raises(ExportError, match="cannot export"):  # the exporter's own refusal, named
        ptd_sparse.export(model, tmp_path / "m.onnx", torch.randn(1, 3, 9, 9))
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ExportError, match="before sparsify"):
        ptd_sparse.export(nn.Sequential(SparseConv2d.from_conv(conv)), tmp_path / "s.onnx", torch.randn(1, 3, 8, 8))
    assert not list(tmp_path.iterdir())
