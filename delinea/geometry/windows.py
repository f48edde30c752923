"""Window layouts on the plan's lattice: where training windows are placed, the tiles of validation losses, and
where sliding windows sit at inference (a slice's windows at the same lattice places in every scan)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from delinea.errors import OptionError

#: Inference windows one slice may take: each is a network pass (a whole sampling run for MedDelinea).
MAX_WINDOWS_PER_SLICE = 4096


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


def check_window_count(count: int, image: torch.Tensor, window: int) -> None:
    """Refuse a slice that would take more than :data:`MAX_WINDOWS_PER_SLICE` windows (a spacing far finer than the
    scan's, or a tiny window), naming the count and what to change."""
    if count > MAX_WINDOWS_PER_SLICE:
        height, width = image.shape[-2:]
        raise OptionError(
            f"a {height} x {width} px slice takes {count} windows of {window} px (more than {MAX_WINDOWS_PER_SLICE}): "
            "choose a larger window (--data.resolution) or a coarser plan spacing"
        )


def covering_window(height: int, width: int, multiple: int) -> int:
    """The smallest window side, a multiple of ``multiple``, that covers a ``height x width`` slice in one window
    (inference without a plan)."""
    return -(-max(height, width) // multiple) * multiple


def tile_windows(
    image: torch.Tensor, mask: torch.Tensor, window: int, fill: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fewest non-overlapping ``window`` tiles covering whole slices (validation losses: the same windows at
    every validation), padded with ``fill`` (images) and background (masks).

    Args:
        image: slices (N, 1, H, W).
        mask: their masks (N, H, W).

    Returns:
        ``(images, masks, tiles per slice)``: (N * T, 1, window, window) and (N * T, window, window), slice-major.
    """
    height, width = image.shape[-2:]
    tiles = [(top, left) for top in tile_offsets(height, window) for left in tile_offsets(width, window)]
    check_window_count(len(tiles), image, window)
    images = torch.stack([crop_window(image, y, x, window, fill) for y, x in tiles], 1)  # (N, T, 1, W, W)
    masks = torch.stack([crop_window(mask, y, x, window, 0) for y, x in tiles], 1)  # (N, T, W, W)
    return images.flatten(0, 1), masks.flatten(0, 1), len(tiles)


@dataclass(frozen=True)
class SlidingLayout:
    """Where sliding windows sit over a slice of a lattice region: the slice is padded by ``pad`` (MONAI/``F.pad``
    order: left, right, top, bottom) and the padded slice's pixel (0, 0) is lattice pixel ``start``."""

    start: tuple[int, int]
    pad: tuple[int, int, int, int]

    @classmethod
    def of(cls, x0: int | None, y0: int | None, height: int, width: int, window: int, stride: int) -> SlidingLayout:
        """The layout for a ``height x width`` slice whose first pixel is lattice pixel ``(x0, y0)``; without a
        lattice place (None), windows start at the slice's corner.

        An axis no longer than a window is centred in one; a longer one is padded to start at a multiple of
        ``stride`` on the lattice (:func:`lattice_padding`).
        """
        if x0 is None or y0 is None:
            return cls((0, 0), (0, 0, 0, 0))
        rows, cols = lattice_padding(x0, height, window, stride), lattice_padding(y0, width, window, stride)
        return cls((x0 - rows[0], y0 - cols[0]), (cols[0], cols[1], rows[0], rows[1]))

    def seed(self, top: int, left: int) -> int:
        """The seed of the window at ``(top, left)`` of the padded slice: a function of its lattice place only, so
        the same anatomy in another scan gets the same noise."""
        return hash((self.start[0] + top, self.start[1] + left)) % 2**31
