"""Lightning tasks: they build the networks of ``delinea.models``, freeze them by flags and train them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from delinea.errors import CheckpointError
from delinea.tasks.base import SegmentationTask, read_checkpoint
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


def load_task(path: str | Path, map_location: str | Any = "cpu", **overrides: Any) -> SegmentationTask:
    """A trained task from a checkpoint or a model folder, read weights-only and built from its hyperparameters
    (``overrides`` replace some, e.g. ``sampling_steps=10``), in eval mode."""
    from delinea.tasks.export import load_into

    checkpoint = read_checkpoint(path)
    cls = checkpoint_task(checkpoint, path)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    task = load_into(cls(**{**hparams, **overrides}), checkpoint)
    return task.to(map_location).eval()


__all__ = ["TASKS", "MedDelineaTask", "SegmentationTask", "UNetTask", "checkpoint_task", "load_task"]
