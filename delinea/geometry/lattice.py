"""The plan's lattice and resampling onto it and back: where a scan's pixels go at the plan's spacing.

**A lattice fixed in the patient.** The target grid is not laid over each scan's own pixels but fixed in space:
along each in-plane axis, pixel ``g`` of the plan covers ``[g t, (g + 1) t)`` mm of the scan's coordinate along
that axis (``t`` the target spacing). A scan is resampled onto the :class:`Region` of this lattice that covers its
body, and inference windows sit at multiples of their stride on the same lattice. Two scans of one subject at
other spacings and fields of view therefore give the model the same pixels in the same windows, which neither
pixel-phase shifts nor a different field of view disturb (strided networks are not shift-invariant).

**Body crop.** The region covers the in-plane box of the case's body (voxels brighter than
:data:`BODY_THRESHOLD` after normalisation, in at least :data:`BODY_SHARE` of a row) plus the plan's
``body_margin`` in mm, for training and inference alike; predictions outside it are background. The margin may
reach past the scan's field of view (filled with background), so a body cut off by a narrow field of view gets
the same box as in a wider one, and no window is spent on the air around the patient: nnU-Net's crop to the
non-zero region, with air in place of zero (CT air is -1000 HU, not 0).

Resampling rules (bilinear sampling at the lattice's pixel centres, ``F.grid_sample``):

* images: Gaussian antialiasing first when the target is coarser (sigma ``(factor - 1) / 2`` source pixels,
  scikit-image's rule), background outside the scan;
* masks: one-hot, bilinear without antialiasing, argmax (nnU-Net's order-1 one-hot rule), ties going to the
  organ rather than background: boundaries follow the interpolated class shares, and a structure one source
  pixel wide is kept wherever a target pixel centre falls near it. An antialiased (area) average would hand it
  to the surrounding background: at 0.8 -> 3 mm it kept none of a 0.8 mm line and 3% of a 1.6 mm one, against
  about half and three quarters with this rule (``benchmarks/geometry.py``);
* probabilities back to the scan's grid: the same sampling the other way (antialiased when the scan is coarser
  than the plan), then argmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from delinea.errors import OptionError

#: What windows are padded with: air in CT and the background of MRI both normalise to -1.
IMAGE_FILL = -1.0
#: A voxel is body when its normalised intensity exceeds this (CT: about -150 HU in the default window, below
#: fat; MRI: 5% of the 0.5-99.5 percentile range).
BODY_THRESHOLD = -0.9
#: A row (or column) of the volume belongs to the body box when this share of its voxels is body: speckle noise
#: and a thin line of the scanner table do not widen the box.
BODY_SHARE = 0.01
#: A slice resampled to the plan may have at most this many pixels along a side (a 41 cm field at 0.1 mm): beyond,
#: resampling and sliding windows cost minutes per slice.
MAX_SLICE_PIXELS = 4096


def body_box(body: tuple[np.ndarray, np.ndarray]) -> tuple[int, int, int, int]:
    """The in-plane box ``(x0, x1, y0, y1)`` (end-exclusive, canonical voxels) of the body.

    Args:
        body: per-row and per-column body shares of a volume: ``(share of each x row, share of each y column)``
            (see :meth:`delinea.datamodules.utils.LoadedCase.body_profiles`).

    A volume with no body at all (an empty or blank scan) keeps its whole extent.
    """
    box = []
    for profile in body:
        inside = np.flatnonzero(np.asarray(profile) >= BODY_SHARE)
        box += [0, len(profile)] if inside.size == 0 else [int(inside[0]), int(inside[-1]) + 1]
    return box[0], box[1], box[2], box[3]


@dataclass(frozen=True)
class Region:
    """A rectangle of the plan lattice: plan pixels ``[x0, x1) x [y0, y1)`` of ``spacing`` mm (pixel ``g`` covers
    ``[g * spacing, (g + 1) * spacing)`` mm along its axis)."""

    x0: int
    x1: int
    y0: int
    y1: int
    spacing: float

    @property
    def size(self) -> tuple[int, int]:
        """(rows, columns) of the region."""
        return self.x1 - self.x0, self.y1 - self.y0

    def as_tensor(self) -> torch.Tensor:
        """(x0, x1, y0, y1, spacing) as float64, for batches."""
        return torch.tensor([self.x0, self.x1, self.y0, self.y1, self.spacing], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> Region:
        """The inverse of :meth:`as_tensor`."""
        x0, x1, y0, y1, spacing = (float(v) for v in values)
        return cls(int(x0), int(x1), int(y0), int(y1), spacing)


@dataclass(frozen=True)
class Axes:
    """Where a volume's canonical in-plane voxels lie along its own axes: voxel ``j`` of axis ``a`` is centred at
    ``origin[a] + j * spacing[a]`` mm (the origin projected on the axis direction, so axis-aligned scans of one
    subject share coordinates)."""

    origin: tuple[float, float]
    spacing: tuple[float, float]
    shape: tuple[int, int]

    @classmethod
    def of(cls, affine: np.ndarray, shape: Sequence[int]) -> Axes:
        """The in-plane axes of a canonical volume with ``affine`` and ``shape``."""
        columns = np.asarray(affine, dtype=np.float64)[:3, :2]
        spacing = np.sqrt((columns**2).sum(0))
        origin = (columns / spacing).T @ np.asarray(affine, dtype=np.float64)[:3, 3]
        return cls(
            (float(origin[0]), float(origin[1])), (float(spacing[0]), float(spacing[1])), (int(shape[0]), int(shape[1]))
        )

    def region(self, box: Sequence[int], target: float, margin: float = 0.0) -> Region:
        """The lattice region at ``target`` mm covering voxels ``box = (x0, x1, y0, y1)`` (end-exclusive) grown by
        ``margin`` mm on every side (it may reach past the volume)."""
        bounds = []
        for axis in range(2):
            start = self.origin[axis] + (box[2 * axis] - 0.5) * self.spacing[axis] - margin
            end = self.origin[axis] + (box[2 * axis + 1] - 0.5) * self.spacing[axis] + margin
            bounds += [math.floor(start / target + 1e-6), math.ceil(end / target - 1e-6)]
        region = Region(bounds[0], max(bounds[1], bounds[0] + 1), bounds[2], max(bounds[3], bounds[2] + 1), target)
        if max(region.size) > MAX_SLICE_PIXELS:
            rows, cols = region.size
            raise OptionError(
                f"the plan's spacing {target:g} mm per pixel resamples a {rows * target:.0f} x {cols * target:.0f} mm "
                f"slice to {rows} x {cols} pixels, more than {MAX_SLICE_PIXELS} per side: choose a coarser spacing"
            )
        return region

    def voxels_in(self, region: Region) -> tuple[int, int, int, int]:
        """The volume's voxels ``(x0, x1, y0, y1)`` whose centres lie in ``region`` (where predictions go)."""
        box = []
        for axis, (start, end) in enumerate(((region.x0, region.x1), (region.y0, region.y1))):
            low = math.ceil((start * region.spacing - self.origin[axis]) / self.spacing[axis] - 1e-6)
            high = math.ceil((end * region.spacing - self.origin[axis]) / self.spacing[axis] - 1e-6)
            box += [min(max(0, low), self.shape[axis]), min(max(0, high), self.shape[axis])]
        return box[0], box[1], box[2], box[3]


def _blur(values: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with one sigma (pixels) per spatial axis; 0 leaves an axis alone."""
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0.1:
            continue
        radius = math.ceil(3 * sigma)
        taps = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1, 1) if axis == 0 else (kernel / kernel.sum()).view(1, 1, 1, -1)
        pad = (0, 0, radius, radius) if axis == 0 else (radius, radius, 0, 0)
        channels = values.shape[1]
        values = F.conv2d(F.pad(values, pad, mode="replicate"), kernel.expand(channels, 1, -1, -1), groups=channels)
    return values


def _sample(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, fill: float) -> torch.Tensor:
    """Bilinear samples of (C, H, W) at fractional pixel coordinates ``rows`` x ``cols`` (a grid); ``fill``
    outside."""
    height, width = values.shape[-2:]
    grid_y = 2 * rows / max(height - 1, 1) - 1
    grid_x = 2 * cols / max(width - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], -1)[None]  # (1, h, w, 2): x, y
    shifted = values[None].float() - fill
    out = F.grid_sample(shifted, grid.to(shifted), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0] + fill


def to_lattice(values: torch.Tensor, axes: Axes, region: Region, fill: float = IMAGE_FILL) -> torch.Tensor:
    """Resample a canonical slice (C, X, Y) onto ``region`` of the lattice: (C, rows, columns), antialiased when the
    lattice is coarser, ``fill`` outside the scan."""
    target = region.spacing
    sigmas = [max(0.0, (target / s - 1) / 2) for s in axes.spacing]
    if any(sigma > 0.1 for sigma in sigmas):
        values = _blur((values.float() - fill)[None], sigmas)[0] + fill
    rows, cols = _lattice_coordinates(axes, region)
    return _sample(values, rows, cols, fill)


def _lattice_coordinates(axes: Axes, region: Region) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional source pixel coordinates (float64) of the centres of ``region``'s rows and columns. Each pixel's
    coordinate depends only on its own lattice index, so a sub-region gets exactly the values of the whole."""
    rows = (
        (region.x0 + torch.arange(region.size[0], dtype=torch.float64) + 0.5) * region.spacing - axes.origin[0]
    ) / axes.spacing[0]
    cols = (
        (region.y0 + torch.arange(region.size[1], dtype=torch.float64) + 0.5) * region.spacing - axes.origin[1]
    ) / axes.spacing[1]
    return rows, cols


def mask_to_lattice(
    mask: torch.Tensor | np.ndarray, axes: Axes, region: Region, num_classes: int | None = None
) -> torch.Tensor:
    """An integer mask (X, Y) on ``region``: the bilinear share of each class at every lattice pixel, argmax (ties
    to the organ); background outside the scan.

    The shares are those of a bilinearly sampled one-hot mask, gathered from each pixel's four source neighbours,
    so the cost is the region's size (not the slice's one-hot), and a window (a sub-region) gets exactly the
    pixels that the whole slice's resampling has there. (``num_classes`` is not needed; kept for callers.)
    """
    source = torch.as_tensor(np.ascontiguousarray(mask))  # a 2D slice of a reoriented volume may have negative strides
    height, width = source.shape
    rows, cols = _lattice_coordinates(axes, region)
    row0, col0 = torch.floor(rows), torch.floor(cols)
    row_weights = torch.stack([1 - (rows - row0), rows - row0])  # (2, h): weight of row0 and row0 + 1
    col_weights = torch.stack([1 - (cols - col0), cols - col0])  # (2, w)
    row_index = torch.stack([row0, row0 + 1]).long()
    col_index = torch.stack([col0, col0 + 1]).long()
    row_weights[(row_index < 0) | (row_index >= height)] = 0.0  # zero padding outside the scan
    col_weights[(col_index < 0) | (col_index >= width)] = 0.0
    row_index, col_index = row_index.clamp(0, max(height - 1, 0)), col_index.clamp(0, max(width - 1, 0))
    labels = torch.stack([source[row_index[i][:, None], col_index[j][None, :]] for i in range(2) for j in range(2)])
    labels = labels.long()  # (4, h, w): the four neighbours' classes
    out = labels[0].clone()  # (h, w); where the four neighbours agree, their class wins
    mixed = torch.nonzero((labels != labels[:1]).any(0), as_tuple=True)
    if len(mixed[0]):
        # The bilinear share of each neighbour's class (only those four can win), summed in one order per pixel.
        candidates = labels[:, mixed[0], mixed[1]]  # (4, n)
        weights = torch.stack([row_weights[i][mixed[0]] * col_weights[j][mixed[1]] for i in range(2) for j in range(2)])
        best_label, best_share = candidates[0], torch.full_like(weights[0], -1.0)
        for candidate in candidates:
            share = (weights * (candidates == candidate)).sum(0) - 1e-4 * (candidate == 0)  # ties go to the organ
            better = (share > best_share) | ((share == best_share) & (candidate < best_label))  # then to the lower id
            best_label, best_share = torch.where(better, candidate, best_label), torch.where(better, share, best_share)
        out[mixed] = best_label
    inside = (row_weights.sum(0)[:, None] * col_weights.sum(0)[None, :]) >= 0.5  # the scan covers half the pixel
    return out.masked_fill_(~inside, 0)


def from_lattice(values: torch.Tensor, region: Region, axes: Axes, box: Sequence[int]) -> torch.Tensor:
    """Resample (C, rows, columns) on ``region`` back to the scan's voxels ``box = (x0, x1, y0, y1)`` (inside the
    volume): (C, x1 - x0, y1 - y0); antialiased when the scan is coarser than the lattice; 0 outside the region."""
    sigmas = [max(0.0, (s / region.spacing - 1) / 2) for s in axes.spacing]
    if any(sigma > 0.1 for sigma in sigmas):
        values = _blur(values.float()[None], sigmas)[0]
    x = torch.arange(box[0], box[1], dtype=torch.float64)
    y = torch.arange(box[2], box[3], dtype=torch.float64)
    rows = (axes.origin[0] + x * axes.spacing[0]) / region.spacing - 0.5 - region.x0
    cols = (axes.origin[1] + y * axes.spacing[1]) / region.spacing - 0.5 - region.y0
    return _sample(values, rows, cols, 0.0)
