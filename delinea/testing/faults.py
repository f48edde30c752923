"""Faults for tests of crash safety: a training run killed with SIGKILL at a chosen micro-batch."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAtBatch(Callback):
    """Kill the process with SIGKILL (no handler runs, nothing is flushed) when training micro-batch ``batch`` of
    the run (counted from 0 across epochs and resumes) is about to start. The checkpoints of the micro-batches
    before it are on disk: Lightning's ``ModelCheckpoint`` saves at the end of a batch."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.completed == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
