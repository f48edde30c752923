"""Lightning tasks: they build the networks of ``delinea.models``, freeze them by flags and train them; the table of
tasks a checkpoint may name, beside the checkpoint reading of :mod:`delinea.tasks.checkpoints`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from delinea.errors import CheckpointError
from delinea.tasks.base import SegmentationTask
from delinea.tasks.checkpoints import checkpoint_hparams, read_checkpoint
from delinea.tasks.export import RUN_KEYS
from delinea.tasks.meddelinea import MedDelineaTask
from delinea.tasks.unet import UNetTask

#: The tasks a checkpoint or ``--model`` may name: nothing else is ever imported because a file says so.
TASKS: dict[str, type[SegmentationTask]] = {cls.__name__: cls for cls in (MedDelineaTask, UNetTask)}


def checkpoint_task(checkpoint: dict[str, Any], source: str | Path) -> type[SegmentationTask]:
    """The registered task class a checkpoint (or model folder) was saved from.

    Raises:
        CheckpointError: it names no task, or one that is not in :data:`TASKS`.
    """
    recorded = str(checkpoint.get("delinea_task") or checkpoint.get("hyper_parameters", {}).get("_class_path") or "")
    name = recorded.rsplit(".", 1)[-1]
    if name not in TASKS or recorded not in (name, f"{TASKS[name].__module__}.{name}"):
        raise CheckpointError(
            f"checkpoint {source} names task {recorded!r}, which is not one of delinea's ({', '.join(TASKS)}); refused"
        )
    return TASKS[name]


def task_from_checkpoint(
    checkpoint: dict[str, Any], source: str | Path, inference: bool = False, **overrides: Any
) -> SegmentationTask:
    """The task a checkpoint (or model folder) already read names, built from its hyperparameters (``overrides``
    replace some, e.g. ``sampling_steps=10``; ``inference`` drops the training-only ``init_from`` and
    ``latent_cache``) and holding its weights and plan."""
    hparams = {k: v for k, v in checkpoint_hparams(checkpoint, source).items() if not (inference and k in RUN_KEYS)}
    task = checkpoint_task(checkpoint, source)(**{**hparams, **overrides})
    return task.restore(checkpoint, source)


def load_task(
    path: str | Path, map_location: str | Any = "cpu", inference: bool = False, **overrides: Any
) -> SegmentationTask:
    """A trained task from a checkpoint or a model folder, read once and weights-only, built from its
    hyperparameters (see :func:`task_from_checkpoint`), in eval mode."""
    task = task_from_checkpoint(read_checkpoint(path), path, inference, **overrides)
    return task.to(map_location).eval()


__all__ = [
    "TASKS",
    "MedDelineaTask",
    "SegmentationTask",
    "UNetTask",
    "checkpoint_hparams",
    "checkpoint_task",
    "load_task",
    "read_checkpoint",
    "task_from_checkpoint",
]
