"""Stacking slice predictions back into whole volumes on each case's own grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from delinea.datamodules import Case


@dataclass(eq=False)
class PredictedCase:
    """A case with its predicted label map and uncertainty, both canonical (X, Y, Z)."""

    case: Case
    labels: np.ndarray
    uncertainty: np.ndarray
    seen: set[int] = field(default_factory=set)


class VolumeAssembler:
    """Collects slice probabilities case by case and hands back each case once all its slices arrived.

    Each slice's class probabilities are resized (bilinear) from the network's resolution to the case's
    in-plane size before the argmax, so label maps live on the case's own grid with no nearest-neighbour
    blockiness. Only uint8 labels and float16 uncertainty are kept per open case.

    Args:
        load_case: the datamodule's ``load_case`` (geometry, image and label of a case id).
    """

    def __init__(self, load_case: Callable[[str], Case]) -> None:
        self.load_case = load_case
        self.open: dict[str, PredictedCase] = {}

    def add(self, case_ids: Sequence[str], slice_indices: torch.Tensor, probabilities: torch.Tensor,
            uncertainty: torch.Tensor) -> list[PredictedCase]:
        """Add a batch of slices (N, C, h, w) + (N, h, w); returns the cases this batch completed."""
        finished = []
        for i, case_id in enumerate(case_ids):
            if case_id not in self.open:
                case = self.load_case(case_id)
                shape = case.image.shape
                self.open[case_id] = PredictedCase(case, np.zeros(shape, np.uint8), np.zeros(shape, np.float16))
            entry = self.open[case_id]
            x, y, z = entry.labels.shape
            k = int(slice_indices[i])
            if not 0 <= k < z:
                raise IndexError(f"slice {k} outside case {case_id!r} with {z} slices")
            probs = F.interpolate(probabilities[i : i + 1].float(), size=(x, y), mode="bilinear", align_corners=False)
            unc = F.interpolate(uncertainty[i : i + 1, None].float(), size=(x, y), mode="bilinear", align_corners=False)
            entry.labels[:, :, k] = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
            entry.uncertainty[:, :, k] = unc[0, 0].cpu().numpy().astype(np.float16)
            entry.seen.add(k)
            if len(entry.seen) == z:
                finished.append(self.open.pop(case_id))
        return finished

    def incomplete(self) -> list[str]:
        """Cases still missing slices (a loader that dropped slices, or a case split across ranks)."""
        return sorted(self.open)
