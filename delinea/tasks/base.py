"""The shared base of delinea's segmentation tasks: the plan they train at, the training and validation steps, and
the hooks through which a :class:`~delinea.Segmenter` segments whole cases in validation, test and predict (whose
files the callbacks of :mod:`delinea.callbacks` write)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from lightning.pytorch import LightningModule

from delinea.datamodules.batches import EvalBatch, PredictBatch, SliceData, TrainBatch, WindowBatch, give_plan
from delinea.errors import CheckpointError, OptionError
from delinea.evaluation import Row, case_metrics, case_rows, gather_rows, summarize
from delinea.geometry import IMAGE_FILL, Plan, covering_window, tile_windows
from delinea.io import Geometry
from delinea.labels import FOREGROUND
from delinea.tasks.checkpoints import read_checkpoint
from delinea.tasks.optim import adamw_with_schedule, check_finite, check_schedule
from delinea.tasks.seeding import SeededSteps
from delinea.volumes import PredictedCase


class CaseSegmenter(Protocol):
    """What segments whole cases for a task (a :class:`delinea.Segmenter`, which attaches itself)."""

    @property
    def plan(self) -> Plan | None:
        """The plan evaluation batches are served at (the model's, with any explicit windows)."""
        ...

    def start(self, geometry_of: Callable[[str], Geometry]) -> None:
        """Begin a pass over cases whose grids ``geometry_of`` gives."""
        ...

    def add(self, batch: PredictBatch) -> list[PredictedCase]:
        """Segment a batch of whole slices; the cases it completed."""
        ...

    def finish(self) -> None:
        """End the pass; an error if a case is missing slices."""
        ...


class SegmentationTask(SeededSteps, LightningModule):
    """A slice segmentation task: subclasses build their networks in :meth:`configure_models` and implement
    :meth:`losses` (training), :meth:`predict_probabilities` (inference on windows) and :attr:`size_multiple`.

    The task carries its **plan** (:class:`~delinea.geometry.Plan`: the spacing and windows it was trained at) in
    its checkpoints. Fitting resolves it (:func:`~delinea.geometry.resolve_plan`: the datamodule's options, the
    parent's or the resumed run's plan) and gives it to the datamodule. Whole cases are segmented by the
    :class:`~delinea.Segmenter` that runs the task (:attr:`segmenter`): it resamples every scan to the plan, covers
    the slices with windows, blends them and stacks the probabilities back on each scan's grid; the task scores
    and logs the cases.

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
        #: What segments whole cases in validation (``val_metrics``), test and predict: the
        #: :class:`~delinea.Segmenter` running this task sets itself here (the delinea command makes one).
        self.segmenter: CaseSegmenter | None = None
        self._parent: tuple[Plan | None] | None = None  # init_from's plan, once loaded
        self._rows: list[Row] = []
        self._micro_weights: dict[int, float] | None = None

    # -- what a task defines -------------------------------------------------------------------------------

    def configure_models(self) -> None:
        """Build the networks from ``self.hparams`` (so a checkpoint alone can rebuild them)."""
        raise NotImplementedError

    @property
    def size_multiple(self) -> int:
        """Window sides must be multiples of this."""
        raise NotImplementedError

    def losses(self, batch: WindowBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
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

    def frozen_keys(self) -> set[str]:
        """State-dict keys of frozen weights that checkpoints may leave out (loaded from their own files)."""
        return set()

    def check_fits(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Refuse a checkpoint whose weights do not fit this model (built from the options), naming the options
        that differ from the ones it was trained with.

        Raises:
            CheckpointError: a weight's shape differs, or the checkpoint lacks or adds trainable weights.
        """
        state, own, frozen = checkpoint.get("state_dict", {}), self.state_dict(), self.frozen_keys()
        wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        wrong += [k for k in state if k not in own] + [k for k in own if k not in state and k not in frozen]
        if not wrong:
            return
        saved = checkpoint.get("hyper_parameters", {})
        differ = [f"{k}={self.hparams[k]!r} (checkpoint: {saved[k]!r})" for k in saved
                  if k in self.hparams and saved[k] != self.hparams[k]]  # fmt: skip
        raise CheckpointError(
            f"checkpoint {path} does not fit the model the options build ({len(wrong)} weights differ, e.g. "
            f"{wrong[0]})" + (f"; options that differ from the checkpoint's: {', '.join(differ)}" if differ else "")
        )

    def restore(self, checkpoint: dict[str, Any], source: str | Path = "checkpoint") -> SegmentationTask:
        """Load a checkpoint (or model folder) already read into this task built from its hyperparameters, as
        Lightning would (:meth:`on_load_checkpoint`, then the weights).

        Raises:
            CheckpointError: naming ``source``, when its weights do not fit the task (:meth:`check_fits`).
        """
        self.check_fits(checkpoint, source)
        self.on_load_checkpoint(checkpoint)
        try:
            self.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
            raise CheckpointError(f"{source}: its weights do not fit a {type(self).__name__} ({first[:200]})") from None
        return self

    def on_fit_start(self) -> None:
        """Fine-tuning starts from ``init_from`` (unless resuming this run), then the plan is resolved
        (:func:`~delinea.geometry.resolve_plan`: the datamodule's explicit one, else the parent's or the resumed
        run's, else the datamodule's own) and given to the datamodule."""
        resuming = self.trainer.ckpt_path is not None
        self.start_seeds(resuming)
        plan = self.plan if resuming else self.start_from_parent()
        data = self._data()
        if data is not None:
            plan = give_plan(data, plan, "fit")
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

    def _data(self) -> SliceData | None:
        """The trainer's datamodule, if it is a delinea one (with cases, a plan and micro-batches)."""
        trainer = self._trainer
        data = trainer.datamodule if trainer is not None else None
        return data if isinstance(data, SliceData) else None

    def _segmenter(self) -> CaseSegmenter:
        if self.segmenter is None:
            raise OptionError(
                f"{type(self).__name__} segments whole cases through a delinea.Segmenter: attach one with "
                "delinea.Segmenter(task) before validating, testing or predicting (the delinea command does)"
            )
        return self.segmenter

    # -- training and validation ---------------------------------------------------------------------------

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, generator=self.step_generator(batch))
        check_finite(losses["loss"], batch, self.global_step)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"] * self.micro_batch_weight(int(batch["image"].shape[-1]))

    def micro_batch_weight(self, window: int) -> float:
        """The loss weight of a training micro-batch of this window size: Lightning averages the losses of an
        optimiser step's micro-batches, so with micro-batches of different sizes (the datamodule's
        ``micro_batch_size``) each is weighted by its size over their mean, and every sample weighs the same."""
        if self._micro_weights is None:
            data = self._data()
            plan = data.micro_batch_plan(self.trainer.accumulate_grad_batches) if data is not None else None
            self._micro_weights = plan[1] if plan is not None else {}
        return float(self._micro_weights.get(window, 1.0))

    def tile(self, batch: EvalBatch) -> WindowBatch:
        """Non-overlapping inference-size windows covering every whole slice of an evaluation batch (padded with
        background): the windows the validation losses are computed on, the same at every validation."""
        plan = self.segmenter.plan if self.segmenter is not None and self.segmenter.plan is not None else self.plan
        height, width = batch["image"].shape[-2:]
        window = plan.inference_window if plan is not None else covering_window(height, width, self.size_multiple)
        images, masks, n = tile_windows(batch["image"], batch["mask"], window, IMAGE_FILL)
        return {
            "image": images, "mask": masks,
            "labelled": batch["labelled"].repeat_interleave(n, 0),
            "case_id": [c for c in batch["case_id"] for _ in range(n)],
            "slice_index": batch["slice_index"].repeat_interleave(n, 0),
            "cache_key": [""] * (len(batch["case_id"]) * n),
        }  # fmt: skip

    def validation_loss(self, batch: WindowBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Validation losses of a batch of windows; by default the training losses without gradients."""
        return self.losses(batch)

    def on_validation_epoch_start(self) -> None:
        if self.hparams.get("val_metrics"):
            self._start_cases()

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        windows = self.tile(batch)
        losses = self.validation_loss(windows, batch_idx)
        # sync_dist: every rank logs the same reduced value, so checkpoint monitors agree across ranks.
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, prog_bar=True, sync_dist=True, batch_size=len(windows["image"])
        )
        if self.hparams.get("val_metrics"):
            self._score(self._segmenter().add(batch))

    def on_validation_epoch_end(self) -> None:
        if self.hparams.get("val_metrics"):
            self._log_metrics("val", self._finish_cases())

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_schedule(self)

    # -- test and predict: the Segmenter's cases -> metrics ------------------------------------------------

    def _start_cases(self) -> None:
        data = self._data()
        if data is None:
            raise TypeError(
                f"{type(self).__name__} segments whole cases: it needs a delinea datamodule (one that knows each "
                f"case's geometry), got {type(self.trainer.datamodule).__name__}"
            )
        self._segmenter().start(data.case_geometry)
        self._rows = []

    def _score(self, cases: list[PredictedCase]) -> list[PredictedCase]:
        """Score completed cases against the labels their batches carried."""
        for case in cases:
            if case.label is None:
                raise RuntimeError(f"case {case.case_id!r} was evaluated without its label in the batches")
            case.metrics = case_metrics(case.labels, case.label, case.geometry.spacing, labelled=case.labelled)
            self._rows.extend(case_rows(case.case_id, case.metrics))
        return cases

    def _finish_cases(self) -> list[Row]:
        self._segmenter().finish()
        return gather_rows(self._rows)  # every rank gets every case's rows, once

    def _log_metrics(self, stage: str, rows: list[Row]) -> dict[str, Any]:
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
        self._start_cases()

    def test_step(self, batch: EvalBatch, batch_idx: int) -> list[PredictedCase]:
        """Segment a batch; returns the cases it completed, with their metrics (for the report callback)."""
        return self._score(self._segmenter().add(batch))

    def on_test_epoch_end(self) -> None:
        #: Every (case, organ) row of this test, gathered from every rank; and their summary.
        self.test_rows = self._finish_cases()
        self.test_summary = self._log_metrics("test", self.test_rows)

    def on_predict_epoch_start(self) -> None:
        self._start_cases()

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[PredictedCase]:
        """Segment a batch; returns the cases it completed (for the prediction writer)."""
        return self._segmenter().add(batch)

    def on_predict_epoch_end(self) -> None:
        self._segmenter().finish()
