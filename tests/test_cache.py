"""Teacher-logit caches: round trip, top-k accounting, refusal of mismatched / truncated / corrupt stores, resume
after an interruption, two ranks writing one store under torchrun, and replay of the cached views in distillation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pipeline_helpers import fake_fashion_mnist, tiny_run_overrides

from ptd_sparse import cli, kd_loss
from ptd_sparse.cache import (CacheError, TeacherCache, build_cache, dataset_identity, dense_equivalent, make_spec,
                              teacher_fingerprint)
from ptd_sparse.cache.precompute import _records
from ptd_sparse.cache.store import CacheSpec
from ptd_sparse.cache.topk import TopKTeacher
from ptd_sparse.pipeline.checkpoint import save_model
from ptd_sparse.data import Augmentation, apply_views, load_dataset, normalize
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.pruning import prune_to
from ptd_sparse.pipeline.training import Context, Distillation, Schedule, fit

AUGMENTATION = Augmentation(2, True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = fake_fashion_mnist(tmp_path_factory.mktemp("fm"), train=300, test=40)
    return load_dataset("fashion_mnist", str(root))  # 270 training samples after the validation split


def pruned_teacher(seed: int = 0, sparsity: float = 0.9):
    torch.manual_seed(seed)
    model = build_model("vgg_fmnist", in_channels=1, image_size=28).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding them is exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    prune_to(model, sparsity)
    return model


def spec_for(teacher, dataset, **options) -> CacheSpec:
    options = {"views": 3, "chunk": 100, **options}
    return make_spec(teacher_fingerprint(teacher), dataset, AUGMENTATION, **options)


def live_logits(teacher, dataset, cache: TeacherCache, index: torch.Tensor, epoch: int) -> torch.Tensor:
    views = cache.views(index, epoch)
    with torch.no_grad():
        return teacher(normalize(apply_views(dataset.train.images[index], views, AUGMENTATION.crop_padding), dataset))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_round_trip_full_logits_match_the_teacher_on_the_stored_views(tmp_path, dataset, dtype, tolerance):
    teacher = pruned_teacher()
    spec = spec_for(teacher, dataset, dtype=dtype)
    cache = build_cache(tmp_path / "c", teacher, dataset, spec, batch_size=64)
    assert cache.spec == spec and spec.samples == len(dataset.train) == 270 and spec.chunks == 3
    index = torch.tensor([0, 99, 100, 269, 7])
    for epoch in range(4):  # epoch 3 wraps around to view slot 0
        out = cache.teacher(index, epoch)
        assert out.dtype == getattr(torch, dtype) and out.shape == (5, 10)
        torch.testing.assert_close(out.float(), live_logits(teacher, dataset, cache, index, epoch), atol=tolerance,
                                   rtol=tolerance)
    views = [cache.views(torch.arange(270), epoch) for epoch in range(3)]
    for v in views:
        assert 0 <= int(v.crop_y.min()) and int(v.crop_y.max()) <= 4 and int(v.crop_x.max()) <= 4
    assert not torch.equal(views[0].crop_y, views[1].crop_y)  # each slot holds its own view
    assert 0.3 < float(views[0].flip.float().mean()) < 0.7
    assert torch.equal(cache.views(index, 3).crop_x, cache.views(index, 0).crop_x)
    assert cache.nbytes() == 270 * 3 * (3 + 10 * {"float32": 4, "float16": 2, "bfloat16": 2}[dtype])


def test_without_augmentation_one_identity_view(tmp_path, dataset):
    teacher = pruned_teacher()
    spec = make_spec(teacher_fingerprint(teacher), dataset, Augmentation(0, False), views=1, dtype="float32")
    cache = build_cache(tmp_path / "c", teacher, dataset, spec)
    index = torch.arange(10)
    views = cache.views(index, 5)
    assert int(views.crop_y.abs().sum()) == 0 and not bool(views.flip.any())
    with torch.no_grad():
        expected = teacher(normalize(dataset.train.images[index], dataset))
    torch.testing.assert_close(cache.teacher(index, 5), expected, atol=1e-4, rtol=1e-4)


def test_topk_accounting_rest_mass_and_storage(tmp_path, dataset):
    teacher = pruned_teacher()
    temperature = 4.0
    spec = spec_for(teacher, dataset, form="topk", k=3, temperature=temperature, dtype="float32")
    cache = build_cache(tmp_path / "c", teacher, dataset, spec)
    index = torch.tensor([3, 150, 269])
    top = cache.teacher(index, 1)
    assert isinstance(top, TopKTeacher) and top.indices.dtype == torch.int32 and top.rest_mass.dtype == torch.float32
    full = live_logits(teacher, dataset, cache, index, 1)
    probabilities = torch.softmax(full.double() / temperature, 1)
    torch.testing.assert_close(top.indices.long(), full.topk(3, 1).indices)
    torch.testing.assert_close(top.rest_mass.double(), 1 - probabilities.gather(1, top.indices.long()).sum(1),
                               atol=1e-5, rtol=0)
    # The densified top-k teacher keeps the full teacher's probabilities on the listed classes and spreads the rest.
    equivalent = torch.softmax(dense_equivalent(top, 10, temperature).double() / temperature, 1)
    torch.testing.assert_close(equivalent.gather(1, top.indices.long()), probabilities.gather(1, top.indices.long()),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(equivalent.sum(1), torch.ones(3, dtype=torch.float64))
    # kd_loss sees the same teacher through either form.
    student = torch.randn(3, 10, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    dense_loss = kd_loss(student, dense_equivalent(top, 10, temperature), labels, temperature=temperature)
    torch.testing.assert_close(kd_loss(student, top, labels, temperature=temperature), dense_loss, atol=1e-5,
                               rtol=1e-5)
    # Storage: top-10 of 100 classes with fp16 logits and the rest mass costs at most 100 bytes per view.
    hundred = CacheSpec(teacher="x", dataset={}, samples=1000, views=5, crop_padding=4, flip=True, view_seed=0,
                        classes=100, form="topk", dtype="float16", k=10, temperature=10.0, rest_mass=True)
    assert hundred.bytes_per_view() == 3 + 10 * 4 + 10 * 2 + 4 <= 100


def test_topk_indices_are_exact_past_2048_classes():
    classes = 5000  # float16 holds integers exactly only up to 2048: indices must never be stored in it
    logits = torch.full((2, 1, classes), -5.0)
    logits[0, 0, 4097], logits[1, 0, 2049], logits[1, 0, 4999] = 3.0, 2.0, 1.0
    spec = CacheSpec(teacher="x", dataset={}, samples=2, views=1, crop_padding=0, flip=False, view_seed=0,
                     classes=classes, form="topk", dtype="float16", k=2, temperature=2.0, rest_mass=True)
    records = _records(spec, logits, np.zeros((2, 1, 3), dtype=np.uint8))
    assert records["indices.bin"].dtype == np.int32
    assert records["indices.bin"][0, 0, 0] == 4097 and sorted(records["indices.bin"][1, 0]) == [2049, 4999]


def test_topk_cache_refuses_another_temperature_full_cache_does_not(tmp_path, dataset):
    teacher = pruned_teacher()
    fingerprint = teacher_fingerprint(teacher)
    topk = build_cache(tmp_path / "t", teacher, dataset, spec_for(teacher, dataset, form="topk", k=3,
                                                                  temperature=4.0))
    topk.expect(teacher=fingerprint, temperature=4.0)
    with pytest.raises(CacheError, match=r"rest mass was computed at T=4.0, the loss uses T=10.0"):
        topk.expect(teacher=fingerprint, temperature=10.0)
    renormalised = build_cache(tmp_path / "r", teacher, dataset, spec_for(teacher, dataset, form="topk", k=3,
                                                                          rest_mass=False))
    assert renormalised.teacher(torch.tensor([0]), 0).rest_mass is None
    renormalised.expect(temperature=10.0)  # the renormalised teacher does not depend on T
    full = build_cache(tmp_path / "f", teacher, dataset, spec_for(teacher, dataset))
    full.expect(teacher=fingerprint, temperature=10.0)


def test_mismatched_cache_is_refused(tmp_path, dataset):
    teacher = pruned_teacher()
    folder = tmp_path / "c"
    spec = spec_for(teacher, dataset)
    cache = build_cache(folder, teacher, dataset, spec)
    other = pruned_teacher()
    prune_to(other, 0.95)  # the same weights, other masks: another teacher
    assert teacher_fingerprint(other) != spec.teacher
    with pytest.raises(CacheError, match="does not match: teacher: cache has"):
        cache.expect(teacher=teacher_fingerprint(other))
    subset = dataset.train.subset(torch.arange(269))
    shrunk = type(dataset)(dataset.name, subset, dataset.val, dataset.test, dataset.num_classes, dataset.mean,
                           dataset.std)
    with pytest.raises(CacheError, match="dataset: cache has"):
        cache.expect(dataset=dataset_identity(shrunk))
    with pytest.raises(CacheError, match="flip: cache has True, expected False"):
        cache.expect(flip=False)
    with pytest.raises(CacheError, match=f"{folder} holds a cache of something else .*teacher: stored"):
        build_cache(folder, other, dataset, spec_for(other, dataset))
    with pytest.raises(CacheError, match="views: stored 3, expected 5"):
        build_cache(folder, teacher, dataset, spec_for(teacher, dataset, views=5))


def test_truncated_corrupt_and_incomplete_caches_are_refused(tmp_path, dataset):
    teacher = pruned_teacher()
    folder = tmp_path / "c"
    build_cache(folder, teacher, dataset, spec_for(teacher, dataset))
    logits = folder / "logits.bin"
    original = logits.read_bytes()
    logits.write_bytes(original[:-7])
    with pytest.raises(CacheError, match=f"{logits} holds {len(original) - 7} bytes .* truncated"):
        TeacherCache(folder)
    corrupt = bytearray(original)
    corrupt[len(original) // 2] ^= 0xFF  # one flipped byte in chunk 1
    logits.write_bytes(bytes(corrupt))
    with pytest.raises(CacheError, match=r"logits.bin is corrupt: samples 100-199 \(chunk 1\)"):
        TeacherCache(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(CacheError, match="is incomplete .* run `ptd cache` again"):
        TeacherCache(folder)
    (folder / "manifest.json").write_text('{"format_version": 1, "spec": {')
    with pytest.raises(CacheError, match="manifest.json is not valid JSON"):
        TeacherCache(folder)
    with pytest.raises(CacheError, match="is not a teacher cache"):
        TeacherCache(tmp_path)


def test_interrupted_precompute_resumes_with_the_missing_chunks_only(tmp_path, dataset):
    teacher = pruned_teacher()
    spec = spec_for(teacher, dataset)
    reference = build_cache(tmp_path / "whole", teacher, dataset, spec)

    def interrupt(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "c", teacher, dataset, spec, on_chunk=interrupt)
    assert not (tmp_path / "c" / "manifest.json").exists()
    with pytest.raises(CacheError, match="is incomplete"):
        TeacherCache(tmp_path / "c")
    written = []
    resumed = build_cache(tmp_path / "c", teacher, dataset, spec, on_chunk=written.append)
    assert written == [1, 2]  # chunk 0 was finished before the interruption
    everything = torch.arange(spec.samples)
    # The logits agree to rounding, not bit for bit: each build times dense against sparse per layer and may pick
    # another path for a layer whose two timings are close.
    for epoch in range(3):
        torch.testing.assert_close(resumed.teacher(everything, epoch).float(),
                                   reference.teacher(everything, epoch).float(), atol=2e-3, rtol=2e-3)
        assert torch.equal(resumed.views(everything, epoch).crop_x, reference.views(everything, epoch).crop_x)
        assert torch.equal(resumed.views(everything, epoch).flip, reference.views(everything, epoch).flip)
    assert resumed.spec == reference.spec


def test_distillation_from_the_cache_replays_the_views_of_the_live_teacher(tmp_path, dataset):
    """The same student trained against the cached logits and against the live teacher run on the cached views
    follows the same trajectory: the cache stores exactly what the teacher says about exactly that image."""
    teacher = pruned_teacher(sparsity=0.5)
    cache = build_cache(tmp_path / "c", teacher, dataset, spec_for(teacher, dataset, dtype="float32", views=2))
    schedule = Schedule(epochs=2, lr=0.05, weight_decay=5e-4, batch_size=64)
    results = {}
    for name, distillation in (("cached", Distillation(None, 0.9, 4.0, cache)),
                               ("live", Distillation(teacher, 0.9, 4.0, cache))):
        torch.manual_seed(0)
        student = build_model("vgg_fmnist", [8, "M", 8, "M"], in_channels=1, image_size=28)
        ctx = Context(dataset, AUGMENTATION, torch.device("cpu"), seed=1, progress=False,
                      metrics_path=tmp_path / f"{name}.jsonl")
        fit(student, ctx, schedule, tmp_path / f"{name}.pt", name, distillation)
        results[name] = [json.loads(line)["train_loss"] for line in (tmp_path / f"{name}.jsonl").read_text()
                         .splitlines() if "train_loss" in line]
    assert len(results["cached"]) == 2
    np.testing.assert_allclose(results["cached"], results["live"], rtol=1e-4)


def test_two_ranks_write_one_store_and_distill_reads_it(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=40)
    out = tmp_path / "run"
    overrides = tiny_run_overrides(root) + ["prune.targets=[0.5]", "distill.variants=['kd_pruned']",
                                            "cache.chunk=50", "cache.views=2"]
    args = [a for o in overrides for a in ("--set", o)]
    teacher = pruned_teacher(sparsity=0.5)
    spec = {"name": "vgg_fmnist", "plan": [32, "M", 64, "M", 128, "M"], "in_channels": 1, "num_classes": 10,
            "image_size": 28}
    save_model(teacher, out / "prune" / "sparsity_0.50" / "model", spec)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ptd_sparse.cli", "cache", "--out", str(out)] + args
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 wrote 300 views" in result.stderr and "rank 1 wrote 240 views" in result.stderr  # 3 + 2 chunks
    sharded = TeacherCache(out / "cache" / "sparsity_0.50")
    single = build_cache(tmp_path / "single", teacher, load_dataset("fashion_mnist", str(root)), sharded.spec)
    everything = torch.arange(sharded.spec.samples)
    for epoch in range(2):
        torch.testing.assert_close(sharded.teacher(everything, epoch).float(), single.teacher(everything, epoch)
                                   .float(), atol=2e-3, rtol=2e-3)
    assert cli.main(["distill", "--out", str(out), "--cache", str(tmp_path / "none")] + args) == 2
    assert "no teacher cache for sparsity_0.50" in capsys.readouterr().err
    assert cli.main(["distill", "--out", str(out), "--cache", str(out / "cache")] + args) == 0
    done = json.loads((out / "students" / "kd_pruned_0.50" / "seed_0" / "done.json").read_text())
    assert done["epochs"] == 1 and 0 <= done["test_acc"] <= 1


def test_ptd_run_with_the_cache_enabled(tmp_path, capsys):
    root = fake_fashion_mnist(tmp_path / "data", train=300, test=40)
    out = tmp_path / "run"
    overrides = tiny_run_overrides(root) + ["teacher.epochs=1", "prune.targets=[0.36]",
                                            "distill.variants=['kd_pruned']", "cache.enabled=true",
                                            "cache.form='topk'", "cache.k=3"]
    assert cli.main(["run", "--out", str(out)] + [a for o in overrides for a in ("--set", o)]) == 0
    cache = TeacherCache(out / "cache" / "sparsity_0.36")
    # The top-k rest mass is computed at the run's distillation temperature (the default's T = 4).
    assert cache.spec.form == "topk" and cache.spec.views == 1 and cache.spec.temperature == 4.0
    assert "KD from the pruned teacher" in capsys.readouterr().out


def test_inference_form_keeps_the_teachers_output_with_either_path_per_layer(dataset):
    from ptd_sparse.backends import dense_crossover
    from ptd_sparse.cache.inference import inference_form
    from ptd_sparse.nn import MaskedConv2d, SparseConv2d

    teacher = pruned_teacher()  # global pruning leaves the first layer 88% dense: both paths are candidates there
    example = normalize(dataset.train.images[:16], dataset)
    fast, routes = inference_form(teacher, example)
    assert not any(isinstance(m, (MaskedConv2d, torch.nn.BatchNorm2d)) for m in fast.modules())
    convolutions = {name: m for name, m in fast.named_modules() if isinstance(m, SparseConv2d)}
    assert len(convolutions) == 3 and not fast.training
    # The density rule, never a timing: dense above the crossover, the sparse kernel below it.
    assert all(m.route_policy == "density" for m in convolutions.values())
    assert routes == {name: "dense" if m.density > dense_crossover("cpu") else "sparse"
                      for name, m in convolutions.items()}
    with torch.no_grad():
        torch.testing.assert_close(fast(example), teacher(example), atol=1e-4, rtol=1e-4)
