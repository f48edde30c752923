"""The plan: the physical pixel size and the window a model works at, and the resampling and windows serving it.

Like nnU-Net's plans, every model has one: an in-plane target spacing in mm per pixel (per modality) and its
window size(s) in pixels. Each axial slice is resampled in-plane to the target spacing, keeping its aspect ratio
(never stretched to a square); training takes ``window x window`` crops of it, and evaluation covers it with
overlapping windows and resamples the probabilities back to the scan's own grid
(:meth:`delinea.tasks.base.SegmentationTask.predict_slices`, :class:`delinea.tasks.volumes.VolumeAssembler`).

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

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from delinea.errors import OptionError
from delinea.io import DatasetError, write_atomic

#: Spacings above this many mm per pixel are refused: no abdominal scan has them, a typo does.
MAX_SPACING = 20.0
#: Spacings below this are refused: the finest clinical CT and MRI pixels are about 0.2 mm, and every halving of the
#: spacing quadruples the pixels to resample and the windows to segment (0.01 mm made a 2-step fit 14x slower).
MIN_SPACING = 0.1
#: A slice resampled to the plan may have at most this many pixels along a side (a 41 cm field at 0.1 mm): beyond,
#: resampling and sliding windows cost minutes per slice.
MAX_SLICE_PIXELS = 4096
#: Inference windows one slice may take: each is a network pass (a whole sampling run for MedDelinea).
MAX_WINDOWS_PER_SLICE = 4096
#: What windows are padded with: air in CT and the background of MRI both normalise to -1.
IMAGE_FILL = -1.0
#: A voxel is body when its normalised intensity exceeds this (CT: about -150 HU in the default window, below
#: fat; MRI: 5% of the 0.5-99.5 percentile range).
BODY_THRESHOLD = -0.9
#: A row (or column) of the volume belongs to the body box when this share of its voxels is body: speckle noise
#: and a thin line of the scanner table do not widen the box.
BODY_SHARE = 0.01
PLAN_MODALITIES = ("ct", "mr")


def check_spacing(value: float, what: str = "spacing") -> float:
    """``value`` as a float if it is a usable in-plane spacing in mm, else a ValueError naming it."""
    try:
        spacing = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what} {value!r} must be a number of mm per pixel") from None
    if not math.isfinite(spacing) or spacing <= 0:
        raise OptionError(f"{what} {value!r} must be a positive number of mm per pixel")
    if spacing > MAX_SPACING:
        raise OptionError(f"{what} {value!r} mm per pixel is absurd for a scan (expected at most {MAX_SPACING:g} mm)")
    if spacing < MIN_SPACING:
        raise OptionError(
            f"{what} {value!r} mm per pixel is finer than any CT or MRI slice (expected at least {MIN_SPACING:g} mm: "
            "each halving quadruples the pixels and windows per slice)"
        )
    return spacing


def check_windows(window: int | Sequence[int], what: str = "window") -> tuple[int, ...]:
    """Window sizes as a tuple of positive multiples of 8, else a ValueError naming the value."""
    values = [window] if isinstance(window, int) else list(window)
    if not values or any(not isinstance(w, int) or isinstance(w, bool) or w < 8 or w % 8 for w in values):
        raise OptionError(f"{what} must be a positive multiple of 8 or a list of them, got {window!r}")
    return tuple(values)


@dataclass(frozen=True)
class Plan:
    """A model's geometry: in-plane target spacing per modality and window size(s).

    Attributes:
        spacing: modality (``ct``/``mr``) -> target in-plane spacing in mm per pixel.
        window: training window sizes in pixels (alternated between batches); the first one is the inference
            window.
        source: how the plan was made (``"median of 41 training cases"``, ``"explicit"``...), for the record.
        body_margin: margin in mm around the body box every slice is cut to; None: whole slices.
    """

    spacing: Mapping[str, float]
    window: tuple[int, ...]
    source: str = field(default="", compare=False)
    body_margin: float | None = 10.0

    def __post_init__(self) -> None:
        if not self.spacing:
            raise OptionError("a plan needs the spacing of at least one modality")
        spacing = {}
        for modality, value in self.spacing.items():
            if modality not in PLAN_MODALITIES:
                raise OptionError(f"plan spacing for unknown modality {modality!r}; expected {PLAN_MODALITIES}")
            spacing[modality] = check_spacing(value, f"plan spacing ({modality})")
        object.__setattr__(self, "spacing", dict(sorted(spacing.items())))
        object.__setattr__(self, "window", check_windows(tuple(self.window), "plan window"))
        if self.body_margin is not None:
            margin = float(self.body_margin)
            if not math.isfinite(margin) or margin < 0:
                raise OptionError(f"plan body_margin {self.body_margin!r} must be a non-negative number of mm or None")
            object.__setattr__(self, "body_margin", margin)

    @classmethod
    def uniform(
        cls, spacing: float, window: int | Sequence[int], source: str = "explicit", body_margin: float | None = 10.0
    ) -> Plan:
        """The same spacing for every modality."""
        value = check_spacing(spacing)
        return cls({m: value for m in PLAN_MODALITIES}, check_windows(window), source, body_margin)

    @classmethod
    def from_cases(
        cls, spacings: Mapping[str, Sequence[float]], window: int | Sequence[int], body_margin: float | None = 10.0
    ) -> Plan:
        """The median in-plane spacing of training cases, per modality.

        Args:
            spacings: modality -> every training case's in-plane spacing values (both axes of each case).
            window: window size(s) in pixels.
            body_margin: margin of the body crop in mm, or None.
        """
        present = {m: list(v) for m, v in spacings.items() if len(v)}
        if not present:
            raise DatasetError("cannot plan a spacing: no training case with a readable header")
        counts = ", ".join(f"{len(v) // 2} {m.upper()}" for m, v in present.items())
        median = {m: round(float(np.median(v)), 4) for m, v in present.items()}
        return cls(
            median, check_windows(window), f"median in-plane spacing of the training cases ({counts})", body_margin
        )

    @property
    def inference_window(self) -> int:
        """The window that validation, test and predict slide over a slice."""
        return self.window[0]

    def spacing_for(self, modality: str) -> float:
        """Target spacing for ``modality``; for a modality the model never trained on (zero-shot), the median of
        the plan's spacings."""
        if modality in self.spacing:
            return self.spacing[modality]
        return float(np.median(list(self.spacing.values())))

    def same_geometry(self, other: Plan) -> bool:
        """Whether two plans resample and crop alike (windows may differ)."""
        return (
            set(self.spacing) == set(other.spacing)
            and all(abs(self.spacing[m] - other.spacing[m]) <= 1e-6 * self.spacing[m] for m in self.spacing)
            and self.body_margin == other.body_margin
        )

    def with_window(self, window: int | Sequence[int]) -> Plan:
        """The same geometry with other windows."""
        return Plan(self.spacing, check_windows(window), self.source, self.body_margin)

    def describe(self) -> str:
        """One line for logs: ``ct 3 mm per pixel; window 256/512 px; body + 10 mm (median of ...)``."""
        spacing = ", ".join(f"{m} {s:.3g} mm" for m, s in self.spacing.items())
        windows = "/".join(str(w) for w in self.window)
        crop = "whole slices" if self.body_margin is None else f"body + {self.body_margin:g} mm"
        return f"{spacing} per pixel; window {windows} px; {crop}" + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what plan files and checkpoints hold)."""
        return {
            "spacing_mm": dict(self.spacing),
            "window": list(self.window),
            "body_margin_mm": self.body_margin,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> Plan:
        """Read :meth:`to_dict` output back; ValueError naming ``where`` if it is not a plan."""
        try:
            return cls(
                dict(data["spacing_mm"]),
                tuple(data["window"]),
                str(data.get("source", "")),
                data.get("body_margin_mm", 10.0),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise OptionError(
                f"{where} is not a delinea plan ({type(error).__name__}: {error}); expected "
                '{"spacing_mm": {"ct": 1.5}, "window": [256]}'
            ) from None

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically: concurrent ranks never read half a file)."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file; DatasetError naming the file if it is missing or not a plan."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DatasetError(f"{path}: cannot read the plan file ({error})") from None
        try:
            return cls.from_dict(data, where=str(path))
        except ValueError as error:
            raise DatasetError(str(error)) from None


# ----------------------------------------------------------------------------------------------------------
# The body box


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


# ----------------------------------------------------------------------------------------------------------
# The lattice and resampling onto it


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


# ----------------------------------------------------------------------------------------------------------
# Windows


def offset_range(length: int, window: int, centre_short: bool = False) -> tuple[int, int]:
    """Smallest and largest training window start along an axis of ``length`` pixels, matching where inference
    windows put the slice: a slice shorter than the window lies wholly inside it (anywhere in the slack, or with
    ``centre_short`` centred as inference centres it), a longer one is cut with the window's centre anywhere on it
    (inference windows on the lattice reach up to a stride past its edges). Negative starts and ends past the slice
    are padded."""
    if length <= window:
        if centre_short:
            start = -lattice_padding(0, length, window, window)[0]
            return start, start
        return length - window, 0
    return -(window // 2), length - 1 - window // 2


def window_offsets(
    shape: Sequence[int],
    window: int,
    rng: np.random.Generator,
    foreground: torch.Tensor | None = None,
    centre_short: bool = False,
) -> tuple[int, int]:
    """A random window start (top, left) for a slice of ``shape`` (along an axis shorter than the window, the
    slice is centred with ``centre_short``; see :func:`offset_range`).

    With ``foreground`` (a mask of the slice), the window is centred on one of its labelled pixels, chosen by
    first drawing a class present, then a pixel of it, so small organs are centred as often as large ones
    (nnU-Net's foreground oversampling); then clipped to :func:`offset_range`.
    """
    ranges = [offset_range(int(n), window, centre_short) for n in shape[:2]]
    if foreground is not None:
        classes = [int(c) for c in torch.unique(foreground) if c > 0]
        if classes:
            chosen = classes[int(rng.integers(len(classes)))]
            pixels = torch.nonzero(foreground == chosen)
            y, x = (int(v) for v in pixels[int(rng.integers(len(pixels)))])
            (top_lo, top_hi), (left_lo, left_hi) = ranges
            return int(np.clip(y - window // 2, top_lo, top_hi)), int(np.clip(x - window // 2, left_lo, left_hi))
    (top_lo, top_hi), (left_lo, left_hi) = ranges
    return int(rng.integers(top_lo, top_hi + 1)), int(rng.integers(left_lo, left_hi + 1))


def crop_window(array: torch.Tensor, top: int, left: int, window: int | tuple[int, int], fill: float) -> torch.Tensor:
    """The ``window`` patch (a side, or (rows, columns)) of (..., H, W) starting at (top, left), padded with
    ``fill`` outside."""
    rows, cols = (window, window) if isinstance(window, int) else window
    height, width = array.shape[-2:]
    out = torch.full((*array.shape[:-2], rows, cols), fill, dtype=array.dtype)
    y0, y1 = max(0, top), min(height, top + rows)
    x0, x1 = max(0, left), min(width, left + cols)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = array[..., y0:y1, x0:x1]
    return out


def lattice_padding(start: int, length: int, window: int, stride: int) -> tuple[int, int]:
    """Padding (before, after) of a region of ``length`` lattice pixels from pixel ``start`` for sliding windows.

    A region no longer than the window is centred in one window. A longer one is padded to start at a multiple of
    ``stride`` and to hold ``window + k * stride`` pixels, so the windows sit at the same lattice places in every
    scan whose region starts in the same stride cell.
    """
    if length <= window:
        before = (window - length) // 2
        return before, window - length - before
    before = start % stride
    return before, (-(before + length - window)) % stride


def tile_offsets(length: int, window: int) -> list[int]:
    """Starts of the fewest non-overlapping windows covering an axis; the slice sits centred in the padding."""
    count = max(1, -(-length // window))
    first = (length - count * window) // 2
    return [first + i * window for i in range(count)]


__all__ = [
    "BODY_SHARE",
    "BODY_THRESHOLD",
    "IMAGE_FILL",
    "MAX_SLICE_PIXELS",
    "MAX_SPACING",
    "MAX_WINDOWS_PER_SLICE",
    "MIN_SPACING",
    "Axes",
    "Plan",
    "Region",
    "body_box",
    "check_spacing",
    "check_windows",
    "crop_window",
    "from_lattice",
    "lattice_padding",
    "mask_to_lattice",
    "offset_range",
    "tile_offsets",
    "to_lattice",
    "window_offsets",
]
