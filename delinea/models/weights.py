"""Reading network weights without running code: diffusers model folders (safetensors, or ``.bin`` read
weights-only) and torch files, and loading them with messages that name the file and the keys that do not fit."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from delinea.errors import CheckpointError


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read the weights of a diffusers model folder: safetensors preferred, else a ``.bin`` without pickled code."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors or *.bin weight file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)) if file.suffix == ".safetensors" else load_torch_file(file))
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names the file and the missing, unexpected or mis-shaped keys on failure."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights in {source} do not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shapes)} with another shape {sorted(shapes)[:3]}"
        )
    model.load_state_dict(state)


#: The only class besides tensors and plain containers that a weights-only load of a DiT ``.pt`` accepts: the
#: ``argparse.Namespace`` of facebookresearch/DiT's ``train.py`` checkpoints (``args``), plain data with no code.
SAFE_CHECKPOINT_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def load_torch_file(path: Path) -> dict:
    """Read a torch file weights-only: a checkpoint from the internet must not be able to run code when loaded.

    Raises:
        CheckpointError: one line naming the file, and the class it refused if that is the reason.
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = [line for line in str(error).splitlines() if "Unsupported global" in line]
        reason = refused[0].strip().split(". ")[0] if refused else (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read {path} weights-only: {reason}; only tensors, plain containers and argparse.Namespace are "
            "allowed, so that loading cannot run code"
        ) from None
    except Exception as error:  # torch raises many types for files that are not checkpoints
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read {path} as a weights-only torch file: {type(error).__name__}: {first}"
        ) from None
