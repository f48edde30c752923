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


def checkpoint_hparams(checkpoint: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """A checkpoint's (or model folder's) hyperparameters, which must be plain values: a class path among them would
    make the CLI import and build what the file names.

    Raises:
        CheckpointError: naming the file (a model folder's ``config.json``) and the hyperparameter.
    """

    def holds_class(value: Any) -> bool:
        if isinstance(value, dict):
            return "class_path" in value or any(holds_class(v) for v in value.values())
        return isinstance(value, list | tuple) and any(holds_class(v) for v in value)

    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not str(k).startswith("_")}
    for key, value in hparams.items():
        if holds_class(value):
            where = Path(source) / "config.json" if Path(source).is_dir() else source
            raise CheckpointError(
                f"{where}: hyperparameter {key!r} holds a class path ({str(value)[:80]}); delinea's hyperparameters "
                "are plain values (numbers, strings, lists): refused"
            )
    return hparams


def load_task(path: str | Path, map_location: str | Any = "cpu", **overrides: Any) -> SegmentationTask:
    """A trained task from a checkpoint or a model folder, read weights-only and built from its hyperparameters
    (``overrides`` replace some, e.g. ``sampling_steps=10``), in eval mode."""
    from delinea.tasks.export import load_into

    checkpoint = read_checkpoint(path)
    cls = checkpoint_task(checkpoint, path)
    hparams = checkpoint_hparams(checkpoint, path)
    task = load_into(cls(**{**hparams, **overrides}), checkpoint, path)
    return task.to(map_location).eval()


__all__ = [
    "TASKS",
    "MedDelineaTask",
    "SegmentationTask",
    "UNetTask",
    "checkpoint_hparams",
    "checkpoint_task",
    "load_task",
]
