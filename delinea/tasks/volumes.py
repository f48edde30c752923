"""Stacking slice predictions back into whole volumes on each case's own grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from delinea.datamodules.plan import Axes, Region, from_lattice
from delinea.io import Geometry


@dataclass(eq=False)
class PredictedCase:
    """A case's predicted label map and uncertainty, canonical (X, Y, Z) on the case's own grid.

    Attributes:
        case_id: the case.
        geometry: its grid (``geometry.to_original`` maps the arrays back to the file's voxel order).
        labels: unified ids, uint8.
        uncertainty: per-voxel uncertainty in [0, 1], float16.
        label: the case's canonical label when it was scored (test), else None.
        metrics: per-organ metrics against the label (test), else None.
    """

    case_id: str
    geometry: Geometry
    labels: np.ndarray
    uncertainty: np.ndarray
    label: np.ndarray | None = None
    metrics: dict | None = None
    seen: set[int] = field(default_factory=set, repr=False)


class VolumeAssembler:
    """Collects slice probabilities case by case and hands back each case once all its slices arrived.

    Slices arrive on a region of the plan's lattice covering the case's body (the ``region`` and ``box`` the
    datamodule serves); their class probabilities are resampled back to the scan's voxels in the box before the
    argmax (:func:`~delinea.datamodules.plan.from_lattice`), so label maps live on the case's own grid; outside
    the box is background with no uncertainty. The grid comes from the image header: no voxel data are read
    here. Only uint8 labels and float16 uncertainty are kept per open case.

    Args:
        geometry_of: a case id's geometry (the datamodule's ``case_geometry``).
    """

    def __init__(self, geometry_of: Callable[[str], Geometry]) -> None:
        self.geometry_of = geometry_of
        self.open: dict[str, PredictedCase] = {}

    def add(
        self,
        case_ids: Sequence[str],
        slice_indices: torch.Tensor,
        probabilities: torch.Tensor,
        uncertainty: torch.Tensor,
        regions: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> list[PredictedCase]:
        """Add a batch of slices (N, C, h, w) + (N, h, w) on lattice ``regions`` (N, 5) covering the scan's voxels
        ``boxes`` (N, 4) ``(x0, x1, y0, y1)``; without them the slices must be on the scan's own grid. Returns the
        cases this batch completed."""
        finished = []
        for i, case_id in enumerate(case_ids):
            if case_id not in self.open:
                geometry = self.geometry_of(case_id)
                shape = geometry.canonical_shape
                self.open[case_id] = PredictedCase(
                    case_id, geometry, np.zeros(shape, np.uint8), np.zeros(shape, np.float16)
                )
            entry = self.open[case_id]
            x, y, z = entry.labels.shape
            k = int(slice_indices[i])
            if not 0 <= k < z:
                raise IndexError(f"slice {k} outside case {case_id!r} with {z} slices")
            both = torch.cat([probabilities[i].float(), uncertainty[i, None].float()], 0).cpu()  # (C + 1, h, w)
            if regions is None:
                if tuple(both.shape[-2:]) != (x, y):
                    raise ValueError(
                        f"slice of {tuple(both.shape[-2:])} for case {case_id!r} of in-plane size "
                        f"{(x, y)}: pass the lattice regions the datamodule serves"
                    )
                x0, x1, y0, y1, native = 0, x, 0, y, both
            else:
                x0, x1, y0, y1 = (int(v) for v in boxes[i]) if boxes is not None else (0, x, 0, y)
                if not (0 <= x0 < x1 <= x and 0 <= y0 < y1 <= y):
                    raise IndexError(f"box {(x0, x1, y0, y1)} outside case {case_id!r} of in-plane size {(x, y)}")
                axes = Axes.of(entry.geometry.canonical_affine, entry.geometry.canonical_shape)
                native = from_lattice(both, Region.from_tensor(regions[i]), axes, (x0, x1, y0, y1))
            entry.labels[x0:x1, y0:y1, k] = native[:-1].argmax(0).numpy().astype(np.uint8)
            entry.uncertainty[x0:x1, y0:y1, k] = native[-1].clamp(0, 1).numpy().astype(np.float16)
            entry.seen.add(k)
            if len(entry.seen) == z:
                finished.append(self.open.pop(case_id))
        return finished

    def incomplete(self) -> list[str]:
        """Cases still missing slices (a loader that dropped slices, or a case split across ranks)."""
        return sorted(self.open)
