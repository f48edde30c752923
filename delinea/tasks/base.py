"""The shared base of delinea's Lightning tasks: optimiser and schedule, and the 3D test and predict loops."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Timer
from monai.losses import DiceLoss
from timm.utils import ModelEmaV3
from torch import nn

from delinea.evaluation import case_metrics, case_rows, gather_rows, save_overlays, summarize, write_reports
from delinea.io import save_nifti
from delinea.labels import FOREGROUND, NUM_CLASSES, ORGANS
from delinea.tasks.volumes import PredictedCase, VolumeAssembler

_DICE = DiceLoss(sigmoid=True, reduction="none")


def bce_dice_loss(logits: torch.Tensor, mask: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """L_seg: per-class sigmoid BCE + Dice (MONAI), averaged over the classes each slice's dataset labels.

    Args:
        logits: (N, C, H, W) class logits.
        mask: (N, H, W) unified ids.
        labelled: (N, C) bool; unlabelled classes (single-organ datasets) contribute nothing.
    """
    target = F.one_hot(mask.long(), NUM_CLASSES).permute(0, 3, 1, 2).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))  # (N, C)
    dice = _DICE(logits, target).flatten(1)  # (N, C)
    weight = labelled.to(logits.dtype)
    return ((bce + dice) * weight).sum() / weight.sum().clamp_min(1.0)


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


def moving_average(module: nn.Module, decay: float) -> ModelEmaV3:
    """timm's EMA of a module's weights, kept out of the optimiser (its copy needs no gradients)."""
    ema = ModelEmaV3(module, decay=decay)
    ema.module.requires_grad_(False)
    return ema


class SegmentationTask(LightningModule):
    """A slice segmentation task: subclasses build their networks in :meth:`configure_models` and implement
    :meth:`losses` (training) and :meth:`predict_probabilities` (inference).

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine`` or ``linear`` decay to zero over the run (its optimiser steps, or its
            ``max_time``, whichever ends first), or ``constant``.
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
        # Where test reports and predictions go: run options set by the CLI, not hyperparameters, so a
        # checkpoint never carries an old run's output folder or overwrite permission.
        self.output_dir: Path | None = None
        self.overwrite = False
        self.save_uncertainty = False
        self.overlay_cases = 3

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task class, so ``delinea test --ckpt`` rebuilds the right task without a config."""
        checkpoint["delinea_task"] = f"{type(self).__module__}.{type(self).__name__}"

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
        return adamw_with_schedule(self)

    # -- test: slices -> volumes -> 3D metrics and reports --------------------------------------------------

    def run_dir(self, stage: str) -> Path:
        """The folder a stage writes into: the CLI's output folder, else the logger's run folder."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        base = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(base) / stage

    def on_test_epoch_start(self) -> None:
        self._volumes = VolumeAssembler(self.trainer.datamodule.load_case)
        self._rows: list = []
        self._overlays_written = 0

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        probabilities, uncertainty = self.predict_probabilities(batch["image"])
        for done in self._volumes.add(batch["case_id"], batch["slice_index"], probabilities, uncertainty):
            self._finish_test_case(done)

    def _finish_test_case(self, done: PredictedCase) -> None:
        case = done.case
        if case.label is None:
            raise ValueError(f"test case {case.case_id!r} ({case.path}) has no label to evaluate against")
        metrics = case_metrics(done.labels, case.label, case.spacing, labelled=case.labelled)
        self._rows.extend(case_rows(case.case_id, metrics))
        if self._overlays_written < self.overlay_cases:
            save_overlays(case.image, case.label, done.labels, self.run_dir("test") / "overlays" / case.case_id,
                          spacing=case.spacing, overwrite=self.overwrite)
            self._overlays_written += 1

    def on_test_epoch_end(self) -> None:
        missing = self._volumes.incomplete()
        if missing:
            raise RuntimeError(f"test cases {missing[:5]} did not receive all their slices; the loader must give "
                               "every rank whole cases")
        rows = gather_rows(self._rows)  # every rank gets every case's rows, once
        summary = summarize(rows)
        for organ in FOREGROUND:
            value = summary["organs"].get(organ, {}).get("dice")
            if value is not None:
                self.log(f"test/dice/{organ}", float(value), rank_zero_only=True)
        for key in ("mDSC", "mHD95", "mASSD"):
            if summary.get(key) is not None:
                self.log(f"test/{key}", float(summary[key]), rank_zero_only=True)
        if self.trainer.is_global_zero:
            write_reports(rows, self.run_dir("test"), overwrite=self.overwrite, method=type(self).__name__)
        self.test_summary = summary

    # -- predict: slices -> label maps on each input's own grid ---------------------------------------------

    def on_predict_epoch_start(self) -> None:
        self._volumes = VolumeAssembler(self.trainer.datamodule.load_case)
        self.predicted_files: list[Path] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        probabilities, uncertainty = self.predict_probabilities(batch["image"])
        for done in self._volumes.add(batch["case_id"], batch["slice_index"], probabilities, uncertainty):
            self._write_prediction(done)

    def _write_prediction(self, done: PredictedCase) -> None:
        case, folder = done.case, self.run_dir("predict")
        geometry = case.geometry
        target = folder / f"{case.case_id}_seg.nii.gz"
        outputs = {"labels": target}
        if self.save_uncertainty:
            outputs["uncertainty"] = folder / f"{case.case_id}_uncertainty.nii.gz"
        sidecar = folder / f"{case.case_id}_seg.json"
        for path in [*outputs.values(), sidecar]:
            if path.exists() and not self.overwrite:
                raise FileExistsError(f"{path} exists; pass --overwrite true to replace it")
        save_nifti(geometry.to_original(done.labels).astype(np.uint8), geometry.original_affine, target,
                   overwrite=self.overwrite)
        if self.save_uncertainty:
            save_nifti(geometry.to_original(done.uncertainty.astype(np.float32)), geometry.original_affine,
                       outputs["uncertainty"], overwrite=self.overwrite)
        present = sorted(int(v) for v in np.unique(done.labels))
        sidecar.write_text(json.dumps({
            "source": str(case.path),
            "labels": {str(i): name for i, name in enumerate(ORGANS)},
            "present": {ORGANS[i]: int((done.labels == i).sum()) for i in present if i},
            "spacing_mm": [float(s) for s in case.spacing],
            "model": type(self).__name__,
            "files": {k: str(v) for k, v in outputs.items()},
        }, indent=2) + "\n")
        self.predicted_files.append(target)

    def on_predict_epoch_end(self) -> None:
        missing = self._volumes.incomplete()
        if missing:
            raise RuntimeError(f"predicted cases {missing[:5]} did not receive all their slices")
