"""Progress of a stage: one bar per stage on a terminal, plain lines in a log.

A stage (the teacher, the pruning rounds, the distillation of every student and seed) knows its total number of
optimizer steps before it starts, so one bar covers all of it and shows which training runs now. When the output is
not a terminal (a log file, a pipe, CI), a redrawn bar would write one carriage-return line per update; there the
stage writes one line per finished epoch instead, and a line when it starts and ends. Only the main rank reports.
"""
from __future__ import annotations

import logging
import sys
import time

from ptd_sparse import distributed

logger = logging.getLogger("ptd_sparse.pipeline")


def _interactive(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class StageProgress:
    """Progress of one stage of `total` optimizer steps. enabled=False (run.progress=false, --quiet) reports only the
    stage's start and end; stream: where the bar draws (default stderr, where the log goes too)."""

    def __init__(self, name: str, total: int, enabled: bool = True, stream=None):
        self.name = name
        self.total = int(total)
        self.enabled = enabled and distributed.is_main()
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.started = time.monotonic()
        if self.enabled and _interactive(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=name, unit="step", file=self.stream, dynamic_ncols=True,
                            smoothing=0.05)
        if distributed.is_main():
            logger.info("%s: started (%d steps)", name, self.total)

    def skip(self, steps: int) -> None:
        """Count steps done before this process started (a resumed run, a training already finished)."""
        if self.bar is not None:
            self.bar.update(steps)

    def step(self, steps: int, label: str, postfix: dict | None = None) -> None:
        """`steps` more steps of training `label`; postfix: running figures to show on the bar."""
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix_str(label + (" " + " ".join(f"{k}={v}" for k, v in postfix.items())
                                              if postfix else ""), refresh=False)

    def epoch(self, label: str, epoch: int, epochs: int, record: dict) -> None:
        """One finished epoch: a line in a log (on a terminal the bar shows it already)."""
        if not self.enabled or self.bar is not None:
            return
        figures = " ".join(f"{key} {record[key]:.4f}" for key in ("train_loss", "train_acc", "val_acc")
                           if key in record)
        logger.info("%s: %s epoch %d/%d %s (%.1fs)", self.name, label, epoch, epochs, figures,
                    record.get("seconds", 0.0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if distributed.is_main():
            logger.info("%s: done in %.1fs", self.name, time.monotonic() - self.started)
