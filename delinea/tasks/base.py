"""The shared base of delinea's Lightning tasks: hyperparameters, optimiser, schedule, validation loss."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule


class SegmentationTask(LightningModule):
    """A slice segmentation task: subclasses build their networks in :meth:`configure_models` and implement
    :meth:`losses` (training) and :meth:`predict_probabilities` (inference).

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine`` or ``linear`` decay to zero over the run's optimiser steps, or ``constant``.
        warmup_steps: linear warm-up steps before the decay.
    """

    def __init__(self, lr: float = 2e-5, weight_decay: float = 0.0, lr_schedule: str = "cosine",
                 warmup_steps: int = 0) -> None:
        super().__init__()
        if lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule {lr_schedule!r} must be 'cosine', 'linear' or 'constant'")
        if lr <= 0 or warmup_steps < 0:
            raise ValueError(f"lr ({lr}) must be positive and warmup_steps ({warmup_steps}) non-negative")
        self.save_hyperparameters()
        self.configure_models()

    def configure_models(self) -> None:
        """Build the networks from ``self.hparams`` (so a checkpoint alone can rebuild them)."""
        raise NotImplementedError

    def losses(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training losses of a batch; ``loss`` is the one optimised."""
        raise NotImplementedError

    def predict_probabilities(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (N, C, H, W) and a per-pixel uncertainty (N, H, W) for slices (N, 1, H, W)."""
        raise NotImplementedError

    def validation_loss(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Validation losses; by default the training losses without gradients."""
        return self.losses(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.validation_loss(batch, batch_idx)
        # sync_dist: every rank logs the same reduced value, so checkpoint monitors agree across ranks.
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, prog_bar=True, sync_dist=True,
                      batch_size=len(batch["image"]))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters only, with a per-step warm-up and decay schedule."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup, kind = self.hparams.warmup_steps, self.hparams.lr_schedule

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if kind == "cosine":
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0 - progress if kind == "linear" else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
