"""Faults for tests of crash safety: a training run killed with SIGKILL at a chosen micro-batch, a process killed
while it writes a file, and writes that meet a full disk."""

from __future__ import annotations

import errno
import gzip
import os
import signal
from collections.abc import Callable
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


def full_disk(write: Callable[..., Any], room: int) -> Callable[..., Any]:
    """A ``write`` method (of a file class, e.g. ``gzip.GzipFile.write``) that takes ``room`` bytes in all, then
    fails as a full disk does: ``OSError(ENOSPC)``, with the bytes before it written."""
    taken = [0]

    def failing(self: Any, data: Any) -> Any:
        taken[0] += len(memoryview(data))
        if taken[0] > room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, data)

    return failing


class _FullDiskFile:
    """An open file whose writes fail as on a full disk once ``room`` bytes are taken."""

    def __init__(self, handle: Any, room: int) -> None:
        self._handle = handle
        self._write = full_disk(lambda _, data: handle.write(data), room)

    def write(self, data: Any) -> Any:
        return self._write(self, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def open_on_full_disk(room: int, after: int = 0, name_part: str = "") -> Callable[..., Any]:
    """A replacement for ``open`` whose files opened for writing with ``name_part`` in their name, from the
    ``after + 1``-th on, take ``room`` bytes and then fail as on a full disk (for writers that take an open file,
    such as ``torch.save``)."""
    opened = [0]

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(file, mode, *args, **kwargs)  # returned to the caller, who closes it
        if not set(mode) & set("wax+") or name_part not in str(file):
            return handle
        opened[0] += 1
        return _FullDiskFile(handle, room) if opened[0] > after else handle

    return fake_open


def kill_at_write(name_part: str, nth: int) -> None:
    """From now on in this process, SIGKILL at the ``nth`` gzip write (counted from 1) into a file whose name holds
    ``name_part``, after that write reached the disk: a ``.nii.gz`` caught half-written."""
    write = gzip.GzipFile.write
    seen = [0]

    def killing(self: gzip.GzipFile, data: Any) -> int:
        written = write(self, data)
        name = self.name or getattr(self.fileobj, "name", "")  # nibabel's gzip files name only their raw file
        if name_part in str(name):
            seen[0] += 1
            if seen[0] == nth:
                self.flush()
                self.fileobj.flush()  # type: ignore[union-attr]
                os.kill(os.getpid(), signal.SIGKILL)
        return written

    gzip.GzipFile.write = killing  # type: ignore[method-assign]


def kill_at_replace(nth: int) -> None:
    """From now on in this process, SIGKILL just before the ``nth`` rename (counted from 1) of a finished file over
    its target (``os.replace``): between two files of one case."""
    replace = os.replace
    seen = [0]

    def killing(source: Any, target: Any) -> None:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(source, target)

    os.replace = killing  # type: ignore[assignment]
