"""The pipeline's parts: configuration, data, augmentation, models, pruning, student design, checkpoints, import."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from pipeline_helpers import fake_cifar10, fake_fashion_mnist, write_idx

from ptd_sparse import data
from ptd_sparse.pipeline import checkpoint, config, design, importing, models, pruning


# --- configuration -------------------------------------------------------------------------------------------------

def test_defaults_and_overrides():
    cfg = config.load_config(None, ["prune.targets=[0.59, 0.36]", "distill.alpha=0.5", "data.name=cifar10"])
    assert cfg.prune.targets == (0.36, 0.59)
    assert cfg.distill.alpha == 0.5 and cfg.data.name == "cifar10"


@pytest.mark.parametrize("override,match", [
    ("prune.target=0.5", "unknown key prune.target"),
    ("pruning.targets=[0.5]", r"unknown section \[pruning\]"),
    ("distill.alpha=1.5", r"distill.alpha must be a finite number in \[0, 1\]"),
    ("distill.temperature=0", "distill.temperature must be a finite number > 0"),
    ("prune.targets=[1.2]", "prune.targets must be a non-empty list"),
    ("prune.method=magic", "prune.method must be one of"),
    ("teacher.epochs=zero", "teacher.epochs must be a int"),
    ("distill.variants=['nope']", "distill.variants must be chosen from"),
    ("alpha", "an override must look like section.key=value"),
])
def test_bad_configuration_names_the_key(override, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load_config(None, [override])


def test_config_files_of_the_repository_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml")):
        config.load_config(path)


# --- data ----------------------------------------------------------------------------------------------------------

def test_fashion_mnist_loader_split_and_subset(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", train=500, test=100)
    ds = data.load_dataset("fashion_mnist", str(root), val_fraction=0.1, seed=3, train_subset=200)
    assert ds.train.images.shape == (200, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert len(ds.val) == 50 and len(ds.test) == 100 and ds.num_classes == 10
    again = data.load_dataset("fashion_mnist", str(root), val_fraction=0.1, seed=3, train_subset=200)
    assert torch.equal(ds.val.labels, again.val.labels)  # the split is seeded


def test_missing_and_corrupt_data_say_what_to_do(tmp_path):
    with pytest.raises(data.MissingDataError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_dataset("fashion_mnist", str(tmp_path))
    root = fake_fashion_mnist(tmp_path / "fm", train=50, test=20)
    write_idx(root / data.FASHION_MNIST_FILES["test_labels"], np.zeros((10,), np.uint8))
    raw = (root / data.FASHION_MNIST_FILES["train_images"]).read_bytes()
    import gzip

    truncated = gzip.compress(gzip.decompress(raw)[:-100])
    (root / data.FASHION_MNIST_FILES["train_images"]).write_bytes(truncated)
    with pytest.raises(ValueError, match="truncated"):
        data.load_dataset("fashion_mnist", str(root))
    with pytest.raises(ValueError, match="data.name must be one of"):
        data.load_dataset("mnist")


def test_cifar_batches_load_and_code_in_pickles_is_refused(tmp_path):
    root = fake_cifar10(tmp_path)
    ds = data.load_dataset("cifar10", str(root), val_fraction=0.2)
    assert ds.train.images.shape[1:] == (3, 32, 32) and len(ds.test) == 20

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        data.load_dataset("cifar10", str(root))


def test_batched_augmentation_matches_a_per_image_reference():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (9, 3, 7, 5), dtype=torch.uint8, generator=generator)
    aug = data.Augmentation(crop_padding=2, flip=True)
    views = data.sample_views(9, aug, generator)
    out = data.apply_views(images, views, 2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(9):
        y, x = int(views.crop_y[i]), int(views.crop_x[i])
        expected = padded[i, :, y:y + 7, x:x + 5]
        if views.flip[i]:
            expected = expected.flip(2)
        assert torch.equal(out[i], expected)


def test_distributed_shards_are_disjoint_and_equal():
    split = data.Split(torch.zeros(103, 1, 2, 2, dtype=torch.uint8), torch.arange(103))
    shards = [torch.cat([labels for _, _, labels in data.batches(split, 10, True, 0, 1, rank, 2)]) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


# --- models and pruning --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,channels", [("vgg11", 32, 3), ("vgg_fmnist", 28, 1), ("resnet18", 32, 3),
                                                ("mobilenetv2", 32, 3)])
def test_models_build_and_run(name, size, channels):
    model = models.build_model(name, in_channels=channels, num_classes=7, image_size=size).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)
    assert models.prunable_layers(model)


def test_rounds_follow_the_paper():
    assert [pruning.rounds_for(t) for t in (0.79, 0.59, 0.36)] == [7, 4, 2]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_to_is_exact_and_respects_skip(scope):
    torch.manual_seed(0)
    model = models.build_model("vgg_fmnist", in_channels=1, image_size=28)
    pruning.prune_to(model, 0.6, scope, skip=["features.0"])
    assert pruning.check_sparsity(model, 0.6, skip=["features.0"], tolerance=1e-4)
    assert model.features[0].density == 1.0
    if scope == "layer":
        for row in pruning.sparsity_table(model)[1:]:
            assert row.sparsity == pytest.approx(0.6, abs=1e-3)
    with pytest.raises(RuntimeError, match="pruning reached sparsity"):
        pruning.check_sparsity(model, 0.7, skip=["features.0"])
    with pytest.raises(ValueError, match="skip names layers that are not prunable"):
        pruning.prune_to(model, 0.5, skip=["nope"])


def test_pruning_is_cumulative_and_keeps_pruned_weights_pruned():
    torch.manual_seed(0)
    model = models.build_model("vgg_fmnist", in_channels=1, image_size=28)
    pruning.prune_to(model, 0.2)
    first = [m.mask.clone() for _, m in models.prunable_layers(model)]
    pruning.prune_to(model, 0.36)
    for before, (_, layer) in zip(first, models.prunable_layers(model)):
        assert not (layer.mask & ~before).any()  # nothing revived
        assert not layer.weight[~layer.mask].any()


# --- student design ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity,ratio", [(0.36, 0.64), (0.59, 0.41), (0.79, 0.21)])
def test_vgg19_student_parameter_ratios(sparsity, ratio):
    """CIFAR VGG19 pruned globally: the designed student holds about 1 - sparsity of the teacher's parameters."""
    torch.manual_seed(0)
    teacher = models.build_model("vgg19", in_channels=3, num_classes=100, image_size=32)
    pruning.prune_to(teacher, sparsity)
    plan, rows = design.design_student(teacher, in_channels=3)
    student = models.build_model("vgg19", plan, 3, 100, 32)
    measured = models.count_parameters(student) / models.count_parameters(teacher)
    assert measured == pytest.approx(ratio, abs=0.02)
    for row in rows:  # each layer holds about the teacher layer's nonzeros
        assert row.student_weights == pytest.approx(row.teacher_nonzeros, rel=0.05, abs=3 * 9 * 64)


def test_resnet18_student_is_designed_per_stage():
    torch.manual_seed(0)
    teacher = models.build_model("resnet18", in_channels=3, num_classes=10)
    pruning.prune_to(teacher, 0.79)
    plan, rows = design.design_student(teacher, in_channels=3, multiple=8, min_width=8)
    assert len(plan) == 4 and all(w % 8 == 0 for w in plan)
    student = models.build_model("resnet18", plan, 3, 10)
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    total = sum(r.teacher_nonzeros for r in rows)
    assert sum(r.student_weights for r in rows) == pytest.approx(total, rel=0.1)


def test_design_never_reaches_zero_width_and_designs_mobilenet():
    teacher = models.build_model("vgg_fmnist", in_channels=1, image_size=28)
    pruning.prune_to(teacher, 0.999)
    plan, _ = design.design_student(teacher, in_channels=1, min_width=2)
    assert all(w >= 2 for w in plan if w != models.POOL)
    # MobileNetV2's widths need a width map (its expansion layers), built by rewriting the model's widths.
    plan, _ = design.design_student(models.build_model("mobilenetv2"), in_channels=3)
    student = models.build_model("mobilenetv2", plan)
    assert isinstance(plan, dict) and student(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# --- checkpoints and import ----------------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_refusals(tmp_path):
    spec = {"name": "vgg_fmnist", "plan": models.default_plan("vgg_fmnist"), "in_channels": 1, "num_classes": 10,
            "image_size": 28}
    model = models.build_model(**spec)
    pruning.prune_to(model, 0.5)
    checkpoint.save_model(model, tmp_path / "m", spec)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["masks.safetensors", "model.json",
                                                                  "weights.safetensors"]
    loaded, _ = checkpoint.load_model(tmp_path / "m")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read the checkpoint"):
        checkpoint.load_model(tmp_path / "m")
    checkpoint.save_model(model, tmp_path / "m", spec)
    checkpoint.write_json(tmp_path / "m" / "model.json", {**spec, "plan": [8, "M", 8, "M", 8, "M"]})
    with pytest.raises(checkpoint.CheckpointError, match="does not match vgg_fmnist"):
        checkpoint.load_model(tmp_path / "m")


def test_torch_prune_state_dicts_import(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("vgg_fmnist", in_channels=1, image_size=28)
    layers = [(m, "weight") for _, m in models.prunable_layers(model)]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=0.7)
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    sparsity = importing.import_state_dict_file(tmp_path / "pruned.pt", "vgg_fmnist", 1, 10, 28, tmp_path / "out")
    assert sparsity == pytest.approx(0.7, abs=1e-3)
    imported, _ = checkpoint.load_model(tmp_path / "out")
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(imported.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)
