"""Checkpoints that never lose data and never run code from a file.

A model is a folder: model.json (architecture, plan, input and class counts), weights.safetensors (parameters and
BatchNorm buffers) and masks.safetensors (the pruning masks, kept apart so a dense consumer can ignore them). Every
file is written atomically (ptd_sparse.files), so an interruption leaves the old file or the new one, never half
of one. Training state for resuming (optimizer, schedule, epoch) goes through torch.save and is read back
with weights_only=True.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ptd_sparse.files import atomic_write, write_json
from ptd_sparse.pipeline.models import build_model

MASK_SUFFIX = ".mask"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} does not exist") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON (corrupt or truncated): {error}") from error


def write_safetensors(tensors: dict, path: str) -> None:
    """The bytes safetensors' save_file writes, serialised in memory and written to `path` (atomic_write's temporary):
    save_file renames a temporary of its own into place, which a SIGKILL mid-write leaves behind under a name no
    cleanup knows."""
    Path(path).write_bytes(safetensors_bytes(tensors))


def save_model(model: nn.Module, folder: Path, spec: dict) -> None:
    """Save `model` built from `spec` (name, plan, in_channels, num_classes, image_size; kwargs for a factory) into
    `folder`."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    masks = {k: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    weights = {k: v for k, v in state.items() if not k.endswith(MASK_SUFFIX)}
    folder = Path(folder)
    atomic_write(folder / "weights.safetensors", lambda tmp: write_safetensors(weights, tmp))
    atomic_write(folder / "masks.safetensors", lambda tmp: write_safetensors(masks, tmp))
    write_json(folder / "model.json", spec)


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(model, spec) from a folder written by save_model; refuses missing, corrupt or mismatched files."""
    folder = Path(folder)
    spec = read_json(folder / "model.json")
    try:
        model = build_model(spec["name"], spec["plan"], spec["in_channels"], spec["num_classes"], spec["image_size"],
                            spec.get("kwargs"))
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{folder / 'model.json'} does not describe a model: {error}") from error
    try:
        weights = load_file(folder / "weights.safetensors")
        masks = load_file(folder / "masks.safetensors")
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read the checkpoint in {folder}: {error}") from error
    if any(not k.endswith(MASK_SUFFIX) for k in masks) or any(k.endswith(MASK_SUFFIX) for k in weights):
        raise CheckpointError(f"{folder}: masks and weights are mixed up between the two files")
    state = {**weights, **masks}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {folder} does not match {spec['name']} with plan {spec['plan']}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state)
    return model.to(device), spec


def save_state(path: Path, state: dict) -> None:
    def write(temporary: str) -> None:
        # Through a file object: torch.save names the archive's inner folder after a path's file name, which is the
        # temporary's random name here, so two runs that saved the same state would write different bytes.
        with open(temporary, "wb") as handle:
            torch.save(state, handle)

    atomic_write(path, write)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 (any unpickling failure means a corrupt or foreign file)
        raise CheckpointError(f"{path} is not a training state this version can resume from: {error}") from error
