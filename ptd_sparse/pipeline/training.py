"""One training loop for every stage: the teacher, retraining between pruning rounds, and distillation.

SGD with Nesterov momentum and either a multi-step schedule (stepped per epoch, the paper's) or a one-cycle schedule
(linear warm-up, then cosine annealing to zero, stepped per batch: what trains a small network well in a few epochs);
batched tensor augmentation; the model with the best
validation accuracy is kept and evaluated on the test split. Where the loss comes from is one small object, the
teacher signal, that the loop asks for each batch's views and loss: `CrossEntropy` (no teacher) or `Distillation`
(the fused kd_loss against a live teacher in eval mode on the same augmented batch, or against a cache). The loop
saves its state after every epoch and resumes from it, so an interrupted stage continues where it stopped. Under
torchrun it wraps the model in DistributedDataParallel and each rank trains on its own share of every epoch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptd_sparse import distributed
from ptd_sparse.data import Augmentation, Dataset, Split, Views, apply_views, batches, normalize, sample_views
from ptd_sparse.functional import kd_loss
from ptd_sparse.pipeline import tensorboard
from ptd_sparse.pipeline.checkpoint import load_state, save_state
from ptd_sparse.pipeline.progress import StageProgress
from ptd_sparse.topk_teacher import TopKTeacher


PROGRESS_EVERY = 20  # steps between progress-bar updates (each reads the running sums back from the device)


SCHEDULES = ("multistep", "onecycle")  # the kinds of Schedule


@dataclass(frozen=True)
class Schedule:
    """How one training runs. kind "multistep": lr times gamma at each milestone epoch; "onecycle": lr / 25 rising
    linearly to lr over the first `warmup` fraction of the steps, then cosine annealing to zero by the last step
    (milestones and gamma unused). label_smoothing applies to trainings without a teacher (cross-entropy)."""

    epochs: int
    lr: float
    weight_decay: float
    milestones: tuple = ()
    gamma: float = 0.1
    momentum: float = 0.9
    batch_size: int = 128
    kind: str = "multistep"
    warmup: float = 0.2
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"schedule warmup must lie in [0, 1), got {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


class OneCycle:
    """The learning-rate factor of step s of a one-cycle schedule over `total` steps: 1/25 rising linearly to 1 over
    `warmup` steps, then 0.5 (1 + cos(pi t)) with t going from 0 to 1 over the remaining steps. A callable object
    (not a lambda) so that LambdaLR's state dict records it and a resumed training continues the same curve."""

    START = 1 / 25  # the usual one-cycle starting fraction (Smith & Topin 2017)

    def __init__(self, total: int, warmup: int):
        self.total = max(int(total), 1)
        self.warmup = min(max(int(warmup), 0), self.total - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.START + (1 - self.START) * step / self.warmup
        t = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * t))


def steps_per_epoch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """The optimizer steps of one epoch on this rank: its share of `samples` (data.batches) in batches."""
    share = samples // world_size if world_size > 1 else samples
    return -(-share // batch_size)


def lr_scheduler(optimizer, schedule: Schedule, steps: int):
    """(scheduler, per_step) of `schedule` for an epoch of `steps` optimizer steps: a one-cycle schedule is stepped
    after every batch, a multi-step one after every epoch."""
    if schedule.kind == "onecycle":
        total = schedule.epochs * steps
        cycle = OneCycle(total, round(schedule.warmup * total))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, cycle), True
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(schedule.milestones), schedule.gamma), False


@dataclass
class CrossEntropy:
    """The signal of a training without a teacher: fresh random views, cross-entropy on the labels (optionally
    label-smoothed)."""

    label_smoothing: float = 0.0

    def to(self, device: torch.device) -> "CrossEntropy":
        return self

    def views(self, index: Tensor, epoch: int, augmentation: Augmentation, generator: torch.Generator) -> Views:
        return sample_views(len(index), augmentation, generator)

    def loss(self, logits: Tensor, inputs: Tensor, labels: Tensor, index: Tensor, epoch: int) -> Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


@dataclass
class Distillation:
    """The KD signal of a training: kd_loss against a teacher. With a `cache` (ptd_sparse.cache.TeacherCache) every
    batch replays the cached views of its samples (epoch e: view e mod K); the teacher's output then comes from the
    cache when `teacher` is None, else from running `teacher` live on those same views (the on-the-fly reference of
    the cache). Without a cache, the teacher runs live (in eval mode) on the batch's fresh random views."""

    teacher: nn.Module | None
    alpha: float
    temperature: float
    cache: object | None = None

    def to(self, device: torch.device) -> "Distillation":
        if self.teacher is not None:
            self.teacher.to(device).eval()
        return self

    def views(self, index: Tensor, epoch: int, augmentation: Augmentation, generator: torch.Generator) -> Views:
        if self.cache is not None:
            return self.cache.views(index, epoch)
        return sample_views(len(index), augmentation, generator)

    def teacher_output(self, inputs: Tensor, index: Tensor, epoch: int) -> Tensor | TopKTeacher:
        """The teacher's logits [B, C] for the batch `inputs` (samples `index` of the training split), or the
        cached TopKTeacher."""
        if self.teacher is not None:
            with torch.no_grad():
                return self.teacher(inputs).float()
        return self.cache.teacher(index, epoch, inputs.device)

    def loss(self, logits: Tensor, inputs: Tensor, labels: Tensor, index: Tensor, epoch: int) -> Tensor:
        return kd_loss(logits.float(), self.teacher_output(inputs, index, epoch), labels, alpha=self.alpha,
                       temperature=self.temperature)


@dataclass
class Context:
    dataset: Dataset
    augmentation: Augmentation
    device: torch.device
    seed: int = 0
    progress: bool = True
    metrics_path: Path | None = None
    extra: dict = field(default_factory=dict)  # written with every metrics line (stage, variant, ...)
    # Mixed precision and layout of training (see precision_for / channels_last_for): autocast to this dtype in the
    # forward passes (None: no autocast), channels_last models and batches.
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    # The progress of the stage this training belongs to (one bar or log for all its trainings); None: fit reports
    # on a StageProgress of its own.
    stage: StageProgress | None = None
    # Where TensorBoard curves go (ptd_sparse.pipeline.tensorboard); None: not written.
    tensorboard_dir: Path | None = None


def precision_for(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of run.precision on `device`: "auto" is bfloat16 on GPUs (no loss scaling needed) and none
    on CPUs, where bfloat16 matmuls are slower than float32 without AMX; "float32" is none."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if precision == "float32" else getattr(torch, precision)


def channels_last_for(device: torch.device, memory_format: str = "auto") -> bool:
    """Whether run.memory_format puts models and batches in channels_last ("auto": on GPUs, where cuDNN's NHWC
    kernels are faster)."""
    return device.type == "cuda" if memory_format == "auto" else memory_format == "channels_last"


def evaluate(model: nn.Module, split: Split, ctx: Context, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on `split`."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for _, images, labels in batches(split, batch_size, shuffle=False):
            logits = model(normalize(images.to(ctx.device), ctx.dataset))
            correct += int((logits.argmax(1).cpu() == labels).sum())
    model.train(was_training)
    return correct / max(len(split), 1)


def _log(ctx: Context, record: dict) -> None:
    if ctx.metrics_path is None or not distributed.is_main():
        return
    ctx.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with open(ctx.metrics_path, "a") as f:
        f.write(json.dumps({**ctx.extra, **record}) + "\n")


@dataclass
class _Progress:
    """What a training resumes from: the next epoch, the best validation accuracy so far and that model's state."""

    epoch: int = 0
    best_acc: float = -1.0
    best_state: dict | None = None


def _resume(model: nn.Module, optimizer, scheduler, state_path: Path, ctx: Context, label: str) -> _Progress:
    if not Path(state_path).exists():
        return _Progress()
    state = load_state(state_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _log(ctx, {"event": "resumed", "label": label, "epoch": state["epoch"]})
    return _Progress(state["epoch"], state["best_acc"], state["best_model"])


def _train_epoch(trained: nn.Module, optimizer, scheduler, signal, ctx: Context, schedule: Schedule, epoch: int,
                 label: str, stage: StageProgress) -> dict:
    """One epoch of steps on this rank's share of the training split; returns the epoch's training metrics. A
    per-step `scheduler` steps after every batch (None: the caller steps it per epoch)."""
    trained.train()
    split = ctx.dataset.train
    generator = torch.Generator().manual_seed(ctx.seed * 7919 + epoch * 31 + distributed.rank())
    # Running sums stay on the device: reading them every step would stall a GPU once per step.
    seen = 0
    total_loss = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), dtype=torch.long, device=ctx.device)
    stream = batches(split, schedule.batch_size, True, ctx.seed, epoch, distributed.rank(), distributed.world_size())
    pending = 0
    for step, (index, images, labels) in enumerate(stream, start=1):
        views = signal.views(index, epoch, ctx.augmentation, generator)
        inputs = normalize(apply_views(images.to(ctx.device), views, ctx.augmentation.crop_padding), ctx.dataset)
        if ctx.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        labels = labels.to(ctx.device)
        with torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype or torch.float32,
                            enabled=ctx.autocast_dtype is not None):
            logits = trained(inputs)
            loss = signal.loss(logits, inputs, labels, index, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        pending += 1
        if step % PROGRESS_EVERY == 0:
            stage.step(pending, f"{label} {epoch + 1}/{schedule.epochs}",
                       {"loss": f"{float(total_loss) / seen:.3f}", "acc": f"{int(correct) / seen:.3f}"}
                       if stage.bar is not None else None)
            pending = 0
    stage.step(pending, f"{label} {epoch + 1}/{schedule.epochs}")
    return {"train_loss": float(total_loss) / max(seen, 1), "train_acc": int(correct) / max(seen, 1)}


def fit(model: nn.Module, ctx: Context, schedule: Schedule, state_path: Path, label: str,
        distillation: Distillation | None = None, on_epoch_end=None, test: bool = True) -> dict:
    """Train `model` in place; returns {"best_val_acc", "test_acc", "epochs"}. Resumes from `state_path`.

    The loss comes from the teacher signal: `distillation` (a live teacher or a cache), else cross-entropy.
    test=False leaves the test split untouched (test_acc None), for choices made on the validation split."""
    model.to(ctx.device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum, nesterov=True,
                                weight_decay=schedule.weight_decay)
    steps = steps_per_epoch(len(ctx.dataset.train), schedule.batch_size, distributed.world_size())
    scheduler, per_step = lr_scheduler(optimizer, schedule, steps)
    progress = _resume(model, optimizer, scheduler, state_path, ctx, label)
    stage = ctx.stage or StageProgress(label, schedule.epochs * steps, ctx.progress)
    stage.skip(progress.epoch * steps)
    trained = distributed.wrap(model)
    signal = (distillation or CrossEntropy(schedule.label_smoothing)).to(ctx.device)
    board = tensorboard.open_writer(ctx.tensorboard_dir, ctx.extra, label)
    for epoch in range(progress.epoch, schedule.epochs):
        started = time.time()
        metrics = _train_epoch(trained, optimizer, scheduler if per_step else None, signal, ctx, schedule, epoch,
                               label, stage)
        if not per_step:
            scheduler.step()
        val_acc = evaluate(model, ctx.dataset.val, ctx)
        if val_acc > progress.best_acc:
            progress.best_acc = val_acc
            progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        record = {"label": label, "epoch": epoch + 1, **metrics, "val_acc": val_acc,
                  "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - started, 2)}
        _log(ctx, record)
        if board is not None:
            board.write(record)
        stage.epoch(label, epoch + 1, schedule.epochs, record)
        if distributed.is_main():
            save_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                                    "best_acc": progress.best_acc, "best_model": progress.best_state})
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    test_acc = evaluate(model, ctx.dataset.test, ctx) if test else None
    result = {"best_val_acc": progress.best_acc, "test_acc": test_acc, "epochs": schedule.epochs}
    _log(ctx, {"label": label, "event": "finished", **result})
    if board is not None:
        board.finish(schedule.epochs, test_acc)
    if ctx.stage is None:
        stage.close()
    return result
