"""Any dataset: data.factory (the user's torch Datasets) and data.image_folder, streamed through a DataLoader.

The streaming path must give what the in-memory path gives on the same data: the same batches in the same order
(shuffled by seed and epoch, sharded by rank), the same trained weights, the same cached teacher logits; and a
training interrupted on it resumes exactly. The factories are in tests/any_dataset_factory.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ptd_sparse import cli
from ptd_sparse.cache import CacheError, TeacherCache, build_cache, make_spec
from ptd_sparse.data import (Augmentation, DataError, Dataset, Split, StreamSplit, batches, dataset_identity,
                             open_dataset)
from ptd_sparse.pipeline import caching, stages
from ptd_sparse.pipeline.config import ConfigError, DataConfig, load_config
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.training import Context, Distillation, Schedule, fit

TESTS = Path(__file__).resolve().parent
FACTORY = "any_dataset_factory:squares"
TINY_PLAN = ["data.batch_size=64", "teacher.epochs=1", "prune.targets=[0.36]", "prune.epochs=1", "distill.epochs=1",
             "run.seeds=1", "run.progress=false", "data.train_subset=0"]


def settings(*overrides: str) -> DataConfig:
    return load_config(None, [f"data.factory={FACTORY!r}".replace("'", '"'), "data.workers=0",
                              "data.train_subset=0", *overrides]).data


def args(command: str, out: Path, *overrides: str) -> list[str]:
    result = [command, "--out", str(out)]
    for override in [f'data.factory="{FACTORY}"', "data.workers=0"] + TINY_PLAN + list(overrides):
        result += ["--set", override]
    return result


def in_memory_twin(dataset: Dataset) -> Dataset:
    """The same splits, images and normalisation held in memory as Splits (the built-in data sets' path)."""
    def held(split: StreamSplit) -> Split:
        images, labels = split.read(range(len(split)))
        return Split(images, labels)

    return Dataset("twin", held(dataset.train), held(dataset.val), held(dataset.test), dataset.num_classes,
                   dataset.mean, dataset.std)


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("vgg_fmnist", [8, "M", 16, "M"], in_channels=1, num_classes=10, image_size=28)


@pytest.fixture(scope="module")
def streamed():
    sys.path.insert(0, str(TESTS))  # the factory module, as the working directory would be for a user
    return open_dataset(settings(), seed=0)


def test_factory_data_set_is_split_and_described_like_a_built_in_one(streamed):
    assert isinstance(streamed.train, StreamSplit)
    assert (len(streamed.train), len(streamed.val), len(streamed.test)) == (270, 30, 60)  # val_fraction 0.1 of 300
    assert (streamed.num_classes, streamed.in_channels, streamed.image_size) == (10, 1, 28)
    assert streamed.class_names[:2] == ["class_0", "class_1"]
    twin = in_memory_twin(streamed)
    scaled = twin.train.images.float() / 255  # the in-memory path's statistics (load_dataset)
    torch.testing.assert_close(streamed.mean, scaled.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(streamed.std, scaled.std(dim=(0, 2, 3)))
    identity = dataset_identity(streamed)
    assert identity["name"] == FACTORY and identity["samples"] == 270 and identity["shape"] == [1, 28, 28]
    other = open_dataset(settings("data.factory_kwargs={train = 301}"), seed=0)
    assert dataset_identity(other)["sha256"] != identity["sha256"]
    assert dataset_identity(open_dataset(settings(), seed=0)) == identity


def test_batches_are_the_in_memory_ones_in_every_epoch_rank_and_worker_count(streamed):
    twin = in_memory_twin(streamed)
    with_workers = open_dataset(settings("data.workers=2"), seed=0)
    for epoch, rank, world in ((0, 0, 1), (3, 0, 1), (1, 0, 2), (1, 1, 2)):
        expected = list(batches(twin.train, 64, True, 5, epoch, rank, world))
        for dataset in (streamed, with_workers):
            got = list(batches(dataset.train, 64, True, 5, epoch, rank, world))
            assert len(got) == len(expected)
            for (index, images, labels), (e_index, e_images, e_labels) in zip(got, expected):
                assert torch.equal(index, e_index) and torch.equal(images, e_images) and torch.equal(labels, e_labels)
    shards = [torch.cat([b[0] for b in batches(streamed.train, 64, True, 5, 1, r, 2)]) for r in (0, 1)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())  # DDP ranks read disjoint shards


def test_float_images_are_taken_in_zero_one(streamed):
    floats = open_dataset(settings("data.factory_kwargs={as_float = true}"), seed=0)
    assert floats.train.dtype == torch.float32
    torch.testing.assert_close(floats.mean, streamed.mean, atol=1e-5, rtol=1e-5)


def test_training_matches_in_memory_and_resumes_exactly(streamed, tmp_path):
    schedule = Schedule(epochs=2, lr=0.05, weight_decay=5e-4, batch_size=64, kind="onecycle")
    results = {}
    for name, dataset in (("stream", streamed), ("memory", in_memory_twin(streamed))):
        model = small_model()
        ctx = Context(dataset, Augmentation(2, True), torch.device("cpu"), seed=1, progress=False)
        results[name] = (fit(model, ctx, schedule, tmp_path / f"{name}.pt", name), model.state_dict())
    assert results["stream"][0] == results["memory"][0]
    for key, value in results["memory"][1].items():
        assert torch.equal(results["stream"][1][key], value), key

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    ctx = Context(streamed, Augmentation(2, True), torch.device("cpu"), seed=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(small_model(), ctx, schedule, tmp_path / "resumed.pt", "resumed", on_epoch_end=interrupt)
    resumed = small_model()
    assert fit(resumed, ctx, schedule, tmp_path / "resumed.pt", "resumed") == results["stream"][0]
    for key, value in results["stream"][1].items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_cache_on_the_streaming_path_equals_the_in_memory_one_and_is_read_by_index(streamed, tmp_path):
    teacher = small_model(3).eval()
    augmentation = Augmentation(2, True)
    spec = make_spec("teacher", streamed, augmentation, views=3, chunk=100)
    chunks = []
    with pytest.raises(KeyboardInterrupt):  # an interrupted precompute resumes with the missing chunks
        build_cache(tmp_path / "stream", teacher, streamed, spec, batch_size=64, sparse=False,
                    on_chunk=lambda c: chunks.append(c) or (_ for _ in ()).throw(KeyboardInterrupt))
    cache = build_cache(tmp_path / "stream", teacher, streamed, spec, batch_size=64, sparse=False)
    twin = in_memory_twin(streamed)
    reference = build_cache(tmp_path / "memory", teacher, twin, make_spec("teacher", twin, augmentation, views=3,
                                                                          chunk=100), batch_size=64, sparse=False)
    everything = torch.arange(len(streamed.train))
    for epoch in range(3):
        assert torch.equal(cache.teacher(everything, epoch), reference.teacher(everything, epoch))
        views, expected = cache.views(everything, epoch), reference.views(everything, epoch)
        assert torch.equal(views.crop_y, expected.crop_y) and torch.equal(views.flip, expected.flip)
    # Distillation on the streaming path reads the cached logits of each batch's samples by position.
    ctx = Context(streamed, augmentation, torch.device("cpu"), seed=2, progress=False)
    schedule = Schedule(epochs=1, lr=0.05, weight_decay=5e-4, batch_size=64)
    from_cache = fit(small_model(), ctx, schedule, tmp_path / "a.pt", "a", Distillation(None, 0.9, 4.0, cache))
    live = fit(small_model(), ctx, schedule, tmp_path / "b.pt", "b", Distillation(teacher, 0.9, 4.0, cache))
    assert abs(from_cache["best_val_acc"] - live["best_val_acc"]) <= 2 / len(streamed.val)


def test_a_cache_of_other_data_is_refused(streamed, tmp_path):
    other = open_dataset(settings("data.factory_kwargs={train = 280}"), seed=0)
    stored = make_spec("t" * 64, streamed, Augmentation(2, True))
    expected = make_spec("t" * 64, other, Augmentation(2, True))
    differences = caching.cache_differences(stored, expected, load_config())
    assert len(differences) == 1 and "the data set" in differences[0]
    assert f"{FACTORY} train (270 samples" in differences[0] and f"{FACTORY} train (252 samples" in differences[0]
    cache = build_cache(tmp_path / "c", small_model().eval(), streamed, make_spec("t", streamed, Augmentation(),
                                                                                    chunk=128), sparse=False)
    with pytest.raises(CacheError, match="does not match: dataset"):
        cache.expect(dataset=dataset_identity(other))


def test_ptd_run_on_a_factory_data_set_with_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    assert cli.main(args("run", out, "distill.variants=['kd_pruned']", "cache.enabled=true",
                         "teacher.model='any_dataset_factory:tiny_cnn'", "student.model='any_dataset_factory:tiny_cnn'",
                         "student.plan=[]", "student.kwargs={width = 4}", "data.workers=1")) == 0
    cache = TeacherCache(out / "cache" / "sparsity_0.36")
    assert cache.spec.samples == 270 and cache.spec.dataset["name"] == FACTORY
    done = json.loads((out / "students" / "kd_pruned_0.36" / "seed_0" / "done.json").read_text())
    assert done["epochs"] == 1 and 0 <= done["test_acc"] <= 1
    assert "KD from the pruned teacher" in capsys.readouterr().out


def write_image_folder(root: Path, size=(24, 20)) -> Path:
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for part, classes, count in (("train", ("cat", "dog", "emu"), 6), ("val", ("dog", "emu"), 2)):
        for label, name in enumerate(classes):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / part / name / f"{i}.png")
    return root


def test_image_folder_is_resized_labelled_and_trained_on(tmp_path, capsys):
    pytest.importorskip("torchvision")
    root = write_image_folder(tmp_path / "images")
    data = load_config(None, [f'data.image_folder="{root}"', "data.image_size=16", "data.val_fraction=0.2",
                              "data.workers=0", "data.train_subset=0"]).data
    dataset = open_dataset(data, seed=0)
    assert dataset.class_names == ["cat", "dog", "emu"] and dataset.num_classes == 3
    assert dataset.train.shape == (3, 16, 16) and dataset.train.dtype == torch.uint8
    assert (len(dataset.train) + len(dataset.val), len(dataset.test)) == (18, 4)
    # val/ lacks "cat": its classes keep train/'s indices (dog 1, emu 2).
    assert sorted(dataset.test.read(range(4))[1].tolist()) == [1, 1, 2, 2]
    identity = dataset_identity(dataset)
    assert identity["name"] == f"image_folder:{root.resolve()}"
    (root / "train" / "cat" / "0.png").write_bytes((root / "train" / "cat" / "1.png").read_bytes() + b"\0")
    assert dataset_identity(open_dataset(data, seed=0))["sha256"] != identity["sha256"]  # a changed file
    out = tmp_path / "run"
    command = ["train", "--out", str(out), "--set", f'data.image_folder="{root}"', "--set", "data.image_size=16",
               "--set", "data.workers=0", "--set", "data.val_fraction=0.2", "--set", "teacher.plan=[8, 'M']",
               "--set", "teacher.epochs=1", "--set", "data.batch_size=8", "--set", "run.progress=false",
               "--set", "data.train_subset=0"]
    assert cli.main(command) == 0
    spec = json.loads((out / "teacher" / "model" / "model.json").read_text())
    assert (spec["in_channels"], spec["num_classes"], spec["image_size"]) == (3, 3, 16)
    # What a deployment of the model needs to prepare its input (ONNX Runtime): data.json in the run directory.
    record = json.loads((out / "data.json").read_text())
    assert record["input"]["shape"] == [1, 3, 16, 16] and record["class_names"] == ["cat", "dog", "emu"]
    assert len(record["mean"]) == len(record["std"]) == 3 and "center crop of 16x16" in record["resize"]


@pytest.mark.parametrize("overrides,message", [
    (["data.factory='no_such_module_xyz:make'"], "data.factory no_such_module_xyz:make: cannot import"),
    (["data.factory='any_dataset_factory:missing'"], "any_dataset_factory has no callable missing"),
    (["data.factory='any_dataset_factory:not_a_pair'"], "it must return (train, test)"),
    (["data.factory='any_dataset_factory:strings'"], "yields a str, not an (image, label) pair"),
    (["data.factory='any_dataset_factory:numpy_images'"], "yields a ndarray image"),
    (["data.factory='any_dataset_factory:bad_labels'"], "yields a label of type str"),
    (["data.factory='any_dataset_factory:random_transforms'"], "its transforms are random"),
    (["data.num_classes=20"], "data.num_classes is 20 but data.factory"),
    (["data.mean=[0.5, 0.5]", "data.std=[0.2, 0.2]"], "data.mean has 2 values; the images have 1 channels"),
])
def test_bad_factories_are_refused_naming_the_key(overrides, message):
    sys.path.insert(0, str(TESTS))
    with pytest.raises(DataError) as error:
        open_dataset(settings(*overrides), seed=0)
    assert message in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    (['data.factory="a:b"', 'data.image_folder="x"'], "name two data sources"),
    (['data.factory="nocolon"'], "data.factory must be package.module:function"),
    (["data.mean=[0.5]", "data.std=[0.2]"], "data.mean is for data.factory and data.image_folder"),
    (['data.factory="a:b"', "data.mean=[0.5]"], "data.mean and data.std go together"),
    (['data.factory="a:b"', "data.mean=[0.5]", "data.std=[0.0]"], "data.std must be positive"),
    (["data.workers=-1"], "data.workers must be an integer >= 0"),
    (['data.factory="a:b"', "data.image_size=32"], "data.image_size resizes data.image_folder's images"),
])
def test_bad_data_settings_are_configuration_errors(overrides, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_missing_folders_and_mismatched_models_are_refused(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    monkeypatch.syspath_prepend(str(TESTS))
    with pytest.raises(DataError, match="is not a folder"):
        open_dataset(load_config(None, [f'data.image_folder="{tmp_path / "none"}"']).data, 0)
    (tmp_path / "flat" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"must hold train/ and test/ \(or val/\)"):
        open_dataset(load_config(None, [f'data.image_folder="{tmp_path / "flat"}"']).data, 0)
    # A factory model built for 5 classes on 10-class data: one line naming the key, before any training.
    assert cli.main(args("train", tmp_path / "run", "teacher.model='any_dataset_factory:tiny_cnn'",
                         "teacher.kwargs={num_classes = 5}")) == 2
    err = capsys.readouterr().err
    assert "teacher.model gives outputs [2, 5] for a batch of 2 but the data have 10 classes" in err
    assert cli.main(args("train", tmp_path / "run2", "teacher.model='any_dataset_factory:tiny_cnn'",
                         "teacher.kwargs={in_channels = 3}")) == 2
    assert "teacher.model does not take the data's images [N, 1, 28, 28]" in capsys.readouterr().err


def test_ddp_two_ranks_train_and_cache_on_a_factory_data_set(tmp_path, streamed):
    """torchrun with two gloo ranks: the teacher trains on disjoint shards of the streamed data, then the ranks write
    disjoint chunks of one cache, which holds what one process writes."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "ptd_sparse.cli"]
    overrides = ("teacher.epochs=2", "data.workers=1", "distill.variants=['kd_unpruned']", "cache.chunk=100")
    for command in ("train", "cache"):
        result = subprocess.run(torchrun + args(command, out, *overrides), capture_output=True, text=True, env=env,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 wrote 170 views" in result.stderr and "rank 1 wrote 100 views" in result.stderr  # chunks 0, 2 | 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r and "event" not in r] == [1, 2]  # once, by rank 0
    assert json.loads((out / "teacher" / "done.json").read_text())["epochs"] == 2
    sharded = TeacherCache(out / "cache" / "teacher")
    assert sharded.spec.dataset == dataset_identity(streamed)
    teacher, _ = stages.load_model(out / "teacher" / "model")
    single = build_cache(tmp_path / "single", teacher, streamed, sharded.spec)
    everything = torch.arange(sharded.spec.samples)
    torch.testing.assert_close(sharded.teacher(everything, 0).float(), single.teacher(everything, 0).float(),
                               atol=2e-3, rtol=2e-3)
