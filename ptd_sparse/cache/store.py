"""The on-disk teacher-logit store: fixed-size records in raw memory-mapped files, chunk markers, a manifest.

A store is a folder:
    layout.json          what the store holds (CacheSpec) and its files' dtypes and shapes; written when the files
                         are created, so a resumed or second-rank writer can check it writes the same store
    views.bin            uint8 [N, K, 3]: crop_y, crop_x, flip of view k of sample n
    logits.bin           full form: [N, K, C] in the stored dtype
    indices.bin          top-k form: int32 [N, K, k] class indices (never a float type: exact for any class count)
    values.bin           top-k form: [N, K, k] the teacher's logits of those classes, in the stored dtype
    rest.bin             top-k form with rest mass: float32 [N, K], the teacher's probability outside the k classes
    chunks/<c>.json      written (atomically) after chunk c's records are flushed: the sha256 of its bytes per file
    manifest.json        written last, atomically, when every chunk is done: the layout plus every chunk's hashes

Records are fixed-size and chunk c covers samples [c * chunk, (c + 1) * chunk), so any rank can write any chunk at
its offsets into the same files; a resumed writer redoes only the chunks without a marker. A reader refuses a
folder without a manifest (incomplete), a file shorter or longer than the manifest says (truncated or foreign), a
chunk whose bytes do not hash to the manifest's value (corrupt), and a store made for another teacher, data set,
view set, temperature, dtype or k; every refusal names the file and the mismatch. Every field of the JSON records
is checked for presence, type and range (a malformed one is a CacheError naming it). No file is ever unpickled.
The files' disk space is reserved when they are created (space.py), so a full disk is a CacheSpaceError, never a
SIGBUS from a write through a memory map.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ptd_sparse.cache.errors import CacheError, CacheSpaceError
from ptd_sparse.cache.space import reserve
from ptd_sparse.files import write_json

FORMAT_VERSION = 1
FORMS = ("full", "topk")
DTYPES = ("float16", "bfloat16", "float32")
VIEW_FIELDS = 3  # crop_y, crop_x, flip
MAX_CROP_PADDING = 127  # crop offsets go up to 2 * padding and are stored as uint8

__all__ = ["CacheError", "CacheSpaceError", "CacheSpec", "StoreFiles", "StoreWriter", "read_manifest"]


@dataclass(frozen=True)
class CacheSpec:
    """What a store holds. Two stores with equal specs hold the same records (up to floating-point summation
    order of the kernels that computed them)."""

    teacher: str  # sha256 fingerprint of the teacher's spec, weights and masks
    dataset: dict  # identity of the data set and split whose samples are the store's rows
    samples: int  # N
    views: int  # K views per sample
    crop_padding: int
    flip: bool
    view_seed: int
    classes: int  # C
    form: str  # "full" or "topk"
    dtype: str  # of the stored logits: float16, bfloat16 or float32
    k: int = 0  # top-k only
    temperature: float = 0.0  # top-k with rest mass only: the temperature the rest mass was computed at
    rest_mass: bool = False  # top-k only: the rest mass is stored (else the teacher is renormalised over its top k)
    chunk: int = 1024  # samples per chunk

    def check(self, prefix: str = "cache spec: ") -> CacheSpec:
        """Check the values (their types are the caller's: see _spec_from); `prefix` + the field name starts every
        message."""
        def refuse(field: str, expected: str) -> CacheError:
            return CacheError(f"{prefix}{field} must be {expected}, got {getattr(self, field)!r}")

        if self.form not in FORMS:
            raise refuse("form", f"one of {FORMS}")
        if self.dtype not in DTYPES:
            raise refuse("dtype", f"one of {DTYPES}")
        for field in ("samples", "views", "classes", "chunk"):
            if getattr(self, field) < 1:
                raise refuse(field, ">= 1")
        if not 0 <= self.crop_padding <= MAX_CROP_PADDING:
            raise refuse("crop_padding", f"in [0, {MAX_CROP_PADDING}] to be stored")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise refuse("temperature", "a finite number >= 0")
        if self.form == "topk":
            if not 1 <= self.k <= self.classes:
                raise refuse("k", f"in [1, {self.classes}] (the number of classes) for a top-k cache")
            if self.rest_mass and not self.temperature > 0:
                raise refuse("temperature", "> 0 for a top-k cache with rest mass (the temperature it is computed at)")
        elif self.k != 0 or self.rest_mass:
            raise CacheError(f"{prefix}k and {prefix}rest_mass must be 0 and false for a full-logit cache, got "
                             f"{self.k!r} and {self.rest_mass!r}")
        return self

    @property
    def chunks(self) -> int:
        return -(-self.samples // self.chunk)

    def files(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{file name: (numpy dtype name, shape)} of the store's data files."""
        n, k = self.samples, self.views
        stored = "int16" if self.dtype == "bfloat16" else self.dtype  # numpy has no bfloat16: its bits as int16
        files = {"views.bin": ("uint8", (n, k, VIEW_FIELDS))}
        if self.form == "full":
            files["logits.bin"] = (stored, (n, k, self.classes))
        else:
            files["indices.bin"] = ("int32", (n, k, self.k))
            files["values.bin"] = (stored, (n, k, self.k))
            if self.rest_mass:
                files["rest.bin"] = ("float32", (n, k))
        return files

    def bytes_per_view(self) -> float:
        total = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in self.files().values())
        return total / (self.samples * self.views)

    def describe_difference(self, other: CacheSpec) -> str:
        mine, theirs = asdict(self), asdict(other)
        return "; ".join(f"{key}: stored {theirs[key]!r}, expected {mine[key]!r}" for key in mine
                         if mine[key] != theirs[key])


# The JSON types each CacheSpec field may have in layout.json and manifest.json. A JSON true is never an integer
# here (Python's bool is an int); an integer is a number.
_FIELD_TYPES = {"teacher": str, "dataset": dict, "samples": int, "views": int, "crop_padding": int, "flip": bool,
                "view_seed": int, "classes": int, "form": str, "dtype": str, "k": int, "temperature": (int, float),
                "rest_mass": bool, "chunk": int}
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _expected_type(kind) -> str:
    return "a number" if kind == (int, float) else _JSON_NAMES[kind]


def _has_type(value, kind) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _field(record, key: str, kind, path: Path, where: str = ""):
    """record[key], refused with a CacheError naming `where` + key when record is no object, lacks the key, or holds
    another JSON type."""
    name = f"{where}{key}"
    if not isinstance(record, dict):
        raise CacheError(f"{path}: {('field ' + where.rstrip('.')) if where else 'the file'} must be an object, "
                         f"got {_json_type(record)}")
    if key not in record:
        raise CacheError(f"{path} lacks the field {name} (corrupt, or written by another version)")
    value = record[key]
    if not _has_type(value, kind):
        raise CacheError(f"{path}: field {name} must be {_expected_type(kind)}, got {_json_type(value)} {value!r}")
    return value


def _spec_from(record, path: Path) -> CacheSpec:
    """The CacheSpec of a layout's or manifest's "spec" object, every field's presence, type and value checked."""
    if not isinstance(record, dict):
        raise CacheError(f"{path}: field spec must be an object, got {_json_type(record)}")
    unknown = sorted(set(record) - set(_FIELD_TYPES))
    if unknown:
        raise CacheError(f"{path}: field spec holds unknown fields {unknown} (written by another version?)")
    required = {f.name for f in fields(CacheSpec) if f.default is MISSING}
    values = {key: _field(record, key, kind, path, "spec.") for key, kind in _FIELD_TYPES.items()
              if key in record or key in required}
    if "temperature" in values:
        values["temperature"] = float(values["temperature"])
    return CacheSpec(**values).check(f"{path}: field spec.")


def _chunk_hashes(record, names: list[str], path: Path, where: str) -> dict[str, str]:
    """A chunk's {data file name: sha256 hex digest}, checked to name exactly the store's files."""
    if not isinstance(record, dict):
        raise CacheError(f"{path}: field {where} must be an object of sha256 digests per data file, got "
                         f"{_json_type(record)}")
    if sorted(record) != sorted(names):
        raise CacheError(f"{path}: field {where} lists hashes of {sorted(record)}, the store's files are "
                         f"{sorted(names)}")
    for name, digest in record.items():
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise CacheError(f"{path}: field {where}[{name!r}] must be a sha256 hex digest, got {digest!r}")
    return record


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheError(f"{path} is not valid JSON (corrupt or truncated): {error}") from error
    if not isinstance(record, dict):
        raise CacheError(f"{path}: the file must hold an object, got {_json_type(record)}")
    return record


def _file_size(dtype: str, shape: tuple[int, ...]) -> int:
    return np.dtype(dtype).itemsize * int(np.prod(shape))


def _chunk_bytes(array: np.memmap, start: int, stop: int) -> bytes:
    return np.ascontiguousarray(array[start:stop]).view(np.uint8).tobytes()


class StoreFiles:
    """The data files of a store as numpy memmaps (mode "r" to read, "r+" to write records)."""

    def __init__(self, folder: Path, spec: CacheSpec, mode: str):
        self.folder, self.spec = Path(folder), spec
        self.arrays = {}
        for name, (dtype, shape) in spec.files().items():
            path = self.folder / name
            if not path.is_file():
                raise CacheError(f"teacher cache {self.folder} lacks {name} (incomplete or foreign folder)")
            size, expected = path.stat().st_size, _file_size(dtype, shape)
            if size != expected:
                raise CacheError(f"{path} holds {size} bytes but the cache layout needs {expected} ({dtype} "
                                 f"{list(shape)}): the file is truncated or belongs to another cache")
            self.arrays[name] = np.memmap(path, dtype=dtype, mode=mode, shape=shape)

    def chunk_hashes(self, chunk: int) -> dict[str, str]:
        start, stop = chunk * self.spec.chunk, min((chunk + 1) * self.spec.chunk, self.spec.samples)
        return {name: hashlib.sha256(_chunk_bytes(array, start, stop)).hexdigest()
                for name, array in self.arrays.items()}


class StoreWriter:
    """Writes a store chunk by chunk; several processes (ranks) may write disjoint chunks of one store.

    create() (one process) makes the files and layout.json, or checks that an existing partial store has the same
    spec; then any process opens the writer, asks `pending(rank, world)` for its unfinished chunks, writes them
    with `write`, and `finish()` (one process, after all are done) writes the manifest."""

    def __init__(self, folder: Path, spec: CacheSpec):
        self.folder, self.spec = Path(folder), spec.check()
        self._files = None

    def create(self) -> None:
        """Make the store's files with their disk space reserved (or, resuming, reserve what existing files lack:
        files written without reservations, or an interrupted creation's). A full disk raises CacheSpaceError before
        any record is written; layout.json is written only once every file has its space, so a failed creation starts
        over."""
        layout_path = self.folder / "layout.json"
        if (self.folder / "manifest.json").exists():
            return  # complete; finish() and the reader check that it is the right one
        if layout_path.exists():
            stored = _spec_from(_field(_read_json(layout_path), "spec", dict, layout_path), layout_path)
            if stored != self.spec:
                raise CacheError(f"{self.folder} holds an unfinished cache of something else "
                                 f"({self.spec.describe_difference(stored)}); delete it or choose another folder")
            for name, (dtype, shape) in self.spec.files().items():
                path, size = self.folder / name, _file_size(dtype, shape)
                if path.is_file() and path.stat().st_size == size:  # a wrong size is refused when the files open
                    reserve(path, size)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "chunks").mkdir(exist_ok=True)
        created = []
        try:
            for name, (dtype, shape) in self.spec.files().items():
                created.append(self.folder / name)
                with open(self.folder / name, "wb") as f:
                    f.truncate(_file_size(dtype, shape))  # zeros, every record at its offset
                reserve(self.folder / name, _file_size(dtype, shape))
        except CacheSpaceError:
            for path in created:  # nothing is written yet: give the space back
                path.unlink(missing_ok=True)
            raise
        write_json(layout_path, {"format_version": FORMAT_VERSION, "spec": asdict(self.spec),
                                 "files": {n: {"dtype": d, "shape": list(s)} for n, (d, s) in
                                           self.spec.files().items()}})

    @property
    def complete(self) -> bool:
        return (self.folder / "manifest.json").exists()

    def files(self) -> StoreFiles:
        if self._files is None:
            self._files = StoreFiles(self.folder, self.spec, "r+")
        return self._files

    def _marker(self, chunk: int) -> Path:
        return self.folder / "chunks" / f"{chunk:06d}.json"

    def done(self, chunk: int) -> bool:
        return self._marker(chunk).exists()

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """The chunks rank `rank` of `world_size` owns (every world_size-th) and has not finished."""
        return [c for c in range(rank, self.spec.chunks, world_size) if not self.done(c)]

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.spec.chunk, min((chunk + 1) * self.spec.chunk, self.spec.samples)

    def write(self, chunk: int, records: dict[str, np.ndarray]) -> None:
        """Write every file's records of `chunk` ({file name: array [samples of the chunk, K, ...]}), flush them,
        then mark the chunk done with the hashes of its bytes."""
        files = self.files()
        start, stop = self.chunk_range(chunk)
        if set(records) != set(files.arrays):
            raise CacheError(f"chunk {chunk} of {self.folder}: records for {sorted(records)}, the store has "
                             f"{sorted(files.arrays)}")
        for name, values in records.items():
            array = files.arrays[name]
            if values.shape != (stop - start,) + array.shape[1:]:
                raise CacheError(f"chunk {chunk} of {self.folder / name}: records of shape {values.shape}, "
                                 f"expected {(stop - start,) + array.shape[1:]}")
            if values.dtype != array.dtype:
                raise CacheError(f"chunk {chunk} of {self.folder / name}: records of dtype {values.dtype}, "
                                 f"expected {array.dtype}")
            array[start:stop] = values
            array.flush()
        hashes = files.chunk_hashes(chunk)
        write_json(self._marker(chunk), {"chunk": chunk, "sha256": hashes})

    def finish(self) -> Path:
        """Check that every chunk is done and write manifest.json (atomically, last). Returns its path."""
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            return manifest
        missing = [c for c in range(self.spec.chunks) if not self.done(c)]
        if missing:
            raise CacheError(f"{self.folder}: chunks {missing[:10]} of {self.spec.chunks} are not written yet")
        names = list(self.spec.files())
        chunks = [_chunk_hashes(_field(_read_json(self._marker(c)), "sha256", dict, self._marker(c)), names,
                                self._marker(c), "sha256") for c in range(self.spec.chunks)]
        layout = _read_json(self.folder / "layout.json")
        write_json(manifest, {**layout, "chunks": chunks})
        return manifest


def read_manifest(folder: Path) -> tuple[CacheSpec, list[dict]]:
    """(spec, per-chunk hashes) of a complete store; refuses an incomplete or foreign folder."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        if (folder / "layout.json").is_file():
            raise CacheError(f"teacher cache {folder} is incomplete (no manifest.json): its writing was interrupted; "
                             "run `ptd cache` again to finish it")
        raise CacheError(f"{folder} is not a teacher cache (no manifest.json)")
    record = _read_json(manifest)
    version = _field(record, "format_version", int, manifest)
    if version != FORMAT_VERSION:
        raise CacheError(f"{manifest} has format version {version!r}; this version reads {FORMAT_VERSION}")
    spec = _spec_from(_field(record, "spec", dict, manifest), manifest)
    chunks = _field(record, "chunks", list, manifest)
    if len(chunks) != spec.chunks:
        raise CacheError(f"{manifest}: field chunks lists {len(chunks)} chunk hashes, the layout has "
                         f"{spec.chunks} chunks")
    names = list(spec.files())
    return spec, [_chunk_hashes(hashes, names, manifest, f"chunks[{c}]") for c, hashes in enumerate(chunks)]
