"""SIGKILL in the middle of a write (tests/sigkill_writer.py kills itself there): the cache store is detected as
incomplete and a rerun completes it to the same bytes as an uninterrupted build; an atomic checkpoint write leaves
the previous file intact and readable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import fake_fashion_mnist

from ptd_sparse.cache import CacheError, TeacherCache, build_cache
from ptd_sparse.pipeline import checkpoint
from ptd_sparse.data import load_dataset
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.pruning import prune_to

HERE = Path(__file__).resolve().parent
ARCHITECTURE = {"name": "vgg_fmnist", "plan": [8, "M", 8, "M"], "in_channels": 1, "num_classes": 10,
                "image_size": 28}


def run_killed_writer(*args) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "sigkill_writer.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"the writer was not killed: {done.returncode}\n{done.stderr}"


def model_of(seed: int):
    torch.manual_seed(seed)
    return build_model(**ARCHITECTURE)


def test_cache_killed_mid_chunk_is_incomplete_and_a_rerun_completes_it(tmp_path):
    import sigkill_writer

    root = fake_fashion_mnist(tmp_path / "data", train=300, test=40)
    teacher = model_of(0).eval()
    prune_to(teacher, 0.8)
    checkpoint.save_model(teacher, tmp_path / "teacher", ARCHITECTURE)
    folder = tmp_path / "cache"
    run_killed_writer("cache", folder, tmp_path / "teacher", root)

    assert (folder / "chunks" / "000000.json").exists() and not (folder / "chunks" / "000001.json").exists()
    with pytest.raises(CacheError, match="is incomplete"):
        TeacherCache(folder)
    dataset = load_dataset("fashion_mnist", str(root))
    teacher, _ = checkpoint.load_model(tmp_path / "teacher")
    spec = sigkill_writer.cache_spec(teacher, dataset)
    written = []
    resumed = build_cache(folder, teacher.eval(), dataset, spec, sparse=False, on_chunk=written.append)
    assert written == [1, 2]  # chunk 0 was complete; chunk 1 (half-written) and chunk 2 are redone
    whole = build_cache(tmp_path / "whole", teacher.eval(), dataset, spec, sparse=False)
    for name in spec.files():
        assert (folder / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    TeacherCache(folder)  # verifies every chunk's hash against the manifest
    assert resumed.spec == whole.spec


def test_model_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "model"
    before = model_of(0)
    checkpoint.save_model(before, folder, ARCHITECTURE)
    run_killed_writer("model", folder)

    assert list(folder.glob(".weights.safetensors.*.tmp"))  # the half-written temporary file of the killed write
    loaded, spec = checkpoint.load_model(folder)
    assert spec == ARCHITECTURE
    for key, value in before.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    after = model_of(1)
    checkpoint.save_model(after, folder, ARCHITECTURE)  # a rerun writes it and removes the stale temporary
    assert torch.equal(checkpoint.load_model(folder)[0].features[0].weight, after.features[0].weight)
    assert not list(folder.glob(".*.tmp"))


def test_training_state_killed_mid_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save_state(path, {"epoch": 1, "weights": torch.full((1000,), 1.0)})
    run_killed_writer("state", path)

    state = checkpoint.load_state(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.full((1000,), 1.0))
    checkpoint.save_state(path, {"epoch": 2, "weights": torch.full((1000,), 2.0)})
    assert checkpoint.load_state(path)["epoch"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_model_files_are_safetensors_written_only_through_the_atomic_temporary(tmp_path, monkeypatch):
    """save_model writes the bytes safetensors' save_file would, without calling it: save_file renames a temporary of
    its own (".tmpXXXXXX") into place, which a SIGKILL mid-write left behind where no cleanup looks."""
    import safetensors.torch

    model = model_of(0)
    expected = tmp_path / "expected.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()
                                 if not k.endswith(checkpoint.MASK_SUFFIX)}, expected)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *args, **kwargs: pytest.fail("save_file was called"))
    checkpoint.save_model(model, tmp_path / "model", ARCHITECTURE)
    assert (tmp_path / "model" / "weights.safetensors").read_bytes() == expected.read_bytes()
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["masks.safetensors", "model.json",
                                                                      "weights.safetensors"]
