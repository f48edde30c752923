"""The slice dataset: a flat index over (case, axial slice), volumes read on demand in the worker."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from delinea.datamodules.transforms import augmentation
from delinea.datamodules.utils import CaseFiles, Intensity, LabelSpec, LoadedCase, load_case_files, resize_image, resize_mask
from delinea.labels import NUM_CLASSES


class SliceDataset(Dataset):
    """Axial slices of a list of cases, read lazily, normalised, resized and optionally augmented.

    The index is two small integer arrays (case number and slice number per sample), so it costs a few bytes
    per slice whatever the dataset size. Each worker keeps the ``cache_cases`` most recently read volumes
    (stored dtype, memory-mapped for ``.nii``) and normalises only the slices it serves.

    ``dataset[i]`` serves slice ``i`` at the first resolution; ``dataset[(i, r)]`` at resolution ``r`` (what
    :class:`~delinea.datamodules.samplers.SliceBatchSampler` yields).

    Args:
        name: dataset name (part of the cache key).
        root: dataset root (part of the cache key).
        cases: the cases, each with its number of axial slices.
        spec: label mapping, or None for unlabelled data (predict).
        labelled: per-case class masks, bool (n_cases, 9).
        intensity: intensity normalisation.
        resolutions: served resolutions; the first is the default.
        augment: apply random training augmentation (and leave ``cache_key`` empty).
        foreground: per-sample foreground flags, if known.
        cache_cases: volumes kept per worker.
        ignore_unknown_labels: map unknown label ids to background instead of raising.
        affine_tolerance: image/label affine tolerance in mm.
    """

    def __init__(
        self,
        name: str,
        root: str,
        cases: Sequence[tuple[CaseFiles, int]],
        spec: LabelSpec | None,
        labelled: np.ndarray,
        intensity: Intensity,
        resolutions: Sequence[int],
        augment: bool = False,
        foreground: np.ndarray | None = None,
        cache_cases: int = 4,
        ignore_unknown_labels: bool = False,
        affine_tolerance: float = 1e-3,
    ) -> None:
        self.name = name
        self.root = root
        self.files = [files for files, _ in cases]
        counts = np.array([n for _, n in cases], dtype=np.int64)
        self.case_of = np.repeat(np.arange(len(cases), dtype=np.int32), counts)
        self.slice_of = np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if len(cases) else np.zeros(0, np.int32)
        self.spec = spec
        self.labelled = torch.as_tensor(np.asarray(labelled, dtype=bool).reshape(len(cases), NUM_CLASSES))
        self.intensity = intensity
        self.resolutions = [int(r) for r in resolutions]
        self.augment = augment
        self.foreground = foreground
        self.cache_cases = max(1, int(cache_cases))
        self.ignore_unknown_labels = ignore_unknown_labels
        self.affine_tolerance = affine_tolerance
        self._stat = [files.stat_key() for files in self.files]
        self._transforms: dict[int, Any] = {}
        self._cache: OrderedDict[int, LoadedCase] = OrderedDict()

    def __len__(self) -> int:
        return len(self.case_of)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # workers start empty; never ship volumes between processes
        return state

    def case(self, number: int) -> LoadedCase:
        """The loaded case ``number``, from this process's LRU cache or disk."""
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        loaded = load_case_files(
            self.files[number], self.spec, self.intensity, self.ignore_unknown_labels, self.affine_tolerance
        )
        self._cache[number] = loaded
        while len(self._cache) > self.cache_cases:
            self._cache.popitem(last=False)
        return loaded

    def transform(self, resolution: int) -> Any:
        """The augmentation pipeline for ``resolution`` (built once per process)."""
        if resolution not in self._transforms:
            self._transforms[resolution] = augmentation(resolution)
            # MONAI's random state is per object: seed it per worker, or every worker draws the same warps.
            info = get_worker_info()
            seed = info.seed if info is not None else torch.initial_seed()
            self._transforms[resolution].set_random_state(seed=(seed + resolution) % 2**32)
        return self._transforms[resolution]

    def cache_key(self, index: int, resolution: int, modality: str) -> str:
        """SHA-1 of everything that determines the preprocessed slice: dataset, root, case, its files' sizes
        and times, slice, resolution, modality and normalisation."""
        number = int(self.case_of[index])
        text = "|".join(
            [
                "v1",
                self.name,
                self.root,
                self.files[number].case_id,
                self._stat[number],
                str(int(self.slice_of[index])),
                str(resolution),
                self.intensity.key(modality),
            ]
        )
        return hashlib.sha1(text.encode()).hexdigest()

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, resolution = (key if isinstance(key, tuple) else (key, self.resolutions[0]))
        index, resolution = int(index), int(resolution)
        number, k = int(self.case_of[index]), int(self.slice_of[index])
        loaded = self.case(number)
        image = resize_image(torch.from_numpy(loaded.image_slice(k, self.intensity))[None], resolution)  # (1, H, W)
        sample: dict[str, Any] = {"case_id": loaded.files.case_id, "slice_index": k}
        if self.spec is None:
            sample["image"] = image.contiguous()
            sample["cache_key"] = ""
            return sample
        if loaded.label is not None:
            mask = resize_mask(loaded.label[:, :, k].astype(np.int64), resolution)
        else:
            mask = torch.zeros(resolution, resolution, dtype=torch.int64)
        if self.augment:
            out = self.transform(resolution)({"image": image, "mask": mask[None].float()})
            image = _plain(out["image"]).float().clamp_(-1.0, 1.0)
            mask = _plain(out["mask"])[0].round().long()
        sample["image"] = image.contiguous()
        sample["mask"] = mask
        sample["labelled"] = self.labelled[number].clone()
        sample["cache_key"] = "" if self.augment else self.cache_key(index, resolution, loaded.modality)
        return sample


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor from MONAI's MetaTensor (whose metadata would otherwise ride into the batch)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
