"""The shared base of delinea's Lightning tasks: optimiser and schedule, the plan, sliding-window inference, and the
3D validation, test and predict loops (whose files the callbacks of :mod:`delinea.callbacks` write)."""

from __future__ import annotations

import math
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Timer
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from timm.utils import ModelEmaV3
from torch import nn

from delinea.datamodules.plan import (
    IMAGE_FILL,
    MAX_WINDOWS_PER_SLICE,
    Plan,
    Region,
    crop_window,
    lattice_padding,
    tile_offsets,
)
from delinea.errors import CheckpointError, NonFiniteLossError, OptionError
from delinea.evaluation import case_metrics, case_rows, gather_rows, summarize
from delinea.labels import FOREGROUND, NUM_CLASSES
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


def check_finite(loss: torch.Tensor, batch: dict[str, Any], step: int) -> None:
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


def check_window_count(count: int, image: torch.Tensor, window: int) -> None:
    """Refuse a slice that would take more than :data:`MAX_WINDOWS_PER_SLICE` windows (a spacing far finer than the
    scan's, or a tiny window), naming the count and what to change."""
    if count > MAX_WINDOWS_PER_SLICE:
        height, width = image.shape[-2:]
        raise OptionError(
            f"a {height} x {width} px slice takes {count} windows of {window} px (more than {MAX_WINDOWS_PER_SLICE}): "
            "choose a larger window (--data.resolution) or a coarser plan spacing"
        )


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


class SeededSteps:
    """Training randomness (noise, timesteps, synthetic masks) drawn per micro-batch from a generator seeded by the
    run's seed and the batch's sample seeds (the ``seed`` the loader gives each sample). A run resumed from a
    checkpoint restores the loader's position, so it draws exactly what the uninterrupted run would, on any number
    of ranks, with no generator state to save: only the run's seed, which checkpoints carry."""

    #: The run's seed: ``torch.initial_seed()`` when a fresh fit starts (``seed_everything``'s value).
    training_seed: int = 0

    def step_generator(self, batch: dict[str, Any]) -> torch.Generator | None:
        """The generator of a training batch's randomness; None (the global generator) for batches without
        sample seeds."""
        seeds = batch.get("seed")
        if not torch.is_tensor(seeds):
            return None
        entropy = [int(self.training_seed), *(int(s) for s in seeds.tolist())]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(seeds.device).manual_seed(seed)

    def start_seeds(self, resuming: bool) -> None:
        """Take the run's seed when a fit starts (a resumed fit keeps its checkpoint's)."""
        if not resuming:
            self.training_seed = torch.initial_seed()

    def save_seed(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["delinea_training_seed"] = int(self.training_seed)

    def load_seed(self, checkpoint: dict[str, Any]) -> None:
        self.training_seed = int(checkpoint.get("delinea_training_seed", 0))


class SegmentationTask(SeededSteps, LightningModule):
    """A slice segmentation task: subclasses build their networks in :meth:`configure_models` and implement
    :meth:`losses` (training), :meth:`predict_probabilities` (inference on windows) and :attr:`size_multiple`.

    The task carries its **plan** (:class:`~delinea.datamodules.plan.Plan`: the spacing and windows it was trained
    at) in its checkpoints; fitting takes it from the datamodule (or ``init_from``), and validation, test and
    predict resample every scan to it. Whole resampled slices are covered by overlapping windows with Gaussian
    blending (:meth:`predict_slices`), and each case's probabilities are resampled back to its own grid before
    the argmax.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine`` or ``linear`` decay to zero over the run (its optimiser steps, or its
            ``max_time``, whichever ends first), or ``constant``.
        warmup_steps: linear warm-up steps before the decay.
        window_overlap: overlap of neighbouring inference windows, in [0, 1) (nnU-Net: 0.5).
        val_metrics: also segment the validation cases at every validation and log their 3D Dice
            (``val/mDSC``, ``val/dice/<organ>``): a curve to choose checkpoints by, at the cost of inference.
    """

    def __init__(
        self,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int = 0,
        window_overlap: float = 0.5,
        val_metrics: bool = False,
    ) -> None:
        super().__init__()
        check_schedule(lr, warmup_steps, lr_schedule)
        if not 0 <= window_overlap < 1:
            raise OptionError(f"window_overlap {window_overlap} must be in [0, 1)")
        self.save_hyperparameters()
        self.configure_models()
        #: The geometry the model works at; set when fitting starts, carried by checkpoints.
        self.plan: Plan | None = None
        #: Windows per forward pass when sliding over slices.
        self.window_batch_size = 8
        self._parent: tuple[Plan | None] | None = None  # init_from's plan, once loaded

    # -- what a task defines -------------------------------------------------------------------------------

    def configure_models(self) -> None:
        """Build the networks from ``self.hparams`` (so a checkpoint alone can rebuild them)."""
        raise NotImplementedError

    @property
    def size_multiple(self) -> int:
        """Window sides must be multiples of this."""
        raise NotImplementedError

    def losses(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training losses of a batch of windows; ``loss`` is the one optimised."""
        raise NotImplementedError

    def predict_probabilities(
        self, image: torch.Tensor, seeds: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (N, C, h, w) and a per-pixel uncertainty (N, h, w) for windows (N, 1, h, w);
        ``seeds`` (one per window) fix any randomness per window."""
        raise NotImplementedError

    def load_parent(self, checkpoint: dict[str, Any], path: str) -> None:
        """Fine-tuning: take the trainable weights of ``init_from``'s checkpoint (read weights-only)."""
        raise NotImplementedError

    # -- the plan and checkpoints --------------------------------------------------------------------------

    def check_window(self, window: int, source: str = "window") -> None:
        """Raise a ValueError naming ``window`` unless it is a positive multiple of :attr:`size_multiple`."""
        if window < self.size_multiple or window % self.size_multiple:
            raise OptionError(
                f"{source} {window} px is not a multiple of {self.size_multiple}, the smallest size "
                f"step {type(self).__name__} can take; choose e.g. "
                f"{max(1, round(window / self.size_multiple)) * self.size_multiple}"
            )

    def set_plan(self, plan: Plan) -> None:
        """Adopt a plan after checking its windows against the network."""
        for window in plan.window:
            self.check_window(window, "plan window")
        self.plan = plan

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task class and the plan, so ``delinea test --ckpt`` rebuilds the model at its geometry."""
        checkpoint["delinea_task"] = f"{type(self).__module__}.{type(self).__name__}"
        self.save_seed(checkpoint)
        if self.plan is not None:
            checkpoint["delinea_plan"] = self.plan.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_seed(checkpoint)
        plan = checkpoint.get("delinea_plan")
        self.plan = Plan.from_dict(plan, "the checkpoint's delinea_plan") if plan is not None else None

    def on_fit_start(self) -> None:
        """Fine-tuning starts from ``init_from`` (unless resuming this run), then the plan is settled: the
        datamodule's explicit one, else the parent's (or the resumed run's), else the datamodule's own."""
        resuming = self.trainer.ckpt_path is not None
        self.start_seeds(resuming)
        inherited = self.plan if resuming else self.start_from_parent()
        datamodule = self.trainer.datamodule
        plan = datamodule.plan_for(inherited, "fit") if hasattr(datamodule, "plan_for") else inherited
        if plan is not None:
            self.set_plan(plan)
            self.print(f"delinea: plan {plan.describe()}")

    def start_from_parent(self) -> Plan | None:
        """Load ``init_from``'s trainable weights (once; the CLI does it before any other work, so a missing or
        mismatched parent stops the run at once) and return its plan, if any."""
        path = self.hparams.get("init_from")
        if not path:
            return None
        if self._parent is None:
            checkpoint = read_checkpoint(path, "init_from")
            self.load_parent(checkpoint, path)
            plan = checkpoint.get("delinea_plan")
            self._parent = (Plan.from_dict(plan, f"init_from {path}") if plan is not None else None,)
        return self._parent[0]

    @property
    def inference_window(self) -> int | None:
        """The sliding window: the datamodule's plan (the model's, or an explicit window), else the model's."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        plan = getattr(datamodule, "plan", None) or self.plan
        return plan.inference_window if isinstance(plan, Plan) else None

    def _check_inference_window(self) -> None:
        window = self.inference_window
        if window is not None:
            self.check_window(window, "inference window (the plan's, or --data.resolution)")

    # -- inference on whole slices -------------------------------------------------------------------------

    def predict_slices(
        self, image: torch.Tensor, region: Region | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (N, C, H, W) and uncertainty (N, H, W) of whole slices (N, 1, H, W) of any size.

        Windows of the plan's inference size (without a plan: one window covering the slice) with
        ``window_overlap``, Gaussian-weighted blending of probabilities and uncertainty (MONAI's
        ``sliding_window_inference``). Given the slices' lattice ``region`` (what evaluation batches carry), an axis
        no longer than a window is centred in one, and a longer one is padded with background so that windows sit
        at multiples of their stride on the plan's lattice; each window's randomness is seeded by its place there.
        The same anatomy in another scan is then covered by the same windows and gets the same prediction.
        """
        window = self.inference_window
        if window is None:
            window = -(-max(image.shape[-2:]) // self.size_multiple) * self.size_multiple
        overlap = self.hparams.get("window_overlap", 0.5)
        stride = max(1, int(window * (1 - overlap)))  # MONAI's window interval
        height, width = image.shape[-2:]
        if region is None:
            start, pad = (0, 0), (0, 0, 0, 0)
        else:
            region = region if isinstance(region, Region) else Region.from_tensor(region)
            rows, cols = (
                lattice_padding(region.x0, height, window, stride),
                lattice_padding(region.y0, width, window, stride),
            )
            start, pad = (region.x0 - rows[0], region.y0 - cols[0]), (cols[0], cols[1], rows[0], rows[1])
        padded = F.pad(image, pad, value=IMAGE_FILL)
        check_window_count(math.prod(-(-max(0, n - window) // stride) + 1 for n in padded.shape[-2:]), image, window)

        def predictor(windows: torch.Tensor, places: list) -> torch.Tensor:
            seeds = [hash((start[0] + place[2].start, start[1] + place[3].start)) % 2**31 for place in places]
            probabilities, uncertainty = self.predict_probabilities(windows, seeds)
            return torch.cat([probabilities.float(), uncertainty.float()[:, None]], 1)

        out = sliding_window_inference(
            padded, (window, window), self.window_batch_size, predictor, overlap=overlap, mode="gaussian",
            sigma_scale=0.125, padding_mode="constant", cval=IMAGE_FILL, with_coord=True,
        )  # fmt: skip
        out = torch.as_tensor(out)[..., pad[2] : pad[2] + height, pad[0] : pad[0] + width]
        return out[:, :-1], out[:, -1]

    def tile(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Non-overlapping inference-size windows covering every whole slice of an evaluation batch (padded
        with background): the windows the validation losses are computed on, the same at every validation."""
        image, mask = batch["image"], batch["mask"]
        height, width = image.shape[-2:]
        window = self.inference_window or -(-max(height, width) // self.size_multiple) * self.size_multiple
        tiles = [(top, left) for top in tile_offsets(height, window) for left in tile_offsets(width, window)]
        check_window_count(len(tiles), image, window)
        images = torch.stack([crop_window(image, y, x, window, IMAGE_FILL) for y, x in tiles], 1)  # (N, T, 1, W, W)
        masks = torch.stack([crop_window(mask, y, x, window, 0) for y, x in tiles], 1)  # (N, T, W, W)
        n = len(tiles)
        return {
            "image": images.flatten(0, 1), "mask": masks.flatten(0, 1),
            "labelled": batch["labelled"].repeat_interleave(n, 0),
            "case_id": [c for c in batch["case_id"] for _ in range(n)],
            "slice_index": batch["slice_index"].repeat_interleave(n, 0),
            "cache_key": [""] * (len(batch["case_id"]) * n),
        }  # fmt: skip

    # -- training and validation ---------------------------------------------------------------------------

    def validation_loss(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Validation losses of a batch of windows; by default the training losses without gradients."""
        return self.losses(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, generator=self.step_generator(batch))
        check_finite(losses["loss"], batch, self.global_step)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"] * self.micro_batch_weight(int(batch["image"].shape[-1]))

    def micro_batch_weight(self, window: int) -> float:
        """The loss weight of a training micro-batch of this window size: Lightning averages the losses of an
        optimiser step's micro-batches, so with micro-batches of different sizes (the datamodule's
        ``micro_batch_size``) each is weighted by its size over their mean, and every sample weighs the same."""
        if getattr(self, "_micro_weights", None) is None:
            trainer = self._trainer
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
            micro_batch_plan = getattr(datamodule, "micro_batch_plan", None)
            plan = micro_batch_plan(trainer.accumulate_grad_batches) if micro_batch_plan is not None else None
            self._micro_weights = plan[1] if plan is not None else {}
        return float(self._micro_weights.get(window, 1.0))

    def on_validation_epoch_start(self) -> None:
        self._check_inference_window()
        if self.hparams.get("val_metrics"):
            self._start_cases()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        windows = self.tile(batch)
        losses = self.validation_loss(windows, batch_idx)
        # sync_dist: every rank logs the same reduced value, so checkpoint monitors agree across ranks.
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, prog_bar=True, sync_dist=True, batch_size=len(windows["image"])
        )
        if self.hparams.get("val_metrics"):
            self._segment(batch, evaluate=True)

    def on_validation_epoch_end(self) -> None:
        if self.hparams.get("val_metrics"):
            self._log_metrics("val", self._finish_cases())

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_schedule(self)

    # -- test and predict: slices -> volumes on each case's grid -> metrics --------------------------------

    def _start_cases(self) -> None:
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "case_geometry"):
            raise TypeError(
                f"{type(self).__name__} segments whole cases: it needs a delinea datamodule (one that "
                f"knows each case's geometry and label), got {type(datamodule).__name__}"
            )
        self._volumes = VolumeAssembler(datamodule.case_geometry)
        self._rows: list = []

    def _segment(self, batch: dict[str, Any], evaluate: bool) -> list[PredictedCase]:
        """Predict a batch of whole slices and return the cases it completed (scored against their labels
        when ``evaluate``)."""
        region = batch["region"][0] if "region" in batch else None  # a batch is one case: one region
        probabilities, uncertainty = self.predict_slices(batch["image"], region)
        done = self._volumes.add(
            batch["case_id"], batch["slice_index"], probabilities, uncertainty, batch.get("region"), batch.get("box")
        )
        if evaluate:
            for case in done:
                label, labelled = self.trainer.datamodule.load_label(case.case_id)
                case.label = label
                case.metrics = case_metrics(case.labels, label, case.geometry.spacing, labelled=labelled)
                self._rows.extend(case_rows(case.case_id, case.metrics))
        return done

    def _finish_cases(self) -> list:
        missing = self._volumes.incomplete()
        if missing:
            raise RuntimeError(
                f"cases {missing[:5]} did not receive all their slices; the loader must give every rank whole cases"
            )
        return gather_rows(self._rows)  # every rank gets every case's rows, once

    def _log_metrics(self, stage: str, rows: list) -> dict[str, Any]:
        summary = summarize(rows)
        for organ in FOREGROUND:
            value = summary["organs"].get(organ, {}).get("dice")
            if value is not None:
                self.log(f"{stage}/dice/{organ}", float(value))
        for key in ("mDSC", "mHD95", "mASSD"):
            if summary.get(key) is not None:
                self.log(f"{stage}/{key}", float(summary[key]), prog_bar=key == "mDSC")
        return summary

    def on_test_epoch_start(self) -> None:
        self._check_inference_window()
        self._start_cases()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> list[PredictedCase]:
        """Segment a batch; returns the cases it completed, with their metrics (for the report callback)."""
        return self._segment(batch, evaluate=True)

    def on_test_epoch_end(self) -> None:
        #: Every (case, organ) row of this test, gathered from every rank; and their summary.
        self.test_rows = self._finish_cases()
        self.test_summary = self._log_metrics("test", self.test_rows)

    def on_predict_epoch_start(self) -> None:
        self._check_inference_window()
        self._start_cases()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[PredictedCase]:
        """Segment a batch; returns the cases it completed (for the prediction writer)."""
        return self._segment(batch, evaluate=False)

    def on_predict_epoch_end(self) -> None:
        self._finish_cases()


def read_checkpoint(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint read weights-only (no pickled code can run, whatever the environment says), memory-mapped
    with ``mmap``, or a model folder (:mod:`delinea.tasks.export`).

    Raises:
        CheckpointError: one line naming ``what`` and the file, and what is wrong with it.
    """
    from delinea.tasks.export import is_model_folder, read_model_folder

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
