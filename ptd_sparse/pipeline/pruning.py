"""Unstructured L1-magnitude pruning of every MaskedConv2d and MaskedLinear weight (docs/design.md, section 1.1).

One round removes `rate` of the weights that are still unpruned (20% in the paper): globally (one magnitude threshold
over all layers) or per layer (the same fraction of each layer). Layers named in `skip` are never pruned and do not
count towards the global threshold. The number of rounds for a target sparsity s is the n whose 1 - (1 - rate)^n is
closest to s; the last round is trimmed so the target is reached exactly (to within one weight per layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptd_sparse.pipeline.models import prunable_layers
from ptd_sparse.pipeline.prune_plan import pruning_levels, rounds_for, sparsity_after  # noqa: F401 (re-exported)


def selected_layers(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Module]]:
    layers = prunable_layers(model)
    names = {name for name, _ in layers}
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ValueError(f"skip names layers that are not prunable: {unknown}; prunable layers: {sorted(names)}")
    return [(name, m) for name, m in layers if name not in skip]


@torch.no_grad()
def prune_to(model: nn.Module, sparsity: float, scope: str = "global", skip: list[str] | None = None) -> None:
    """Set masks so that `sparsity` of the selected weights are zero, keeping the largest magnitudes. Weights already
    pruned stay pruned (their magnitude is 0 and the mask zeroes them)."""
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    layers = selected_layers(model, skip or [])
    if not layers:
        raise ValueError("no prunable layer is left to prune")
    scores = [(m.weight * m.mask).abs() for _, m in layers]
    if scope == "layer":
        for (_, module), score in zip(layers, scores):
            module.set_mask(_keep_largest(score, round((1 - sparsity) * score.numel())))
        return
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = round((1 - sparsity) * flat.numel())
    kept = _keep_largest(flat, keep)
    start = 0
    for (_, module), score in zip(layers, scores):
        module.set_mask(kept[start:start + score.numel()].reshape(score.shape))
        start += score.numel()


def _keep_largest(scores, keep: int):
    """Bool mask of the `keep` largest entries (ties broken by position, so the count is exact)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(scores.reshape(-1), keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple
    total: int
    nonzeros: int

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzeros / self.total


def sparsity_table(model: nn.Module) -> list[LayerSparsity]:
    return [LayerSparsity(name, tuple(m.weight.shape), m.mask.numel(), int(m.mask.sum()))
            for name, m in prunable_layers(model)]


def achieved_sparsity(model: nn.Module, skip: list[str] | None = None) -> float:
    rows = [r for r in sparsity_table(model) if r.name not in (skip or [])]
    total = sum(r.total for r in rows)
    return 1 - sum(r.nonzeros for r in rows) / total


def check_sparsity(model: nn.Module, expected: float, skip: list[str] | None = None, tolerance: float = 1e-3) -> float:
    """The achieved sparsity; raises if it is not the expected one (a pruning bug must never pass silently)."""
    achieved = achieved_sparsity(model, skip)
    if abs(achieved - expected) > tolerance:
        raise RuntimeError(f"pruning reached sparsity {achieved:.4f} but {expected:.4f} was expected")
    return achieved


def format_table(rows: list[LayerSparsity]) -> str:
    lines = ["| layer | shape | weights | nonzeros | sparsity |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.total} | {r.nonzeros} | {r.sparsity:.3f} |")
    total = sum(r.total for r in rows)
    nonzeros = sum(r.nonzeros for r in rows)
    lines.append(f"| all | | {total} | {nonzeros} | {1 - nonzeros / total:.3f} |")
    return "\n".join(lines)
