"""Reading checkpoints and model folders weights-only, once, beside the table of tasks they may name
(:data:`delinea.tasks.TASKS`)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from delinea.errors import CheckpointError
from delinea.tasks.export import is_model_folder, read_model_folder


def read_checkpoint(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint read weights-only (no pickled code can run, whatever the environment says), memory-mapped
    with ``mmap``, or a model folder (:mod:`delinea.tasks.export`).

    Raises:
        CheckpointError: one line naming ``what`` and the file, and what is wrong with it.
    """
    path = Path(path)
    if is_model_folder(path):
        return read_model_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r}: no such checkpoint file or model folder")
    zipped = zipfile.is_zipfile(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except Exception as error:  # torch raises many types for files that are not checkpoints
        with open(path, "rb") as handle:
            pickled = handle.read(1) == b"\x80"  # a pickle: torch.save's legacy format, or a plain pickle
        if path.stat().st_size == 0:
            reason = "the file is empty"
        elif not zipped and not pickled:
            reason = "not a file written by torch.save (neither a zip archive nor a pickle)"
        elif isinstance(error, pickle.UnpicklingError) and "Weights only" in str(error):
            reason = "it holds objects other than tensors and plain values, which could run code: not loaded"
        else:
            reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint: {reason}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{what} {path} is not a checkpoint (a {type(checkpoint).__name__}, expected a dict)")
    return checkpoint


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
