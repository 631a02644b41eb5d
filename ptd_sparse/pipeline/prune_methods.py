"""The pruning methods (prune.method), each a strategy registered by name: how the levels are reached and how the
network is retrained after each round of magnitude pruning (ptd_sparse.pipeline.pruning).

    lr_rewind      the paper's: every round retrains with the whole prune schedule, replayed from its start
    weight_rewind  the surviving weights go back to the teacher's initial values before each round's retraining
    finetune       each round retrains at the constant learning rate prune.finetune_lr
    oneshot        one round per target, straight from the teacher, retrained as lr_rewind does

Adding a method is one subclass of PruneMethod and one entry in PRUNE_METHODS; the configuration admits the names
of PRUNE_METHODS and the prune stage calls the strategy's hooks.
"""
from __future__ import annotations

import torch
from torch import nn

from ptd_sparse.pipeline.models import prunable_layers
from ptd_sparse.pipeline.prune_plan import pruning_levels
from ptd_sparse.pipeline.training import Schedule


class PruneMethod:
    """Learning-rate rewinding; the other methods change one hook."""

    one_shot = False  # prune straight to each target (no geometric rounds in between)

    def levels(self, targets: list[float], rate: float) -> list[float]:
        """The sparsity after each round, ascending; every target is one of them."""
        return pruning_levels(targets, rate, one_shot=self.one_shot)

    def rewind(self, model: nn.Module, init: nn.Module) -> None:
        """After a round's pruning, before its retraining: the weights it starts from (the pruned ones as they are)."""

    def schedule(self, schedule: Schedule, finetune_lr: float) -> Schedule:
        """The retraining schedule of a round, given the prune section's own."""
        return schedule


class WeightRewind(PruneMethod):
    @torch.no_grad()
    def rewind(self, model: nn.Module, init: nn.Module) -> None:
        for (_, layer), (_, start) in zip(prunable_layers(model), prunable_layers(init)):
            layer.weight.copy_(start.weight * layer.mask)


class Finetune(PruneMethod):
    def schedule(self, schedule: Schedule, finetune_lr: float) -> Schedule:
        return Schedule(schedule.epochs, finetune_lr, schedule.weight_decay, (), 1.0, batch_size=schedule.batch_size)


class OneShot(PruneMethod):
    one_shot = True


PRUNE_METHODS: dict[str, PruneMethod] = {
    "lr_rewind": PruneMethod(),
    "weight_rewind": WeightRewind(),
    "finetune": Finetune(),
    "oneshot": OneShot(),
}
