"""The baseline: a 2D MONAI UNet trained and tested on the same slices, losses, metrics and reports."""

from __future__ import annotations

from typing import Any, Literal

import torch
from monai.networks.nets import UNet

from delinea.datamodules.batches import WindowBatch
from delinea.errors import OptionError
from delinea.labels import NUM_CLASSES
from delinea.models.losses import bce_dice_loss
from delinea.tasks.base import SegmentationTask


class UNetTask(SegmentationTask):
    """A 2D residual UNet (MONAI) over image slices, one logit per unified class.

    It shares MedDelinea's L_seg (per-class BCE + Dice over the labelled classes), data pipeline, 3D
    metrics and reports, so the two compare on equal terms.

    Args:
        channels: feature channels per level; each level after the first halves the resolution.
        num_res_units: residual units per level.
        dropout: dropout probability inside the UNet.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine``, ``linear`` or ``constant``.
        warmup_steps: linear warm-up steps.
        init_from: a UNetTask checkpoint whose weights initialise this one (fine-tuning).
        window_overlap: overlap of neighbouring inference windows.
        val_metrics: segment the validation cases at every validation and log ``val/mDSC``.
    """

    def __init__(
        self,
        channels: list[int] = [16, 32, 64, 128, 256],  # noqa: B006 - jsonargparse needs a plain default
        num_res_units: int = 2,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int = 0,
        init_from: str | None = None,
        window_overlap: float = 0.5,
        val_metrics: bool = False,
    ) -> None:
        if len(channels) < 2:
            raise OptionError(f"channels {channels} needs at least two levels")
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule,
            warmup_steps=warmup_steps,
            window_overlap=window_overlap,
            val_metrics=val_metrics,
        )

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.hparams.channels) - 1)

    def configure_models(self) -> None:
        channels = list(self.hparams.channels)
        self.model = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=NUM_CLASSES,
            channels=channels,
            strides=[2] * (len(channels) - 1),
            num_res_units=self.hparams.num_res_units,
            dropout=self.hparams.dropout,
        )

    def load_parent(self, checkpoint: dict[str, Any], path: str) -> None:
        """Fine-tuning: start from ``init_from``'s weights (a UNetTask checkpoint)."""
        state = checkpoint.get("state_dict", {})
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as error:
            raise OptionError(
                f"init_from {path} does not fit this UNet (channels, num_res_units): {str(error).splitlines()[0]}"
            ) from error

    def _check(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 1:
            raise OptionError(f"image must be (N, 1, H, W), got shape {tuple(image.shape)}")
        if image.shape[-1] % self.size_multiple or image.shape[-2] % self.size_multiple:
            raise OptionError(
                f"image size {image.shape[-2]}x{image.shape[-1]} is not divisible by "
                f"{self.size_multiple} (2 ** UNet levels)"
            )

    def losses(self, batch: WindowBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        self._check(batch["image"])
        loss = bce_dice_loss(self.model(batch["image"]).float(), batch["mask"], batch["labelled"])
        return {"loss": loss}

    @torch.no_grad()
    def predict_probabilities(
        self, image: torch.Tensor, seeds: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(image)
        probabilities = self.model(image).float().softmax(1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
        return probabilities, entropy / torch.log(torch.tensor(float(NUM_CLASSES)))
