"""TensorBoard curves of every training of a run (run.tensorboard = true), beside metrics.jsonl.

Each training (the teacher, each pruning round, each student and seed, each sweep setting) writes its own folder
<run>/tensorboard/<stage>/<training>, so TensorBoard lists them side by side: per epoch train/loss, train/accuracy,
val/accuracy and lr, and test/accuracy once at the end. A resumed training appends a new event file to its folder;
TensorBoard joins them by epoch. Only the main rank writes. The tensorboard package is an optional extra.
"""
from __future__ import annotations

import re
from pathlib import Path

from ptd_sparse import distributed

FOLDER = "tensorboard"
EPOCH_TAGS = {"train_loss": "train/loss", "train_acc": "train/accuracy", "val_acc": "val/accuracy", "lr": "lr"}


def require() -> None:
    """Raise, naming the setting and the extra, when the tensorboard package is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        raise ImportError("run.tensorboard = true needs the tensorboard package: pip install "
                          "'ptd-sparse[tensorboard]' (or set run.tensorboard = false)") from error


def training_folder(root: Path, extra: dict, label: str) -> Path:
    """<root>/<stage>/<label>, the label made a safe folder name ("round 2 (0.36)" -> "round_2_0.36")."""
    name = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.=@-]+", "_", label)).strip("_") or "training"
    return Path(root) / str(extra.get("stage", "training")) / name


class EpochWriter:
    """The event file of one training; write() once per epoch, close() at its end."""

    def __init__(self, folder: Path):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict) -> None:
        for key, tag in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, float(record[key]), int(record["epoch"]))
        self.writer.flush()  # a run stopped between epochs keeps every finished epoch's curve

    def finish(self, epoch: int, test_acc: float | None) -> None:
        if test_acc is not None:
            self.writer.add_scalar("test/accuracy", float(test_acc), int(epoch))
        self.writer.close()


def open_writer(root: Path | None, extra: dict, label: str) -> EpochWriter | None:
    """The writer of a training, or None when TensorBoard logging is off (root None) or this is not the main rank."""
    if root is None or not distributed.is_main():
        return None
    return EpochWriter(training_folder(root, extra, label))
