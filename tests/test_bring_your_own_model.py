"""Bring your own model, at toy size: a torchvision-style ResNet18 and a MobileNetV2 written outside the package
(examples/user_models.py), pruned with torch.nn.utils.prune, go through `ptd import` -> the pipeline's prune, design
and distill stages (configs/byo_resnet18_fmnist.toml with tiny overrides) -> sparsify, whose logits match the dense
model's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides
from torch import nn

import ptd_sparse
from ptd_sparse import cli
from ptd_sparse.nn import SparseConv2d
from ptd_sparse.pipeline import factories
from ptd_sparse.pipeline.checkpoint import CheckpointError, load_model
from ptd_sparse.pipeline.pruning import achieved_sparsity

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "resnet18": ("examples.user_models:resnet18", "{num_classes = 10, in_channels = 1, base_width = 8}",
                 "{num_classes = 10, in_channels = 1, base_width = 4}"),
    "mobilenet_v2": ("examples.user_models:mobilenet_v2", "{num_classes = 10, in_channels = 1, width_mult = 0.25}",
                     "{num_classes = 10, in_channels = 1, width_mult = 0.2}"),
}


@pytest.fixture
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # the factories' package is found from the working directory, as `ptd` users run it


def torch_pruned_state(factory: str, kwargs: str, amount: float) -> dict:
    import tomllib

    factories.trust(factory)
    model = factories.call_factory(factory, tomllib.loads(f"k = {kwargs}")["k"])
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=amount)
    return model.state_dict()


@pytest.mark.parametrize("which", sorted(MODELS))
def test_import_prune_design_distill_sparsify(which, tmp_path, in_repository, capsys):
    factory, teacher_kwargs, student_kwargs = MODELS[which]
    state = torch_pruned_state(factory, teacher_kwargs, 0.2)
    assert any(k.endswith("weight_orig") for k in state) and any(k.endswith("weight_mask") for k in state)
    torch.save(state, tmp_path / "pruned.pt")
    imported = tmp_path / "imported"
    assert cli.main(["import", str(tmp_path / "pruned.pt"), "--model", factory, "--kwargs", teacher_kwargs,
                     "--in-channels", "1", "--image-size", "28", "--out", str(imported)]) == 0
    model, spec = load_model(imported)
    assert spec["name"] == factory and spec["kwargs"]["in_channels"] == 1
    # The torch.nn.utils.prune masks arrive as the pipeline's masks (the linear layer, unpruned, counts as dense).
    pruned = sum(int((v == 0).sum()) for k, v in state.items() if k.endswith("weight_mask"))
    assert sum(int((m.mask == 0).sum()) for m in model.modules() if hasattr(m, "mask")) == pruned
    assert f"sparsity {achieved_sparsity(model):.4f}" in capsys.readouterr().out

    root = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "configs" / "byo_resnet18_fmnist.toml"), "--out", str(out)]
    for override in tiny_run_overrides(root) + [
            f"teacher.model={json.dumps(factory)}", f"teacher.kwargs={teacher_kwargs}",
            f"student.model={json.dumps(factory)}", f"student.kwargs={student_kwargs}",
            f"teacher.checkpoint={json.dumps(str(imported))}", "distill.variants=['student_ce', 'designed_kd_pruned']"]:
        args += ["--set", override]
    assert cli.main(args) == 0
    assert json.loads((out / "teacher" / "done.json").read_text())["imported"] == str(imported)
    designs = json.loads((out / "design" / "students.json").read_text())
    assert isinstance(designs["sparsity_0.59"]["plan"], dict)  # a width map of the user's layers
    assert designs["sparsity_0.59"]["student_parameters"] < designs["sparsity_0.36"]["student_parameters"]
    student, student_spec = load_model(out / "students" / "designed_kd_pruned_0.59" / "seed_0" / "model")
    assert student_spec["name"] == factory and student_spec["plan"] == designs["sparsity_0.59"]["plan"]

    # The pruned teacher in inference form: every convolution sparse, every BatchNorm folded, the same logits.
    teacher, _ = load_model(out / "prune" / "sparsity_0.59" / "model")
    teacher.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = teacher(x)
        sparse = ptd_sparse.sparsify(teacher)
        torch.testing.assert_close(sparse(x), expected, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())
    assert sum(isinstance(m, SparseConv2d) for m in sparse.modules()) == \
        sum(isinstance(m, nn.Conv2d) for m in teacher.modules())
    assert student(x).shape == (4, 10)


def test_untrusted_factory_in_a_model_folder_is_refused(tmp_path, in_repository):
    factory, kwargs, _ = MODELS["resnet18"]
    torch.save(torch_pruned_state(factory, kwargs, 0.1), tmp_path / "pruned.pt")
    assert cli.main(["import", str(tmp_path / "pruned.pt"), "--model", factory, "--kwargs", kwargs,
                     "--in-channels", "1", "--out", str(tmp_path / "imported")]) == 0
    spec = json.loads((tmp_path / "imported" / "model.json").read_text())
    spec["name"] = "os:system"
    (tmp_path / "imported" / "model.json").write_text(json.dumps(spec))
    with pytest.raises((CheckpointError, factories.FactoryError), match="not named"):
        load_model(tmp_path / "imported")


def test_bad_factories_are_refused(in_repository):
    for name, message in (("examples.user_models:no_such", "no callable"), ("no_such_package.x:f", "cannot import"),
                          ("examples.user_models:MODELS", "no callable")):
        factories.trust(name)
        with pytest.raises(factories.FactoryError, match=message):
            factories.call_factory(name)
    with pytest.raises(factories.FactoryError, match="package.module:function"):
        factories.trust("resnet18")
