"""Import a model pruned with torch.nn.utils.prune: its state dict holds `<layer>.weight_orig` and
`<layer>.weight_mask` where ptd_sparse models hold `<layer>.weight` and `<layer>.mask`. The model is one of the zoo's
or the user's own (a factory "package.module:function", ptd_sparse.pipeline.factories)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ptd_sparse.pipeline.checkpoint import CheckpointError, save_model
from ptd_sparse.pipeline.models import build_model, default_plan
from ptd_sparse.pipeline.pruning import achieved_sparsity


def convert_pruned_state(state: dict) -> dict:
    """torch.nn.utils.prune keys -> ptd_sparse keys (weight = weight_orig * weight_mask, mask = weight_mask != 0).
    A prune mask wins over a `mask` buffer the module may also carry."""
    converted = {k: v for k, v in state.items() if not k.endswith((".weight_orig", ".weight_mask"))}
    for key, value in state.items():
        if key.endswith(".weight_orig"):
            base = key[: -len("weight_orig")]
            mask = state.get(base + "weight_mask")
            if mask is None:
                raise CheckpointError(f"{key} has no matching {base}weight_mask")
            converted[base + "weight"] = value * mask
            converted[base + "mask"] = mask != 0
    return converted


def load_pruned_state(model: nn.Module, state: dict) -> nn.Module:
    """Load a (possibly torch-pruned) state dict into a ptd_sparse model; layers without masks become dense."""
    converted = convert_pruned_state(state)
    expected = model.state_dict()
    for key, value in expected.items():  # unpruned layers keep an all-true mask
        if key.endswith(".mask") and key not in converted:
            converted[key] = torch.ones_like(value)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(converted)
    return model


def import_state_dict_file(path: Path, name: str, in_channels: int, classes: int, image_size: int,
                           out: Path, kwargs: dict | None = None) -> float:
    """Write the model folder `out` from a state dict file (torch.save of a state_dict, read weights_only): of a zoo
    model `name`, or of the user's own model built by factory `name` = "package.module:function" with `kwargs`.
    Masks of torch.nn.utils.prune (weight_orig / weight_mask) and the pipeline's own (weight / mask) are accepted.
    Returns the sparsity of the imported model."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    spec = {"name": name, "plan": default_plan(name), "in_channels": in_channels, "num_classes": classes,
            "image_size": image_size}
    if kwargs:
        spec["kwargs"] = dict(kwargs)
    model = load_pruned_state(build_model(**spec), state)
    save_model(model, out, spec)
    return achieved_sparsity(model)
