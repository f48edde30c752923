"""Optimisation shared by every task: AdamW with warm-up and a step-or-time decay, the EMA of trainable weights,
and the check that stops training at a non-finite loss."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Timer
from timm.utils import ModelEmaV3
from torch import nn

from delinea.errors import NonFiniteLossError, OptionError


def adamw_with_schedule(task: LightningModule, anneal_seconds: float | None = None) -> dict[str, Any]:
    """AdamW over a task's trainable parameters only, with a per-step warm-up and decay schedule.

    Reads ``lr``, ``weight_decay``, ``lr_schedule`` (``cosine``/``linear`` decay to zero over the run, or
    ``constant``) and ``warmup_steps`` from the task's hyperparameters. The run's length is its optimiser steps
    or, when the Trainer has a ``max_time`` (or ``anneal_seconds`` is given), its training wall time: the decay's
    progress is the larger of the two shares, so a run stopped by ``max_time`` still ends annealed (on a busy
    machine, at the cost of a schedule that depends on its speed). Resumed runs keep their elapsed time.
    """
    hp = task.hparams
    trainable = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.lr, weight_decay=hp.weight_decay)
    trainer = task._trainer
    total = max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None) if trainer is not None else None
    started = time.monotonic()
    warmup, kind = hp.warmup_steps, hp.lr_schedule

    def time_share() -> float:
        elapsed = timer.time_elapsed("train") if timer is not None else time.monotonic() - started
        remaining = timer.time_remaining("train") if timer is not None else None
        seconds = anneal_seconds or (elapsed + remaining if remaining is not None else None)
        return min(1.0, elapsed / seconds) if seconds else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = max(min(1.0, (step - warmup) / max(1, total - warmup)), time_share())
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_schedule(lr: float, warmup_steps: int, lr_schedule: str) -> None:
    """Raise an OptionError naming the value unless the optimiser settings can work."""
    if lr_schedule not in ("cosine", "linear", "constant"):
        raise OptionError(f"lr_schedule {lr_schedule!r} must be 'cosine', 'linear' or 'constant'")
    if not lr > 0 or warmup_steps < 0:
        raise OptionError(f"lr ({lr}) must be positive and warmup_steps ({warmup_steps}) non-negative")


def moving_average(module: nn.Module, decay: float) -> ModelEmaV3:
    """timm's EMA of a module's weights, kept out of the optimiser (its copy needs no gradients)."""
    ema = ModelEmaV3(module, decay=decay)
    ema.module.requires_grad_(False)
    return ema


def check_finite(loss: torch.Tensor, batch: Mapping[str, Any], step: int) -> None:
    """Stop training at a NaN or infinite loss, naming the batch's cases, before it reaches the weights.

    Raises:
        NonFiniteLossError: the loss is not finite.
    """
    loss = loss.detach()
    if bool(torch.isfinite(loss)):
        return
    cases = sorted(set(batch.get("case_id", [])))
    slices = batch["slice_index"].tolist() if torch.is_tensor(batch.get("slice_index")) else []
    raise NonFiniteLossError(
        f"training loss is {loss.item()} at step {step} on cases {cases[:8]} (slices {slices[:8]}); stopped before "
        "the weights take it: check those files for extreme values, or lower lr"
    )
