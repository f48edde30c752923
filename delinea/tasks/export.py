"""Model folders: a trained task as safetensors and JSON, the format delinea ships and shares weights in.

A Lightning checkpoint is a pickle; a model folder cannot run code when it is read::

    folder/config.json            {"format": 1, "task": "MedDelineaTask", "hyper_parameters": {...},
                                   "delinea_plan": {...}, "delinea_frozen_fingerprint": "..."}
    folder/model.safetensors      the state dict (frozen backbones loaded from files are left out), or
    folder/model-00001-of-0000N.safetensors + model.safetensors.index.json   shards of at most ``max_shard_mb``

Paths among the hyperparameters (the backbone folders ``dit`` and ``vae``) are stored relative to the model folder
when they lie next to it, so a folder moved together with its backbones (the demo's, installed with the package)
still finds them. ``delinea test|predict --ckpt FOLDER`` and ``--model.init_from FOLDER`` read model folders as
they read checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from safetensors.torch import save_file

from delinea.errors import DatasetError
from delinea.models.weights import is_weight_file, read_weights
from delinea.outputs import atomic_files

FORMAT = 1
#: Hyperparameters that name files: stored relative to the folder when they lie near it.
PATH_KEYS = ("dit", "vae")
#: Hyperparameters of a training run, not of the model: dropped on export.
RUN_KEYS = ("init_from", "latent_cache")


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a model folder (a folder with a delinea ``config.json``)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def save_model_folder(
    task: LightningModule, folder: str | Path, max_shard_mb: float = 4.0, overwrite: bool = False
) -> Path:
    """Write a trained task as a model folder (what its checkpoint would hold, as safetensors and JSON).

    Raises:
        FileExistsError: ``folder`` holds files and ``overwrite`` is False.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
    checkpoint: dict[str, Any] = {"state_dict": {k: v.detach().cpu() for k, v in task.state_dict().items()}}
    task.on_save_checkpoint(checkpoint)  # the task decides what is kept and adds its plan and fingerprints
    hparams = {k: v for k, v in dict(task.hparams).items() if not k.startswith("_") and k not in RUN_KEYS}
    for key in PATH_KEYS:
        value = hparams.get(key)
        if isinstance(value, str) and Path(value).exists():
            relative = os.path.relpath(Path(value).resolve(), folder.resolve())
            hparams[key] = relative if relative.count("..") <= 1 else str(Path(value).resolve())
    config = {
        "format": FORMAT,
        "task": checkpoint["delinea_task"].rsplit(".", 1)[-1],
        "hyper_parameters": hparams,
        **{k: v for k, v in checkpoint.items() if k.startswith("delinea_") and k != "delinea_task"},
    }
    state = {k: v.contiguous() for k, v in checkpoint["state_dict"].items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    limit, size = max_shard_mb * 1e6, 0.0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0.0
        shards[-1][key] = tensor
        size += nbytes
    # Each file whole, config.json last, and an earlier save's weights that these do not replace removed after them
    # (atomic_files): a folder caught between two saves holds files that disagree, which read_weights refuses.
    with atomic_files(folder, stale=lambda name: name.startswith("model") and is_weight_file(name)) as staging:
        if len(shards) == 1:
            save_file(shards[0], str(staging / "model.safetensors"))
        else:
            index = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / name))
                index.update({key: name for key in shard})
            (staging / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}, indent=1) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def read_model_folder(folder: str | Path) -> dict[str, Any]:
    """A model folder as a checkpoint-like dict (``state_dict``, ``hyper_parameters``, ``delinea_task``,
    ``delinea_plan``, ...), with relative backbone paths resolved against the folder.

    Raises:
        DatasetError: naming the file, when the folder is not a readable model folder.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"{folder / 'config.json'}: not a delinea model folder ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "task" not in config:
        raise DatasetError(f"{folder / 'config.json'}: not a delinea model folder (expected format {FORMAT})")
    state = read_weights(folder)
    hparams = dict(config.get("hyper_parameters", {}))
    for key in PATH_KEYS:
        value = hparams.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            hparams[key] = str((folder / value).resolve())
    extras = {k: v for k, v in config.items() if k.startswith("delinea_")}
    return {"state_dict": state, "hyper_parameters": hparams, "delinea_task": config["task"], **extras}
