"""The slice dataset: a flat index over (case, axial slice), volumes read on demand in the worker."""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from delinea.datamodules.store import SliceStore
from delinea.datamodules.transforms import augmentation
from delinea.datamodules.utils import CaseFiles, Intensity, LabelSpec, LoadedCase, load_case_files
from delinea.geometry import (
    BODY_THRESHOLD,
    IMAGE_FILL,
    Axes,
    Plan,
    Region,
    body_box,
    crop_window,
    mask_to_lattice,
    to_lattice,
    window_offsets,
)
from delinea.io import DatasetError
from delinea.labels import NUM_CLASSES

#: A sample request: (slice index, window size in pixels or 0 for the whole slice, random seed of its crop).
Request = tuple[int, int, int]


class SliceDataset(Dataset):
    """Axial slices of a list of cases, read lazily, normalised, resampled to the plan's spacing, windowed.

    The index is two small integer arrays (case number and slice number per sample), so it costs a few bytes
    per slice whatever the dataset size. Slices come from the source files or, after :meth:`use_store`, from a
    slice store (:mod:`delinea.datamodules.store`), which holds them already on the plan: both give the same
    tensors (images at float16 precision). From the source files each worker keeps the ``cache_cases`` most
    recently read volumes (stored dtype, memory-mapped for ``.nii``; :attr:`reads` counts the reads) and
    normalises and resamples only what it serves: a training window's rectangle, not the whole slice.

    ``dataset[i]`` serves slice ``i`` resampled onto the plan's lattice over the case's body box (evaluation), with
    ``region`` (that lattice rectangle, :meth:`Region.as_tensor`) and ``box`` (the scan's voxels it covers,
    ``(x0, x1, y0, y1)`` inside the volume), and for labelled data the slice on the scan's own grid
    (``native_label``, ``native_image``: what 3D scoring and figures need, so the main process reads nothing again);
    ``dataset[(i, window, seed)]`` a ``window x window`` crop of it placed by ``seed`` (training: what
    :class:`~delinea.datamodules.samplers.SliceBatchSampler` yields), centred on a labelled pixel for a
    ``foreground_share`` of the seeds, padded with the background value where it reaches past the slice.

    The plan (:attr:`plan`) is set by the datamodule before any loader is built; it is part of the cache key.

    Args:
        name: dataset name (part of the cache key).
        root: dataset root (part of the cache key).
        cases: the cases, each with its number of axial slices.
        spec: label mapping, or None for unlabelled data (predict).
        labelled: per-case class masks, bool (n_cases, 9).
        intensity: intensity normalisation.
        augment: apply random training augmentation to training windows (and leave ``cache_key`` empty).
        foreground: per-sample foreground flags, if known.
        foreground_share: share of training windows centred on a labelled pixel.
        centre_short: a slice shorter than the training window along an axis is centred in it (where inference
            puts it) instead of placed anywhere in the slack.
        cache_cases: volumes kept per worker.
        ignore_unknown_labels: map unknown label ids to background instead of raising.
        affine_tolerance: image/label affine tolerance in mm.
        nonfinite: NaN or infinite image voxels: ``refuse`` (a DatasetError naming the file and their count) or
            ``replace`` (by the scan's lowest finite value; predict, counted in :meth:`replaced`).
        skip_bad: a training window whose case fails to load is served from the next good case instead, and the
            case is warned about (with its error) and never read again by this worker; evaluation still raises.
        loaded: the cases already in memory (in ``cases``' order), e.g. an array to segment; None reads them from
            their files.
    """

    def __init__(
        self,
        name: str,
        root: str,
        cases: Sequence[tuple[CaseFiles, int]],
        spec: LabelSpec | None,
        labelled: np.ndarray,
        intensity: Intensity,
        augment: bool = False,
        foreground: np.ndarray | None = None,
        foreground_share: float = 0.33,
        centre_short: bool = False,
        cache_cases: int = 4,
        ignore_unknown_labels: bool = False,
        affine_tolerance: float = 1e-3,
        nonfinite: Literal["refuse", "replace"] = "refuse",
        skip_bad: bool = False,
        loaded: Sequence[LoadedCase] | None = None,
    ) -> None:
        self.name = name
        self.root = root
        self.files = [files for files, _ in cases]
        counts = np.array([n for _, n in cases], dtype=np.int64)
        self.case_of = np.repeat(np.arange(len(cases), dtype=np.int32), counts)
        self.slice_of = (
            np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if len(cases) else np.zeros(0, np.int32)
        )
        self.spec = spec
        self.labelled = torch.as_tensor(np.asarray(labelled, dtype=bool).reshape(len(cases), NUM_CLASSES))
        self.intensity = intensity
        self.augment = augment
        self.foreground = foreground
        self.foreground_share = float(foreground_share)
        self.centre_short = centre_short
        self.cache_cases = max(1, int(cache_cases))
        self.ignore_unknown_labels = ignore_unknown_labels
        self.affine_tolerance = affine_tolerance
        self.nonfinite = nonfinite
        self.skip_bad = skip_bad
        #: Cases this process found bad while training (``skip_bad``): case number -> error.
        self.bad: dict[int, str] = {}
        self.plan: Plan | None = None
        self._stat = [files.stat_key() for files in self.files]
        self._transforms: dict[int, Any] = {}
        self._cache: OrderedDict[int, LoadedCase] = OrderedDict()
        #: Whole-volume reads of this process per case number (a volume read again after leaving the cache counts).
        self.reads: Counter[int] = Counter()
        self.store: SliceStore | None = None
        self._layouts: list[tuple[str, Region, tuple[int, int, int, int]]] | None = None
        self._boxes: dict[tuple[int, bool], tuple[int, int, int, int]] = {}
        self._loaded = list(loaded) if loaded is not None else None

    def __len__(self) -> int:
        return len(self.case_of)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # workers start empty; never ship volumes between processes
        return state

    def case(self, number: int) -> LoadedCase:
        """The loaded case ``number``, from memory, this process's LRU cache or disk."""
        if self._loaded is not None:
            return self._loaded[number]
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        loaded = load_case_files(
            self.files[number], self.spec, self.intensity, self.ignore_unknown_labels, self.affine_tolerance,
            self.nonfinite,
        )  # fmt: skip
        self.reads[number] += 1
        self._cache[number] = loaded
        while len(self._cache) > self.cache_cases:
            self._cache.popitem(last=False)
        return loaded

    def replaced(self, number: int) -> int:
        """NaN or infinite voxels of case ``number`` replaced by its lowest value where it was read (scans to predict;
        training and evaluation data refuse them, and a store holds none)."""
        loaded = self._loaded[number] if self._loaded is not None else self._cache.get(number)
        return loaded.replaced if loaded is not None else 0

    def transform(self, window: int) -> Any:
        """The augmentation pipeline for ``window`` (built once per process; reseeded per sample)."""
        if window not in self._transforms:
            self._transforms[window] = augmentation(window)
        return self._transforms[window]

    def cache_key(self, index: int, region: Region, modality: str, crop: tuple[int, int, int] | None) -> str:
        """SHA-1 of everything that determines the served tensor: dataset, root, case, its files' sizes and times,
        slice, the lattice region (spacing and extent), window and its place, modality and normalisation."""
        number = int(self.case_of[index])
        text = "|".join(
            [
                "v3",
                self.name,
                self.root,
                self.files[number].case_id,
                self._stat[number],
                str(int(self.slice_of[index])),
                f"{region.spacing:.6g}:{region.x0},{region.x1},{region.y0},{region.y1}",
                "whole" if crop is None else ",".join(map(str, crop)),
                self.intensity.key(modality),
            ]
        )
        return hashlib.sha1(text.encode()).hexdigest()

    def box(self, number: int, loaded: LoadedCase) -> tuple[int, int, int, int]:
        """The in-plane voxel box of case ``number``'s body (its whole extent when the plan has no body crop)."""
        crop = self.plan is not None and self.plan.body_margin is not None
        key = (number, crop)
        if key not in self._boxes:
            x, y = loaded.volume.array.shape[:2]
            self._boxes[key] = body_box(loaded.body_profiles(BODY_THRESHOLD)) if crop else (0, x, 0, y)
        return self._boxes[key]

    def use_store(self, store: SliceStore | None, records: Sequence[dict[str, Any]] | None = None) -> None:
        """Serve slices from ``store`` (its checked ``records``, one per case in order), or from the source files
        (None)."""
        self.store = store
        self._layouts = None
        if store is not None and records is not None:  # what each worker needs of a record (a few numbers per case)
            self._layouts = []
            for r in records:
                x0, x1, y0, y1, spacing = r["region"]
                box = (int(r["box"][0]), int(r["box"][1]), int(r["box"][2]), int(r["box"][3]))
                self._layouts.append((r["modality"], Region(int(x0), int(x1), int(y0), int(y1), float(spacing)), box))

    def layout(self, number: int) -> tuple[str, Region, tuple[int, int, int, int]]:
        """Case ``number``'s modality, the lattice region its slices are served on (the body box at the plan's
        spacing) and the scan's voxels ``(x0, x1, y0, y1)`` that region covers."""
        if self.store is not None and self._layouts is not None:
            return self._layouts[number]
        if self.plan is None:
            raise RuntimeError(f"{self.name}: the dataset has no plan yet; the datamodule sets it before loading")
        loaded = self.case(number)
        axes = _axes(loaded)
        margin = self.plan.body_margin or 0.0
        region = axes.region(self.box(number, loaded), self.plan.spacing_for(loaded.modality), margin)
        return loaded.modality, region, axes.voxels_in(region)

    def lattice(
        self,
        number: int,
        k: int,
        region: Region,
        top: int = 0,
        left: int = 0,
        size: tuple[int, int] | None = None,
        image: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Slice ``k`` of case ``number`` on the plan's lattice: the ``size`` rectangle (default: the whole
        ``region``) from ``(top, left)`` of the region, background outside it. Returns the image (1, h, w) float32
        in [-1, 1] with float16 precision (None unless ``image``) and the unified mask (h, w) int64 (None for
        unlabelled data).

        From the source files only the rectangle is resampled, and it holds exactly the pixels that resampling the
        whole slice gives there; from the store it is cut out of the memory-mapped arrays. Both serve the same
        tensors."""
        rows, cols = size if size is not None else region.size
        if self.store is not None:
            stored_image, stored_label = self.store.arrays(self.files[number].case_id)
            out_image = _cut(stored_image[k], top, left, rows, cols, IMAGE_FILL).float()[None] if image else None
            if self.spec is None:
                return out_image, None
            if stored_label is None:
                return out_image, torch.zeros((rows, cols), dtype=torch.int64)
            return out_image, _cut(stored_label[k], top, left, rows, cols, 0).long()
        loaded = self.case(number)
        axes = _axes(loaded)
        part = Region(
            region.x0 + top, region.x0 + top + rows, region.y0 + left, region.y0 + left + cols, region.spacing
        )
        out_image = None
        if image:
            native = torch.from_numpy(loaded.image_slice(k, self.intensity))
            resampled = to_lattice(native[None], axes, part).clamp_(-1.0, 1.0)
            out_image = _outside(resampled, region, part, IMAGE_FILL).half().float()  # what the store holds
        if self.spec is None:
            return out_image, None
        if loaded.label is None:
            return out_image, torch.zeros((rows, cols), dtype=torch.int64)
        return out_image, _outside(mask_to_lattice(loaded.label[:, :, k], axes, part), region, part, 0)

    def __getitem__(self, key: int | Request) -> dict[str, Any]:
        index, window, seed = (key, 0, 0) if isinstance(key, (int, np.integer)) else key
        index, window, seed = int(index), int(window), int(seed)
        if not (self.skip_bad and window):
            return self.sample(index, window, seed)
        for _ in range(len(self.files)):
            number = int(self.case_of[index])
            if number not in self.bad:
                try:
                    return self.sample(index, window, seed)
                except DatasetError as error:
                    self.bad[number] = str(error)
                    warnings.warn(f"{self.name}: skipped case {self.files[number].case_id!r} while training "
                                  f"(skip_bad_cases=True): {error}", stacklevel=2)  # fmt: skip
            index = self._in_next_case(index)
        raise DatasetError(f"{self.name}: every training case failed to load, e.g. {next(iter(self.bad.values()))}")

    def _in_next_case(self, index: int) -> int:
        """The slice at the same height (modulo its depth) in the case after ``index``'s, cyclically."""
        number = (int(self.case_of[index]) + 1) % len(self.files)
        first = int(np.searchsorted(self.case_of, number))
        depth = int(np.searchsorted(self.case_of, number, side="right")) - first
        return first + int(self.slice_of[index]) % depth

    def sample(self, index: int, window: int, seed: int) -> dict[str, Any]:
        """Slice ``index`` whole (``window`` 0) or a ``window`` crop of it placed (and augmented) by ``seed``."""
        number, k = int(self.case_of[index]), int(self.slice_of[index])
        modality, region, box = self.layout(number)
        sample: dict[str, Any] = {
            "case_id": self.files[number].case_id,
            "slice_index": k,
            "region": region.as_tensor(),
            "box": torch.tensor(box),
            "seed": seed,
        }
        crop = None
        augment = False
        native: LoadedCase | None = None
        if not window:
            image, mask = self.lattice(number, k, region)
            if self.spec is not None:  # a whole slice to score: its label and image on the scan's own grid
                native = self.case(number)  # read already, unless the slices come from a store
        else:
            rng = np.random.default_rng(seed)
            centred = self.spec is not None and rng.random() < self.foreground_share
            # Only a window centred on an organ needs the whole slice's mask (to pick the organ pixel).
            foreground = self.lattice(number, k, region, image=False)[1] if centred else None
            top, left = window_offsets(region.size, window, rng, foreground, self.centre_short)
            crop = (window, top, left)
            image, mask = self.lattice(number, k, region, top, left, (window, window))
            augment = self.augment and mask is not None
            if augment and mask is not None and image is not None:
                transform = self.transform(window)
                transform.set_random_state(seed=seed)  # the sample's own draw: workers and resumes agree
                out = transform({"image": image, "mask": mask[None].float()})
                image = _plain(out["image"]).float().clamp_(-1.0, 1.0)
                mask = _plain(out["mask"])[0].round().long()
        assert image is not None
        sample["image"] = image.contiguous()
        sample["nonfinite"] = self.replaced(number)
        if mask is None:
            sample["cache_key"] = ""
            return sample
        sample["mask"] = mask.contiguous()
        sample["labelled"] = self.labelled[number].clone()
        sample["cache_key"] = "" if augment else self.cache_key(index, region, modality, crop)
        if native is not None:
            shape = native.volume.array.shape[:2]
            label = native.label[:, :, k] if native.label is not None else np.zeros(shape, np.uint8)
            sample["native_label"] = torch.from_numpy(np.ascontiguousarray(label))
            sample["native_image"] = torch.from_numpy(native.image_slice(k, self.intensity))
        return sample


def _axes(loaded: LoadedCase) -> Axes:
    geometry = loaded.volume.geometry
    return Axes.of(geometry.canonical_affine, geometry.canonical_shape)


def _outside(values: torch.Tensor, region: Region, part: Region, fill: float) -> torch.Tensor:
    """``values`` on ``part`` of the lattice with the pixels outside ``region`` set to ``fill`` (a window reaching
    past the body box is padded, as a crop of the whole slice would be)."""
    top, bottom = max(0, region.x0 - part.x0), max(0, part.x1 - region.x1)
    left, right = max(0, region.y0 - part.y0), max(0, part.y1 - region.y1)
    if top or bottom or left or right:
        rows, cols = part.size
        values[..., : min(top, rows), :] = fill
        values[..., rows - min(bottom, rows) :, :] = fill
        values[..., :, : min(left, cols)] = fill
        values[..., :, cols - min(right, cols) :] = fill
    return values


def _cut(array: np.ndarray, top: int, left: int, rows: int, cols: int, fill: float) -> torch.Tensor:
    """The ``rows x cols`` rectangle of a stored slice (a memory map) from ``(top, left)``, ``fill`` outside; only
    its rows inside the slice are read."""
    height, width = array.shape
    y0, y1, x0, x1 = max(0, top), max(0, min(height, top + rows)), max(0, left), max(0, min(width, left + cols))
    inside = torch.from_numpy(np.array(array[y0:y1, x0:x1]))
    return crop_window(inside, top - y0, left - x0, (rows, cols), fill)


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor from MONAI's MetaTensor (whose metadata would otherwise ride into the batch)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
