"""L_seg: the segmentation loss MedDelinea's decoded logits and the UNet baseline share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from delinea.labels import NUM_CLASSES

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
