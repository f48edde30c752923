"""Reading network weights without running code: diffusers model folders (safetensors, or ``.bin`` read
weights-only) and torch files, and loading them with messages that name the file and the keys that do not fit."""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from delinea.errors import CheckpointError


def is_weight_file(name: str) -> bool:
    """Whether a file name is one of a model folder's weight files (or their index)."""
    return name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))


#: A shard's file name without its extension: ``<stem>-00001-of-00003``.
_SHARD = re.compile(r"^(?P<stem>.+)-\d+-of-\d+$")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read a model folder's weights after checking that its files agree: one ``<stem>.safetensors``, or the shards
    that ``<stem>.safetensors.index.json`` names, each present and holding the keys the index gives it, with no other
    weight file beside them. ``.bin`` files (read without pickled code) only where there are no safetensors.

    Raises:
        CheckpointError: naming the folder: no weights, weights under several names, a stale single file beside
            shards, a shard missing or one the index does not name, shards without their index, keys that index and
            shard disagree on, or an unreadable file.
    """
    folder = Path(folder)
    for ext in (".safetensors", ".bin"):
        files = sorted(p.name for p in folder.glob(f"*{ext}") if p.is_file() and not p.name.startswith("."))
        indexes = sorted(p.name for p in folder.glob(f"*{ext}.index.json") if not p.name.startswith("."))
        if files or indexes:
            break
    else:
        raise CheckpointError(f"{folder}: no weights (*.safetensors or *.bin files) in the model folder")
    stems = {_SHARD.sub(r"\g<stem>", name.removesuffix(ext)) for name in files}
    stems |= {name.removesuffix(f"{ext}.index.json") for name in indexes}
    if len(stems) > 1:
        raise CheckpointError(
            f"{folder}: weights under {len(stems)} names ({', '.join(sorted(stems))}); which to read is ambiguous: "
            "keep one model per folder"
        )
    stem = stems.pop()

    def load(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(folder / name)) if ext == ".safetensors" else load_torch_file(folder / name)
        except CheckpointError:
            raise
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{folder / name}: unreadable weights ({type(error).__name__}: {error})") from None

    if not indexes:
        if files != [stem + ext]:
            raise CheckpointError(
                f"{folder}: shards {files[:3]} without their index {stem}{ext}.index.json; the model is incomplete"
            )
        return load(files[0])
    index_file = folder / indexes[0]
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        named = {str(shard) for shard in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index_file}: not a weight index ({type(error).__name__}: {error})") from None
    missing, extra = sorted(named - set(files)), sorted(set(files) - named)
    if missing:
        raise CheckpointError(f"{folder}: shard(s) {missing[:3]} named by {index_file.name} are missing")
    if extra:
        raise CheckpointError(
            f"{folder}: {', '.join(extra[:3])} beside the shards {index_file.name} names (left by an earlier save?); "
            "which weights to read is ambiguous: remove the file(s) that do not belong"
        )
    state: dict[str, torch.Tensor] = {}
    for name in sorted(named):
        shard = load(name)
        expected = {key for key, where in weight_map.items() if where == name}
        if set(shard) != expected:
            raise CheckpointError(
                f"{folder}: {name} holds {len(shard)} weights and {index_file.name} gives it {len(expected)} "
                f"({len(set(shard) ^ expected)} differ, e.g. {sorted(set(shard) ^ expected)[:2]}); index and shards "
                "disagree"
            )
        state.update(shard)
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
