"""The sparsity levels of iterative pruning, one per round, that reach every target exactly (docs/design.md, 1.1).

Rounds remove `rate` of the remaining weights: after k rounds the sparsity is 1 - (1 - rate)^k. A target s takes
the place of round n, the n whose level is closest to s (0.79 -> 7, 0.59 -> 4, 0.36 -> 2 at rate 0.2), so its last
round is trimmed (or stretched) to land on s. Two targets closest to the same round (0.36 and 0.40 both to round 2)
cannot share it: the higher one gets an explicit round of its own right after the lower one, so every target is a
level, reached exactly and written. Pure Python, so the configuration can be checked before any work is done.
"""
from __future__ import annotations

import math

def rounds_for(target: float, rate: float = 0.2) -> int:
    """The n whose 1 - (1 - rate)^n is closest to target (0.79 -> 7, 0.59 -> 4, 0.36 -> 2 at rate 0.2)."""
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    if not 0 < rate < 1:
        raise ValueError(f"pruning rate must lie in (0, 1), got {rate}")
    if target == 0:
        return 0
    best = round(math.log(1 - target) / math.log(1 - rate))
    candidates = [n for n in (best - 1, best, best + 1) if n >= 1]
    return min(candidates, key=lambda n: abs(1 - (1 - rate) ** n - target))


def sparsity_after(rounds: int, rate: float = 0.2) -> float:
    return 1 - (1 - rate) ** rounds


def target_name(target: float) -> str:
    """The folder name of a pruned teacher (prune/sparsity_<s>/, design/, students/...)."""
    return f"sparsity_{target:.2f}"


def pruning_levels(targets: list[float], rate: float = 0.2, one_shot: bool = False) -> list[float]:
    """The sparsity after each round, ascending; every target is one of them. one_shot: straight to each target (the
    oneshot method, ptd_sparse.pipeline.prune_methods)."""
    if not targets:
        raise ValueError("pruning needs at least one target sparsity")
    for target in targets:
        if not 0 < target < 1:
            raise ValueError(f"every target sparsity must lie in (0, 1), got {target}")
    names: dict[str, float] = {}
    for target in sorted(set(targets)):
        other = names.setdefault(target_name(target), target)
        if other != target:
            raise ValueError(f"targets {other} and {target} would both be written as {target_name(target)}; "
                             "targets must differ in their first two decimals")
    if one_shot:
        return sorted(set(targets))
    claimed = {rounds_for(target, rate) for target in targets}
    geometric = [sparsity_after(k, rate) for k in range(1, rounds_for(max(targets), rate) + 1)]
    # Rounds no target claims keep their geometric level; every target is a level of its own (colliding targets
    # included), in ascending order, so each round prunes further than the one before.
    levels = {level for k, level in enumerate(geometric, start=1) if k not in claimed} | set(targets)
    return sorted(levels)
