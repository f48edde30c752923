"""What writes files during a run; the tasks only compute. The callbacks that write what ``delinea test`` and
``delinea predict`` produce check their outputs before the first batch, so a run that would refuse to overwrite, or
could not write, stops before any computation. :class:`AtomicCheckpointIO` writes checkpoints whole or not at all, and
:class:`NewestLastCheckpoint` keeps ``last.ckpt`` the newest state.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from delinea.errors import OutputError
from delinea.evaluation import save_overlays, write_reports
from delinea.io import PREDICTION_DESCRIPTION, atomic_path, remove_stale_temporaries, save_nifti, write_atomic
from delinea.labels import ORGANS
from delinea.tasks.volumes import PredictedCase

REPORT_FILES = ("metrics_per_case.csv", "metrics_summary.json", "metrics_table.md")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all (:func:`delinea.io.atomic_path`): into a temporary file beside the
    target (``.<name>.tmp-<host>-<pid>``), flushed to disk, then renamed over the target. A kill, a full disk or a
    file-size limit during a save leaves the previous checkpoint intact; a full disk stops the run with one line
    saying so; the temporary file of a save that failed is removed, one left by a SIGKILL is removed by the next
    run's first save into the folder (and is never mistaken for a checkpoint). Lightning's own writer stages the
    file in ``$TMPDIR`` and moves it, which becomes a truncating copy when that is another filesystem.

    Remote paths (``s3://``, ...) are left to Lightning's writer."""

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


def check_writable(folder: Path, targets: Sequence[Path], overwrite: bool) -> None:
    """Refuse before any work: an output folder that is a file or cannot be written, or existing targets.

    Raises:
        FileExistsError: a target exists and ``overwrite`` is False (the first few are named).
        NotADirectoryError: ``folder`` (or a parent) is a file.
        PermissionError: ``folder`` cannot be created or written.
    """
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"output {folder}: {parent} is a file, not a folder")
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise FileExistsError(f"{names} exist(s); pass --overwrite true to replace, or choose another --output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"output {folder} cannot be written ({error.strerror or error})") from None


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
            image = trainer.datamodule.load_image(case.case_id)  # the image is read for figures only
            save_overlays(
                image,
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
    """Writes each predicted case as ``<case>_seg.nii.gz`` on the input's exact grid (shape, affine, voxel
    order), a ``<case>_seg.json`` sidecar, and with ``save_uncertainty`` ``<case>_uncertainty.nii.gz``.

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

    def targets(self, case_id: str) -> dict[str, Path]:
        """The files written for a case."""
        out = {"labels": self.folder / f"{case_id}_seg.nii.gz", "sidecar": self.folder / f"{case_id}_seg.json"}
        if self.save_uncertainty:
            out["uncertainty"] = self.folder / f"{case_id}_uncertainty.nii.gz"
        return out

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder = output_folder(self.output_dir, trainer, "predict")
        datamodule = trainer.datamodule
        cases = datamodule.predict_cases() if hasattr(datamodule, "predict_cases") else []
        targets = [p for c in cases for p in self.targets(c).values()]
        # An output never replaces an input, whatever --overwrite says (a scan named like another's prediction).
        inputs = {datamodule.case_path(c).resolve(): c for c in cases} if hasattr(datamodule, "case_path") else {}
        for target in targets:
            if target.resolve() in inputs:
                raise OutputError(
                    f"--output {self.folder}: {target.name} would replace the input scan {target} (case "
                    f"{inputs[target.resolve()]!r}); choose another --output, or rename the scan"
                )
        # Every case's files are checked now: a later case must not fail after earlier ones were written.
        check_writable(self.folder, targets, self.overwrite)
        remove_stale_temporaries(self.folder)

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
        for case in prediction or ():
            self.write(case, trainer, pl_module)

    def write(self, case: PredictedCase, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write one case's label map (and uncertainty) in the input's voxel order, then its sidecar; each file whole
        or not at all (:func:`~delinea.io.atomic_path`)."""
        targets = self.targets(case.case_id)
        geometry = case.geometry
        # The sidecar is written last: its presence means the case is complete. An earlier one goes first, so that a
        # run stopped between the files never leaves an old sidecar beside a new label map.
        targets["sidecar"].unlink(missing_ok=True)
        save_nifti(
            geometry.to_original(case.labels).astype(np.uint8),
            geometry.original_affine,
            targets["labels"],
            overwrite=self.overwrite,
            description=f"{PREDICTION_DESCRIPTION}: labels",
        )
        if self.save_uncertainty:
            save_nifti(
                geometry.to_original(case.uncertainty.astype(np.float32)),
                geometry.original_affine,
                targets["uncertainty"],
                overwrite=self.overwrite,
                description=f"{PREDICTION_DESCRIPTION}: uncertainty",
            )
        present = sorted(int(v) for v in np.unique(case.labels) if v)
        plan = getattr(trainer.datamodule, "plan", None)
        sidecar = {
            "source": str(trainer.datamodule.case_path(case.case_id)),
            "labels": {str(i): name for i, name in enumerate(ORGANS)},
            "present": {ORGANS[i]: int((case.labels == i).sum()) for i in present},
            "spacing_mm": [float(s) for s in geometry.spacing],
            "model": type(pl_module).__name__,
            "plan": plan.to_dict() if plan is not None else None,
            "files": {k: str(v) for k, v in targets.items() if k != "sidecar"},
        }
        if hasattr(trainer.datamodule, "case_notes"):
            sidecar |= trainer.datamodule.case_notes(case.case_id)
        write_atomic(targets["sidecar"], json.dumps(sidecar, indent=2) + "\n")
