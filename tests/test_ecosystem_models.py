"""torchvision's ResNet18 and MobileNetV2 and a timm model through the whole flow at toy size: pruned with
torch.nn.utils.prune, `ptd import`, pruned further, a student designed and distilled a few steps, sparsified, and
exported to ONNX. Skipped when the `vision` extra (torchvision, timm) is absent."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import ptd_sparse
from ptd_sparse import cli
from ptd_sparse.nn import MaskedConv2d
from ptd_sparse.pipeline.checkpoint import load_model
from ptd_sparse.pipeline.pruning import achieved_sparsity, prune_to

SIZE = 16  # toy images: the models are the real ones, the data is not

CASES = [
    pytest.param("torchvision", "torchvision.models:resnet18", {"num_classes": 10}, id="torchvision_resnet18"),
    pytest.param("torchvision", "torchvision.models:mobilenet_v2", {"num_classes": 10, "width_mult": 0.25},
                 id="torchvision_mobilenet_v2"),
    pytest.param("timm", "timm:create_model", {"model_name": "test_resnet", "num_classes": 10}, id="timm_test_resnet"),
    # timm's BatchNormAct2d (BatchNorm and activation in one module) is left unfolded by sparsify.
    pytest.param("timm", "timm:create_model", {"model_name": "test_efficientnet", "num_classes": 10},
                 id="timm_test_efficientnet"),
]


@pytest.fixture(autouse=True)
def _dense_route(monkeypatch):
    """The flow is under test here, not the kernels (tested on their own): the dense route keeps it quick."""
    monkeypatch.setenv("PTD_BACKEND", "dense")


def toml_table(kwargs: dict) -> str:
    return "{" + ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in kwargs.items()) + "}"


@pytest.mark.parametrize("package,factory,kwargs", CASES)
def test_import_prune_design_distill_sparsify_export(package, factory, kwargs, tmp_path, capsys):
    pytest.importorskip(package)
    pytest.importorskip("onnxruntime")
    module_name, function = factory.split(":")
    torch.manual_seed(0)
    user = getattr(__import__(module_name, fromlist=[function]), function)(**kwargs)
    convs = [(m, "weight") for m in user.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0.5)
    torch.save(user.state_dict(), tmp_path / "pruned.pt")

    # import: the user's torch.nn.utils.prune state dict becomes a model folder with the same masks
    assert cli.main(["import", str(tmp_path / "pruned.pt"), "--model", factory, "--kwargs", toml_table(kwargs),
                     "--image-size", str(SIZE), "--out", str(tmp_path / "model")]) == 0
    teacher, spec = load_model(tmp_path / "model")
    imported = dict(teacher.named_modules())
    for name, conv in user.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert isinstance(imported[name], MaskedConv2d)
            assert torch.equal(imported[name].mask, conv.weight_mask.bool()), name

    # prune further, globally
    prune_to(teacher, 0.8)
    assert achieved_sparsity(teacher) == pytest.approx(0.8, abs=1e-3)
    teacher.eval()

    # design: a ready student, narrower than the teacher
    design = ptd_sparse.design_student(teacher, 3)
    student = design.module
    student_weights = sum(m.weight.numel() for m in student.modules() if isinstance(m, nn.Conv2d))
    assert student_weights < sum(m.weight.numel() for m in teacher.modules() if isinstance(m, nn.Conv2d))

    # distill a few steps from the pruned teacher
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, SIZE, SIZE, generator=g), torch.arange(4)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    before = [p.detach().clone() for p in student.parameters()]
    for _ in range(2):
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = ptd_sparse.kd_loss(student(x), teacher_logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))

    # sparsify: the inference form computes what the pruned teacher computes
    with torch.no_grad():
        expected = teacher(x)
        inference = ptd_sparse.sparsify(teacher, backend="dense")(x)
    torch.testing.assert_close(inference, expected, atol=1e-4 * max(1.0, float(expected.abs().max())), rtol=0)

    # export: ONNX with the pruned weights as zeros, checked in ONNX Runtime
    result = ptd_sparse.export(teacher, tmp_path / "teacher.onnx", x)
    assert result.max_abs_error <= 1e-4 * max(1.0, float(expected.abs().max()))
    pruned = sum(int((~m.mask).sum()) for m in teacher.modules() if isinstance(m, MaskedConv2d))
    assert result.zeros >= pruned
