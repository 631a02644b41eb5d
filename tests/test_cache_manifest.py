"""Every malformed record of a teacher cache (manifest.json, layout.json, a chunk marker) is a CacheError that names
the field, never a TypeError, AttributeError or KeyError from deep inside the reader."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ptd_sparse.cache import CacheError, CacheSpec, TeacherCache
from ptd_sparse.cache.store import StoreWriter

FULL = dict(teacher="t", dataset={"name": "synthetic", "split": "train"}, samples=10, views=2, crop_padding=2,
            flip=True, view_seed=0, classes=5, form="full", dtype="float16", chunk=4)
TOPK = dict(FULL, form="topk", k=3, temperature=4.0, rest_mass=True)


def write_store(folder, fields: dict, finish: bool = True) -> StoreWriter:
    spec = CacheSpec(**fields)
    writer = StoreWriter(folder, spec)
    writer.create()
    for chunk in writer.pending():
        start, stop = writer.chunk_range(chunk)
        writer.write(chunk, {name: np.zeros((stop - start,) + shape[1:], dtype)
                             for name, (dtype, shape) in spec.files().items()})
    if finish:
        writer.finish()
    return writer


def edit(path, change) -> None:
    record = json.loads(path.read_text())
    path.write_text(json.dumps(change(record)))


def with_spec(**values):
    def change(record):
        record["spec"].update(values)
        return record
    return change


def without(*keys):
    def change(record):
        target = record
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
        return record
    return change


def replace(key, value):
    def change(record):
        record[key] = value
        return record
    return change


def chunk_entry(value):
    def change(record):
        record["chunks"][1] = value
        return record
    return change


CORRUPTIONS = [
    # (id, the store's form, the change to manifest.json, what the error says)
    ("manifest-list", FULL, lambda record: [record], "the file must hold an object, got a list"),
    ("manifest-null", FULL, lambda record: None, "the file must hold an object, got null"),
    ("manifest-string", FULL, lambda record: "manifest", "the file must hold an object, got a string"),
    ("no-version", FULL, without("format_version"), "lacks the field format_version"),
    ("version-string", FULL, replace("format_version", "1"), "field format_version must be an integer, got a string"),
    ("version-bool", FULL, replace("format_version", True), "field format_version must be an integer, got true or "
                                                            "false"),
    ("version-2", FULL, replace("format_version", 2), "format version 2"),
    ("no-spec", FULL, without("spec"), "lacks the field spec "),
    ("spec-list", FULL, replace("spec", [1, 2]), "field spec must be an object, got a list"),
    ("spec-string", FULL, replace("spec", "spec"), "field spec must be an object, got a string"),
    ("samples-string", FULL, with_spec(samples="10"), "field spec.samples must be an integer, got a string '10'"),
    ("samples-bool", FULL, with_spec(samples=True), "field spec.samples must be an integer, got true or false"),
    ("samples-float", FULL, with_spec(samples=10.0), "field spec.samples must be an integer, got a number 10.0"),
    ("samples-negative", FULL, with_spec(samples=-10), "field spec.samples must be >= 1, got -10"),
    ("samples-null", FULL, with_spec(samples=None), "field spec.samples must be an integer, got null"),
    ("no-samples", FULL, without("spec", "samples"), "lacks the field spec.samples"),
    ("no-classes", FULL, without("spec", "classes"), "lacks the field spec.classes"),
    ("no-teacher", FULL, without("spec", "teacher"), "lacks the field spec.teacher"),
    ("views-zero", FULL, with_spec(views=0), "field spec.views must be >= 1, got 0"),
    ("views-list", FULL, with_spec(views=[2]), "field spec.views must be an integer, got a list"),
    ("classes-negative", FULL, with_spec(classes=-5), "field spec.classes must be >= 1, got -5"),
    ("chunk-zero", FULL, with_spec(chunk=0), "field spec.chunk must be >= 1, got 0"),
    ("chunk-string", FULL, with_spec(chunk="4"), "field spec.chunk must be an integer"),
    ("crop-negative", FULL, with_spec(crop_padding=-1), "field spec.crop_padding must be in"),
    ("crop-bool", FULL, with_spec(crop_padding=False), "field spec.crop_padding must be an integer, got true or false"),
    ("flip-integer", FULL, with_spec(flip=1), "field spec.flip must be true or false, got an integer 1"),
    ("seed-string", FULL, with_spec(view_seed="0"), "field spec.view_seed must be an integer"),
    ("teacher-null", FULL, with_spec(teacher=None), "field spec.teacher must be a string, got null"),
    ("dataset-list", FULL, with_spec(dataset=["synthetic"]), "field spec.dataset must be an object, got a list"),
    ("form-unknown", FULL, with_spec(form="sparse"), "field spec.form must be one of"),
    ("form-integer", FULL, with_spec(form=1), "field spec.form must be a string, got an integer"),
    ("dtype-integer", FULL, with_spec(dtype=16), "field spec.dtype must be a string, got an integer"),
    ("dtype-unknown", FULL, with_spec(dtype="int8"), "field spec.dtype must be one of"),
    ("full-with-k", FULL, with_spec(k=3), "field spec.k and .*rest_mass must be 0 and false for a full-logit cache"),
    ("unknown-field", FULL, with_spec(extra=1), r"field spec holds unknown fields \['extra'\]"),
    ("k-negative", TOPK, with_spec(k=-3), r"field spec.k must be in \[1, 5\]"),
    ("k-string", TOPK, with_spec(k="3"), "field spec.k must be an integer, got a string"),
    ("k-bool", TOPK, with_spec(k=True), "field spec.k must be an integer, got true or false"),
    ("temperature-string", TOPK, with_spec(temperature="4"), "field spec.temperature must be a number, got a string"),
    ("temperature-negative", TOPK, with_spec(temperature=-4.0), "field spec.temperature must be a finite number"),
    ("temperature-nan", TOPK, with_spec(temperature=float("nan")), "field spec.temperature must be a finite number"),
    ("temperature-bool", TOPK, with_spec(temperature=True), "field spec.temperature must be a number, got true"),
    ("rest-mass-string", TOPK, with_spec(rest_mass="yes"), "field spec.rest_mass must be true or false, got a "
                                                           "string"),
    ("no-chunks", FULL, without("chunks"), "lacks the field chunks"),
    ("chunks-object", FULL, replace("chunks", {"0": {}}), "field chunks must be a list, got an object"),
    ("chunks-short", FULL, lambda record: {**record, "chunks": record["chunks"][:2]},
     "field chunks lists 2 chunk hashes, the layout has 3 chunks"),
    ("chunk-list", FULL, chunk_entry(["abc"]), r"field chunks\[1\] must be an object of sha256 digests"),
    ("chunk-null", FULL, chunk_entry(None), r"field chunks\[1\] must be an object of sha256 digests per data file, "
                                            "got null"),
    ("chunk-missing-file", FULL, lambda record: chunk_entry({"views.bin": record["chunks"][1]["views.bin"]})(record),
     r"field chunks\[1\] lists hashes of \['views.bin'\], the store's files are \['logits.bin', 'views.bin'\]"),
    ("chunk-hash-integer", FULL, lambda record: chunk_entry({**record["chunks"][1], "logits.bin": 5})(record),
     r"field chunks\[1\]\['logits.bin'\] must be a sha256 hex digest, got 5"),
]


@pytest.mark.parametrize("fields, change, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_malformed_manifest_is_a_cache_error_naming_the_field(tmp_path, fields, change, message):
    folder = tmp_path / "cache"
    write_store(folder, fields)
    TeacherCache(folder)  # the store as written opens
    edit(folder / "manifest.json", change)
    with pytest.raises(CacheError, match=message):
        TeacherCache(folder)


@pytest.mark.parametrize("change, message", [
    (lambda record: [record], "layout.json: the file must hold an object, got a list"),
    (without("spec"), "layout.json lacks the field spec "),
    (replace("spec", []), "layout.json: field spec must be an object, got a list"),
    (with_spec(samples="10"), "layout.json: field spec.samples must be an integer, got a string"),
    (with_spec(views=-2), "layout.json: field spec.views must be >= 1, got -2"),
], ids=["list", "no-spec", "spec-list", "samples-string", "views-negative"])
def test_malformed_layout_is_a_cache_error_naming_the_field(tmp_path, change, message):
    folder = tmp_path / "cache"
    writer = write_store(folder, FULL, finish=False)
    edit(folder / "layout.json", change)
    with pytest.raises(CacheError, match=message):
        StoreWriter(folder, writer.spec).create()  # resuming reads the layout back


@pytest.mark.parametrize("change, message", [
    (lambda record: [record], "000001.json: the file must hold an object, got a list"),
    (without("sha256"), "000001.json lacks the field sha256"),
    (replace("sha256", "abc"), "000001.json: field sha256 must be an object, got a string"),
    (replace("sha256", {"views.bin": "00"}), "000001.json: field sha256 lists hashes of"),
], ids=["list", "no-sha256", "sha256-string", "sha256-missing-file"])
def test_malformed_chunk_marker_is_a_cache_error_naming_the_field(tmp_path, change, message):
    folder = tmp_path / "cache"
    writer = write_store(folder, FULL, finish=False)
    edit(folder / "chunks" / "000001.json", change)
    with pytest.raises(CacheError, match=message):
        writer.finish()
