"""Stacking slice predictions back into whole volumes on each case's own grid: the :class:`~delinea.Segmenter`'s
volume assembly (the probabilities resampled from the plan's lattice back to the scan's voxels before the argmax)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from delinea.geometry import Axes, Region, from_lattice
from delinea.io import Geometry


@dataclass(eq=False)
class PredictedCase:
    """A case's predicted label map and uncertainty, canonical (X, Y, Z) on the case's own grid.

    Attributes:
        case_id: the case.
        geometry: its grid (``geometry.to_original`` maps the arrays back to the file's voxel order).
        labels: unified ids, uint8.
        uncertainty: per-voxel uncertainty in [0, 1], float16.
        probabilities: class probabilities (C, X, Y, Z), float32, when the assembler keeps them; else None.
        label: the case's canonical unified label when its batches carry it (evaluation), else None.
        image: the case's canonical normalised image, float16, when its batches carry it (evaluation), else None.
        labelled: the classes its label annotates, bool (9,), when known.
        nonfinite: NaN or infinite voxels of the scan that were replaced by its lowest value.
        metrics: per-organ metrics against the label (test), else None.
    """

    case_id: str
    geometry: Geometry
    labels: np.ndarray
    uncertainty: np.ndarray
    probabilities: np.ndarray | None = None
    label: np.ndarray | None = None
    image: np.ndarray | None = None
    labelled: np.ndarray | None = None
    nonfinite: int = 0
    metrics: dict | None = None
    seen: set[int] = field(default_factory=set, repr=False)


class VolumeAssembler:
    """Collects slice probabilities case by case and hands back each case once all its slices arrived.

    Slices arrive on a region of the plan's lattice covering the case's body (the ``region`` and ``box`` the
    datamodule serves); their class probabilities are resampled back to the scan's voxels in the box before the
    argmax (:func:`~delinea.geometry.from_lattice`), so label maps live on the case's own grid; outside the box is
    background with no uncertainty. The grid comes from the image header: no voxel data are read here; what an
    evaluation batch carries of the scan itself (its label and image slices) is stacked beside the prediction. Only
    uint8 labels and float16 uncertainty (and images) are kept per open case, unless ``keep_probabilities``.

    Args:
        geometry_of: a case id's geometry (the datamodule's ``case_geometry``).
        keep_probabilities: also keep each case's class probabilities on its grid (float32, C x X x Y x Z).
    """

    def __init__(self, geometry_of: Callable[[str], Geometry], keep_probabilities: bool = False) -> None:
        self.geometry_of = geometry_of
        self.keep_probabilities = keep_probabilities
        self.open: dict[str, PredictedCase] = {}

    def _open(self, case_id: str, classes: int) -> PredictedCase:
        geometry = self.geometry_of(case_id)
        shape = geometry.canonical_shape
        case = PredictedCase(case_id, geometry, np.zeros(shape, np.uint8), np.zeros(shape, np.float16))
        if self.keep_probabilities:
            case.probabilities = np.zeros((classes, *shape), np.float32)
            case.probabilities[0] = 1.0  # outside the body box: background, certainly
        self.open[case_id] = case
        return case

    def add(
        self, batch: Mapping[str, Any], probabilities: torch.Tensor, uncertainty: torch.Tensor
    ) -> list[PredictedCase]:
        """Add a batch of slice predictions (N, C, h, w) + (N, h, w) on the lattice ``region`` (N, 5) of each slice
        of ``batch`` (a :class:`~delinea.datamodules.batches.PredictBatch`), covering the scan's voxels ``box``
        (N, 4) ``(x0, x1, y0, y1)``; without them the slices must be on the scan's own grid. Returns the cases this
        batch completed."""
        finished = []
        regions, boxes = batch.get("region"), batch.get("box")
        for i, case_id in enumerate(batch["case_id"]):
            entry = self.open.get(case_id) or self._open(case_id, probabilities.shape[1])
            x, y, z = entry.labels.shape
            k = int(batch["slice_index"][i])
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
            if entry.probabilities is not None:
                entry.probabilities[:, x0:x1, y0:y1, k] = native[:-1].numpy()
            self._add_scan(entry, batch, i, k)
            entry.seen.add(k)
            if len(entry.seen) == z:
                finished.append(self.open.pop(case_id))
        return finished

    @staticmethod
    def _add_scan(entry: PredictedCase, batch: Mapping[str, Any], i: int, k: int) -> None:
        """Keep what the batch carries of the scan itself: its label and image slices, labelled classes, replaced
        voxels."""
        if "native_label" in batch:
            if entry.label is None:
                entry.label = np.zeros(entry.labels.shape, np.uint8)
            entry.label[:, :, k] = batch["native_label"][i].numpy()
        if "native_image" in batch:
            if entry.image is None:
                entry.image = np.zeros(entry.labels.shape, np.float16)
            entry.image[:, :, k] = batch["native_image"][i].numpy()
        if "labelled" in batch and entry.labelled is None:
            entry.labelled = batch["labelled"][i].numpy().astype(bool)
        if "nonfinite" in batch:
            entry.nonfinite = int(batch["nonfinite"][i])

    def incomplete(self) -> list[str]:
        """Cases still missing slices (a loader that dropped slices, or a case split across ranks)."""
        return sorted(self.open)
