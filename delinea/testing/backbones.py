"""Tiny backbones for tests that behave like pretrained ones: DiT initialises its adaLN gates and output layer to
zero, which makes the base DiT's output (and so every gradient into the Control DiT) exactly zero."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from delinea.models import build_dit, build_vae, save_dit, save_vae


def pretrained_like(module: nn.Module, std: float = 0.05, only_zero: bool = False) -> nn.Module:
    """Redraw a module's weights from N(0, std²) (with ``only_zero``, only the all-zero tensors), in place."""
    with torch.no_grad():
        for parameter in module.parameters():
            if not only_zero or not parameter.any():
                parameter.normal_(0, std)
    return module


def write_backbones(folder: str | Path, sample_size: int = 16, seed: int = 3) -> dict[str, str]:
    """A pretrained-like ``DiT-tiny/2`` (latent ``sample_size``) and a ``tiny`` VAE as diffusers folders under
    ``folder``, loaded as users load theirs: ``{"dit": path, "vae": path}``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    save_dit(pretrained_like(build_dit("DiT-tiny/2", sample_size=sample_size)), folder / "dit")
    save_vae(build_vae("tiny"), folder / "vae")
    return {"dit": str(folder / "dit"), "vae": str(folder / "vae")}
