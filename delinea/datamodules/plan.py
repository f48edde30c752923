"""The plan: the physical pixel size and the window a model works at, and the resampling and windows serving it.

Like nnU-Net's plans, every model has one: an in-plane target spacing in mm per pixel (per modality) and its
window size(s) in pixels. Each axial slice is resampled in-plane to the target spacing, keeping its aspect ratio
(never stretched to a square); training takes ``window x window`` crops of it, and evaluation covers the whole
resampled slice with overlapping windows and resamples the probabilities back to the scan's own grid
(:meth:`delinea.tasks.base.SegmentationTask.predict_slices`, :class:`delinea.tasks.volumes.VolumeAssembler`).

Resampling rules (all with pixel-centre alignment, ``align_corners=False``, so a round trip maps the slice's
extent onto itself):

* images: bilinear, antialiased when shrinking (area-like averaging instead of aliasing);
* masks: one-hot, bilinear without antialiasing, argmax (nnU-Net's order-1 one-hot rule): boundaries follow the
  interpolated class shares, and a structure one source pixel wide is kept wherever a target pixel centre
  falls near it (an antialiased average would hand it to the surrounding background);
* probabilities back to the scan's grid: bilinear (antialiased when shrinking), then argmax.

The resampled size of an extent of ``n`` pixels at ``s`` mm is ``round(n * s / target)``, so the achieved spacing
differs from the target by at most half a pixel over the whole extent.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from delinea.io import DatasetError

#: Spacings above this many mm per pixel are refused: no abdominal scan has them, a typo does.
MAX_SPACING = 20.0
#: What windows are padded with: air in CT and the background of MRI both normalise to -1.
IMAGE_FILL = -1.0
PLAN_MODALITIES = ("ct", "mr")


def check_spacing(value: float, what: str = "spacing") -> float:
    """``value`` as a float if it is a usable in-plane spacing in mm, else a ValueError naming it."""
    try:
        spacing = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r} must be a number of mm per pixel") from None
    if not math.isfinite(spacing) or spacing <= 0:
        raise ValueError(f"{what} {value!r} must be a positive number of mm per pixel")
    if spacing > MAX_SPACING:
        raise ValueError(f"{what} {value!r} mm per pixel is absurd for a scan (expected at most {MAX_SPACING:g} mm)")
    return spacing


def check_windows(window: int | Sequence[int], what: str = "window") -> tuple[int, ...]:
    """Window sizes as a tuple of positive multiples of 8, else a ValueError naming the value."""
    values = [window] if isinstance(window, int) else list(window)
    if not values or any(not isinstance(w, int) or isinstance(w, bool) or w < 8 or w % 8 for w in values):
        raise ValueError(f"{what} must be a positive multiple of 8 or a list of them, got {window!r}")
    return tuple(values)


@dataclass(frozen=True)
class Plan:
    """A model's geometry: in-plane target spacing per modality and window size(s).

    Attributes:
        spacing: modality (``ct``/``mr``) -> target in-plane spacing in mm per pixel.
        window: training window sizes in pixels (alternated between batches); the first one is the inference
            window.
        source: how the plan was made (``"median of 41 training cases"``, ``"explicit"``...), for the record.
    """

    spacing: Mapping[str, float]
    window: tuple[int, ...]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.spacing:
            raise ValueError("a plan needs the spacing of at least one modality")
        spacing = {}
        for modality, value in self.spacing.items():
            if modality not in PLAN_MODALITIES:
                raise ValueError(f"plan spacing for unknown modality {modality!r}; expected {PLAN_MODALITIES}")
            spacing[modality] = check_spacing(value, f"plan spacing ({modality})")
        object.__setattr__(self, "spacing", dict(sorted(spacing.items())))
        object.__setattr__(self, "window", check_windows(tuple(self.window), "plan window"))

    @classmethod
    def uniform(cls, spacing: float, window: int | Sequence[int], source: str = "explicit") -> Plan:
        """The same spacing for every modality."""
        value = check_spacing(spacing)
        return cls({m: value for m in PLAN_MODALITIES}, check_windows(window), source)

    @classmethod
    def from_cases(cls, spacings: Mapping[str, Sequence[float]], window: int | Sequence[int]) -> Plan:
        """The median in-plane spacing of training cases, per modality.

        Args:
            spacings: modality -> every training case's in-plane spacing values (both axes of each case).
            window: window size(s) in pixels.
        """
        present = {m: list(v) for m, v in spacings.items() if len(v)}
        if not present:
            raise DatasetError("cannot plan a spacing: no training case with a readable header")
        counts = ", ".join(f"{len(v) // 2} {m.upper()}" for m, v in present.items())
        median = {m: round(float(np.median(v)), 4) for m, v in present.items()}
        return cls(median, check_windows(window), f"median in-plane spacing of the training cases ({counts})")

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
        """Whether two plans resample to the same spacing (windows may differ)."""
        return set(self.spacing) == set(other.spacing) and all(
            abs(self.spacing[m] - other.spacing[m]) <= 1e-6 * self.spacing[m] for m in self.spacing
        )

    def with_window(self, window: int | Sequence[int]) -> Plan:
        """The same spacing with other windows."""
        return Plan(self.spacing, check_windows(window), self.source)

    def describe(self) -> str:
        """One line for logs: ``ct 3.00 mm, mr 1.50 mm per pixel; window 256/512 (median of ...)``."""
        spacing = ", ".join(f"{m} {s:.3g} mm" for m, s in self.spacing.items())
        windows = "/".join(str(w) for w in self.window)
        return f"{spacing} per pixel; window {windows} px" + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what plan files and checkpoints hold)."""
        return {"spacing_mm": dict(self.spacing), "window": list(self.window), "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> Plan:
        """Read :meth:`to_dict` output back; ValueError naming ``where`` if it is not a plan."""
        try:
            return cls(dict(data["spacing_mm"]), tuple(data["window"]), str(data.get("source", "")))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where} is not a delinea plan ({type(error).__name__}: {error}); expected "
                             '{"spacing_mm": {"ct": 1.5}, "window": [256]}') from None

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically: concurrent ranks never read half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(self.to_dict(), handle, indent=1)
        os.replace(handle.name, path)
        return path

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
# Resampling one slice


def plan_size(shape: Sequence[int], spacing: Sequence[float], target: float) -> tuple[int, int]:
    """In-plane size (H, W) of a slice of ``shape`` at ``spacing`` mm once resampled to ``target`` mm."""
    return (max(1, round(shape[0] * spacing[0] / target)), max(1, round(shape[1] * spacing[1] / target)))


def resample_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resampling of (..., H, W) to ``size``, antialiased when an axis shrinks."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    lead = image.shape[:-2]
    flat = image.reshape(-1, 1, *image.shape[-2:]).float()
    shrinks = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrinks)
    return out.reshape(*lead, *size)


def resample_mask(mask: torch.Tensor | np.ndarray, size: Sequence[int], num_classes: int) -> torch.Tensor:
    """Resampling of an integer mask (H, W) to ``size``: one-hot, bilinear without antialiasing, argmax."""
    mask = torch.as_tensor(np.asarray(mask)).long()
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape) == size:
        return mask
    onehot = F.one_hot(mask, num_classes).permute(2, 0, 1)[None].float()  # (1, C, H, W)
    shares = F.interpolate(onehot, size=size, mode="bilinear", align_corners=False)
    return shares[0].argmax(0)


def resample_probabilities(probabilities: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class probabilities (N, C, h, w) back to the scan's grid ``size`` (bilinear; antialiased when shrinking)."""
    return resample_image(probabilities, size)


# ----------------------------------------------------------------------------------------------------------
# Windows


def offset_range(length: int, window: int) -> tuple[int, int]:
    """Smallest and largest window start along an axis: inside the slice when it is larger than the window,
    else anywhere that keeps the whole slice inside the window (negative starts pad before it)."""
    return (0, length - window) if length >= window else (length - window, 0)


def window_offsets(
    shape: Sequence[int],
    window: int,
    rng: np.random.Generator,
    foreground: torch.Tensor | None = None,
) -> tuple[int, int]:
    """A random window start (top, left) for a slice of ``shape``.

    With ``foreground`` (a mask of the slice), the window is centred on one of its labelled pixels, chosen by
    first drawing a class present, then a pixel of it, so small organs are centred as often as large ones
    (nnU-Net's foreground oversampling); then clipped to :func:`offset_range`.
    """
    ranges = [offset_range(int(n), window) for n in shape[:2]]
    if foreground is not None:
        classes = [int(c) for c in torch.unique(foreground) if c > 0]
        if classes:
            chosen = classes[int(rng.integers(len(classes)))]
            pixels = torch.nonzero(foreground == chosen)
            y, x = (int(v) for v in pixels[int(rng.integers(len(pixels)))])
            return tuple(int(np.clip(c - window // 2, lo, hi)) for c, (lo, hi) in zip((y, x), ranges))  # type: ignore[return-value]
    return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ranges)  # type: ignore[return-value]


def crop_window(array: torch.Tensor, top: int, left: int, window: int, fill: float) -> torch.Tensor:
    """The ``window x window`` patch of (..., H, W) starting at (top, left), padded with ``fill`` outside."""
    height, width = array.shape[-2:]
    out = torch.full((*array.shape[:-2], window, window), fill, dtype=array.dtype)
    y0, y1 = max(0, top), min(height, top + window)
    x0, x1 = max(0, left), min(width, left + window)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = array[..., y0:y1, x0:x1]
    return out


def tile_offsets(length: int, window: int) -> list[int]:
    """Starts of the fewest non-overlapping windows covering an axis; the slice sits centred in the padding."""
    count = max(1, -(-length // window))
    first = (length - count * window) // 2
    return [first + i * window for i in range(count)]


__all__ = [
    "IMAGE_FILL",
    "MAX_SPACING",
    "Plan",
    "check_spacing",
    "check_windows",
    "crop_window",
    "offset_range",
    "plan_size",
    "resample_image",
    "resample_mask",
    "resample_probabilities",
    "tile_offsets",
    "window_offsets",
]
