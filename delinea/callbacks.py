"""What writes files during a run; the tasks only compute. The callbacks that write what ``delinea test`` and
``delinea predict`` produce check their outputs before the first batch, so a run that would refuse to overwrite, or
could not write, stops before any computation. :class:`AtomicCheckpointIO` writes checkpoints whole or not at all, and
:class:`NewestLastCheckpoint` keeps ``last.ckpt`` the newest state.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from delinea.datamodules.batches import SliceData
from delinea.errors import OutputError
from delinea.evaluation import save_overlays, write_reports
from delinea.outputs import atomic_path, check_writable
from delinea.segmenter import Segmenter, check_outputs
from delinea.tasks import SegmentationTask

REPORT_FILES = ("metrics_per_case.csv", "metrics_summary.json", "metrics_table.md")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all (:func:`delinea.outputs.atomic_path`): into a temporary file beside the
    target (``.<name>.tmp-<host>-<pid>``), flushed to disk, then renamed over the target. A kill, a full disk or a
    file-size limit during a save leaves the previous checkpoint intact; a full disk stops the run with one line
    saying so; the temporary file of a save that failed is removed, one left by a SIGKILL is removed by the next
    run's first save into the folder (and is never mistaken for a checkpoint). Lightning's own writer stages the
    file in ``$TMPDIR`` and moves it, which becomes a truncating copy when that is another filesystem.

    Remote paths (``s3://``, ...) are left to Lightning's writer.

    It also reads each checkpoint once: one the CLI has read already (to build the model from its hyperparameters and
    check that it fits) is handed over (:meth:`hand_over`) and given to the trainer when it resumes from that path,
    instead of being read again."""

    def __init__(self) -> None:
        super().__init__()
        self._read: dict[Path, dict[str, Any]] = {}

    def hand_over(self, path: str | Path, checkpoint: dict[str, Any]) -> None:
        """Give the checkpoint at ``path``, already read, to the next load of that path."""
        self._read[Path(path).resolve()] = checkpoint

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        read = self._read.pop(Path(path).resolve(), None) if "://" not in str(path) else None
        if read is not None:
            return read
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_path(path) as temporary, open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
        except OutputError as error:
            raise OutputError(
                f"checkpoint {error}; the checkpoints saved before it stay loadable: make room, then resume from the "
                "newest (--ckpt_path)"
            ) from None


class NewestLastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` (``save_last``) is always the newest state.

    Lightning 2.6 rewrites ``last.ckpt`` only when it saves another checkpoint in the same step: with a monitor it
    is the best state, not the last, and a run stopped by ``max_time`` between two ``every_n_train_steps`` saves
    loses its final steps. This one also writes it after every validation and when training ends, so
    ``--ckpt_path last`` resumes where the run stopped and a finished run's ``last.ckpt`` is its final model.
    The CLI gives every ``ModelCheckpoint`` with ``save_last`` this behaviour."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_newest(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_newest(trainer)

    def _save_newest(self, trainer: Trainer) -> None:
        # skipped in the sanity check, after the fit, and when this step was saved already
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RunOptions(Callback):
    """Records the options a run was started with (its model, data and seed) in every checkpoint it saves, as
    ``delinea_options``: ``--ckpt_path last`` resumes the run whose options are the ones given
    (:func:`delinea.main.find_last_checkpoint`)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["delinea_options"] = self.options


class CheckpointFolderLock(Callback):
    """Refuses a second ``fit`` writing checkpoints into the folder of a running one (runs without a logger share
    ``<default_root_dir>/checkpoints``; a logger gives each run its own version folder). The lock is an advisory
    ``flock`` on ``.delinea-fit.lock`` in each checkpoint folder, which the system releases when the process ends,
    however it ends."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if folder is None or "://" in str(folder):
                continue
            lock = Path(folder) / ".delinea-fit.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")  # held open for the run: closing it releases the lock
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise OutputError(
                    f"checkpoint folder {folder} is in use by another running fit ({owner}); give this run its own "
                    "--trainer.default_root_dir, or keep a logger, which gives each run a version folder"
                ) from None
            except OSError:  # a filesystem without locks: nothing to hold
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            self._handles.append(handle)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []


def output_folder(output_dir: str | Path | None, trainer: Trainer, stage: str) -> Path:
    """The folder a stage writes into: ``output_dir``, else ``<the run's log folder>/<stage>``."""
    if output_dir is not None:
        return Path(output_dir)
    return Path(trainer.log_dir or trainer.default_root_dir) / stage


class TestReport(Callback):
    """Writes a test run's reports: ``metrics_table.md`` (the paper's per-organ table), ``metrics_per_case.csv``,
    ``metrics_summary.json`` and ``overlays/<case>.png`` for the first ``overlays`` cases of each rank.

    Args:
        output_dir: the folder; None: ``<run log folder>/test``.
        overwrite: replace existing reports and figures.
        overlays: cases per rank to draw overlay figures for (image, ground truth, prediction).
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False, overlays: int = 3) -> None:
        if overlays < 0:
            raise ValueError(f"overlays must be non-negative, got {overlays}")
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.overlays = overlays
        self._drawn = 0

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder = output_folder(self.output_dir, trainer, "test")
        self._drawn = 0
        if trainer.is_global_zero:
            check_writable(self.folder, [self.folder / name for name in REPORT_FILES], self.overwrite)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for case in outputs or ():
            if self._drawn >= self.overlays:
                break
            if case.image is None or case.label is None:
                continue
            save_overlays(
                case.image.astype(np.float32),  # the scan as its batches carried it: nothing is read again
                case.label,
                case.labels,
                self.folder / "overlays" / case.case_id,
                spacing=case.geometry.spacing,
                overwrite=self.overwrite,
            )
            self._drawn += 1

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            write_reports(pl_module.test_rows, self.folder, overwrite=self.overwrite, method=type(pl_module).__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted case as the task's :class:`~delinea.Segmenter` writes it (:meth:`Segmenter.write`):
    ``<case>_seg.nii.gz`` on the input's exact grid (shape, affine, voxel order), a ``<case>_seg.json`` sidecar, and
    with ``save_uncertainty`` ``<case>_uncertainty.nii.gz``.

    Args:
        output_dir: the folder; None: ``<run log folder>/predict``.
        overwrite: replace existing files.
        save_uncertainty: also write the per-voxel uncertainty map.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False, save_uncertainty: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.save_uncertainty = save_uncertainty

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder = output_folder(self.output_dir, trainer, "predict")
        data = trainer.datamodule
        sources = {c: data.case_path(c) for c in data.predict_cases()} if isinstance(data, SliceData) else {}
        check_outputs(self.folder, sources, self.overwrite, self.save_uncertainty)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        data = trainer.datamodule
        if not isinstance(pl_module, SegmentationTask) or not isinstance(data, SliceData):
            return
        segmenter = pl_module.segmenter
        if not isinstance(segmenter, Segmenter):
            raise TypeError(f"{type(pl_module).__name__} predicted without a delinea.Segmenter to write its cases")
        for case in prediction or ():
            segmenter.write(case, self.folder, data.case_path(case.case_id), self.overwrite, self.save_uncertainty)
