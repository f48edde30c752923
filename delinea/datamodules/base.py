"""The base of every delinea datamodule: its cases, their checks, the plan it is given, and its loaders.

A datamodule serves 2D axial slices of 3D CT/MRI volumes at the plan's spacing, in the batches of
:mod:`delinea.datamodules.batches`; it does not decide the plan, it states what its options and files say about it
(:meth:`MedSegDataModule.plan_request`) and serves the plan it is given (:meth:`MedSegDataModule.use_plan`), which
:func:`delinea.geometry.resolve_plan` chooses. Labelled datasets (splits, fractions) build on it in
:mod:`delinea.datamodules.labelled`.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from delinea.datamodules.batches import MicroBatchPlan, give_plan
from delinea.datamodules.dataset import SliceDataset
from delinea.datamodules.index import CaseIndex
from delinea.datamodules.samplers import ResumableLoader, SliceBatchSampler, checked_cycle, micro_batch_plan
from delinea.datamodules.utils import CaseFiles, Intensity, LabelSpec, check_case, load_case_files
from delinea.errors import OptionError
from delinea.geometry import DEFAULT_WINDOW, Plan, PlanRequest, check_spacing, check_windows
from delinea.io import DatasetError, Geometry, read_geometry
from delinea.labels import NUM_CLASSES

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Case:
    """One whole case in canonical RAS+ orientation, for 3D evaluation and for writing predictions.

    Attributes:
        case_id: the case's id.
        image: normalised image, float32 (X, Y, Z) in [-1, 1].
        label: unified ids, uint8 (X, Y, Z), or None when unlabelled.
        labelled: classes the label annotates, bool (9,).
        spacing: voxel size in mm in the canonical axis order.
        geometry: original/canonical affines and shapes; ``geometry.to_original(pred)`` and
            ``geometry.original_affine`` write a prediction on the input's grid (:func:`delinea.io.save_nifti`).
        modality: ``'ct'`` or ``'mr'``.
        path: the image file or DICOM folder.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    labelled: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    modality: str
    path: Path


class MedSegDataModule(LightningDataModule, ABC):
    """Common base of every delinea datamodule: slices at the plan's spacing, loaders and whole-case access.

    Args:
        resolution: training window size in pixels; a list alternates between training batches. None: the
            window of the model's plan (a checkpoint or ``init_from``), else 256. At evaluation an explicit value
            is the sliding window (the model's plan window otherwise).
        batch_size: slices per batch (of one window size; batches alternate between ``resolution``'s sizes).
        micro_batch_size: slices per loader batch, per window size (``{256: 32, 512: 8}``) or for all: each batch
            is served in ``batch_size / micro_batch_size`` micro-batches, which the Trainer's
            ``accumulate_grad_batches`` (counted in micro-batches, a whole number of resolution cycles) sums into
            optimiser steps of constant composition, each micro-batch's loss weighted by its share of the
            step's samples. None: whole batches. See :class:`~delinea.datamodules.samplers.SliceBatchSampler`.
        num_workers: loader worker processes.
        window: CT window in HU mapped to [-1, 1].
        percentiles: MRI percentiles per volume mapped to [-1, 1].
        cache_cases: volumes each worker keeps in memory (and cases per training shuffle block).
        affine_tolerance: allowed difference in mm between image and label affines.
        spacing: in-plane target spacing in mm per pixel for every modality. None: the model's plan, else the
            plan file, else the median of the training cases. It must agree with a checkpoint's plan at
            evaluation.
        plan_file: a plan JSON to read (or, when fitting without one, where to write the computed plan).
        foreground_share: share of training windows centred on a labelled pixel.
        centre_short: a slice shorter than the training window along an axis lies centred in it, where inference
            puts it (fixed windows: no translation to learn, and latent-cache keys that repeat), instead of
            anywhere in the slack (a random translation).
        body_margin: for a new plan, the margin in mm around each case's body box that slices are cut to; None
            keeps whole slices. A model's plan keeps its own.
    """

    #: Short dataset name (the CLI name and part of split file names and cache keys).
    name: ClassVar[str] = ""
    #: NaN or infinite image voxels: refused in training and evaluation data (``replace``: scans to predict).
    nonfinite: ClassVar[Literal["refuse", "replace"]] = "refuse"

    def __init__(
        self,
        resolution: int | list[int] | None = None,
        batch_size: int = 8,
        micro_batch_size: int | dict[int, int] | None = None,
        num_workers: int = 0,
        window: tuple[float, float] = (-175.0, 250.0),
        percentiles: tuple[float, float] = (0.5, 99.5),
        cache_cases: int = 4,
        affine_tolerance: float = 1e-3,
        spacing: float | None = None,
        plan_file: str | None = None,
        foreground_share: float = 0.33,
        centre_short: bool = False,
        body_margin: float | None = 10.0,
    ) -> None:
        super().__init__()
        self.resolutions = None if resolution is None else list(check_windows(resolution, "resolution"))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise OptionError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if len(window) != 2 or not window[0] < window[1]:
            raise OptionError(f"window must be (low, high) with low < high, got {window!r}")
        if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise OptionError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}")
        if cache_cases < 1:
            raise OptionError(f"cache_cases must be at least 1, got {cache_cases}")
        if not 0 <= foreground_share <= 1:
            raise OptionError(f"foreground_share must be in [0, 1], got {foreground_share}")
        if body_margin is not None and not 0 <= body_margin < 1000:
            raise OptionError(f"body_margin must be a non-negative number of mm or None, got {body_margin}")
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        if micro_batch_size is not None:  # sizes that do not divide batch_size fail now, missing windows when loading
            checked_cycle(
                batch_size, micro_batch_size, list(micro_batch_size) if isinstance(micro_batch_size, dict) else [0]
            )
        self.num_workers = num_workers
        self.intensity = Intensity((float(window[0]), float(window[1])), (float(percentiles[0]), float(percentiles[1])))
        self.cache_cases = cache_cases
        self.affine_tolerance = affine_tolerance
        self.spacing = None if spacing is None else check_spacing(spacing)
        self.plan_file = None if plan_file is None else Path(plan_file).expanduser()
        self.foreground_share = float(foreground_share)
        self.centre_short = bool(centre_short)
        self.body_margin = body_margin
        #: The geometry every loader serves, given before the first loader (:meth:`use_plan`).
        self.plan: Plan | None = None
        self.skipped_cases: dict[str, str] = {}
        self._files: dict[str, CaseFiles] | None = None
        self._datasets: dict[str, SliceDataset] = {}
        self._case_index: CaseIndex | None = None
        self._geometries: dict[str, Geometry] = {}

    # -- what a dataset defines ----------------------------------------------------------------------------
    @abstractmethod
    def discover(self) -> list[CaseFiles]:
        """List the dataset's cases from its on-disk layout (directory listing only, no reading)."""

    @property
    def label_spec(self) -> LabelSpec | None:
        """How label files map to unified ids; None for unlabelled data."""
        return None

    @property
    def root_string(self) -> str:
        """The data location, as it enters cache keys."""
        return ""

    # -- cases ---------------------------------------------------------------------------------------------
    @property
    def files(self) -> dict[str, CaseFiles]:
        """Every discovered case by id (discovered once)."""
        if self._files is None:
            found = self.discover()
            ids = [f.case_id for f in found]
            if len(set(ids)) != len(ids):
                duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
                raise DatasetError(f"{self.name}: duplicate case ids {duplicates[:10]} in {self.root_string}")
            self._files = {f.case_id: f for f in found}
        return self._files

    def _case_files(self, case_id: str) -> CaseFiles:
        if case_id not in self.files:
            raise KeyError(
                f"{self.name}: no case {case_id!r} (have {len(self.files)} cases, e.g. {list(self.files)[:5]})"
            )
        return self.files[case_id]

    def load_case(self, case_id: str) -> Case:
        """Read one whole case, canonical and normalised, with its unified label and geometry.

        Raises:
            KeyError: unknown ``case_id``.
            DatasetError: the case's files are missing, corrupt or inconsistent.
        """
        files = self._case_files(case_id)
        check_case(files, needs_label=False, atol=self.affine_tolerance)
        loaded = load_case_files(
            files, self.label_spec, self.intensity, self._ignore_unknown, self.affine_tolerance, self.nonfinite
        )
        geometry = loaded.volume.geometry
        return Case(
            case_id=case_id,
            image=loaded.image(self.intensity),
            label=loaded.label,
            labelled=self._labelled(files),
            spacing=geometry.spacing,
            geometry=geometry,
            modality=loaded.modality,
            path=files.image,
        )

    def case_geometry(self, case_id: str) -> Geometry:
        """A case's geometry from its image header (read once; no voxel data)."""
        if case_id not in self._geometries:
            self._geometries[case_id] = read_geometry(self._case_files(case_id).image)
        return self._geometries[case_id]

    def case_path(self, case_id: str) -> Path:
        """The image file or DICOM folder of a case."""
        return self._case_files(case_id).image

    @property
    def _ignore_unknown(self) -> bool:
        return False

    def _labelled(self, files: CaseFiles) -> np.ndarray:
        spec = self.label_spec
        return np.array(spec.labelled if spec is not None else (False,) * NUM_CLASSES, dtype=bool)

    def _checked(
        self, ids: Sequence[str], needs_label: bool, skip: bool, foreground: bool = False
    ) -> tuple[list[tuple[CaseFiles, int]], np.ndarray | None]:
        """Check cases from their headers (and, with ``foreground``, their labels) through the case index.

        Returns:
            (files, number of axial slices) of the good cases, and with ``foreground`` the per-slice
            foreground flags of those cases concatenated.

        Raises:
            DatasetError: for the first bad case, unless ``skip`` (then it is recorded in ``skipped_cases``).
        """
        files = [self.files[i] for i in ids]
        entries = self._inspect(files, needs_label, foreground)
        good, bad, flags = [], {}, []
        for f in files:
            entry = entries[f.case_id]
            if entry["error"] is not None:
                if not skip:
                    raise DatasetError(entry["error"])
                bad[f.case_id] = entry["error"]
                continue
            good.append((f, entry["slices"]))
            if foreground:
                flag = np.zeros(entry["slices"], dtype=bool)
                flag[entry["foreground"]] = True
                flags.append(flag)
        self._record_skipped(bad)
        return good, (np.concatenate(flags) if flags else np.zeros(0, bool)) if foreground else None

    def _inspect(
        self, files: Sequence[CaseFiles], needs_label: bool, foreground: bool = False, modality: bool = False
    ) -> dict[str, dict]:
        # With skip_bad_cases every case is also read whole once (cached in the index), so cases whose data or
        # labels are bad are left out before training rather than met by the loader.
        return self._index.inspect(
            files, needs_label, self.label_spec, foreground, self.affine_tolerance, self._ignore_unknown,
            threads=max(1, self.num_workers), verify=self._skip_bad, nonfinite=self.nonfinite, modality=modality,
        )  # fmt: skip

    @property
    def _index(self) -> CaseIndex:
        if self._case_index is None:
            self._case_index = CaseIndex(self._index_path())
        return self._case_index

    def _index_path(self) -> Path | None:
        return None

    def _record_skipped(self, bad: dict[str, str]) -> None:
        new = {k: v for k, v in bad.items() if k not in self.skipped_cases}
        if new:
            self.skipped_cases.update(new)
            lines = "\n".join(f"  {k}: {v}" for k, v in new.items())
            message = f"{self.name}: skipped {len(new)} bad case(s) (skip_bad_cases=True):\n{lines}"
            log.warning(message)
            warnings.warn(message, stacklevel=3)

    # -- the plan ------------------------------------------------------------------------------------------
    def _default_plan_file(self) -> Path | None:
        """Where a computed plan is written and read back: beside the split file (labelled datasets)."""
        return None

    def _planning_cases(self) -> list[CaseFiles]:
        """The cases whose median spacing makes a new plan (the training split)."""
        return []

    def _case_spacings(self) -> dict[str, list[float]]:
        """The planning cases' in-plane spacings per modality, from the case index."""
        spacings: dict[str, list[float]] = {}
        for entry in self._inspect(self._planning_cases(), needs_label=False, modality=True).values():
            if entry["error"] is None and entry.get("spacing"):
                spacings.setdefault(entry["modality"], []).extend(entry["spacing"])
        return spacings

    def plan_request(self) -> PlanRequest:
        """What this datamodule's options (``spacing``, ``plan_file``, ``resolution``, ``body_margin``) and files
        (the plan file beside the split, the training cases) say about the plan; :func:`~delinea.geometry.resolve_plan`
        decides with the model's plan. The cases are discovered first, so that a bad input is reported before
        anything about the plan."""
        _ = self.files
        return PlanRequest(
            dataset=self.name,
            spacing=self.spacing,
            plan_file=self.plan_file,
            resolutions=tuple(self.resolutions) if self.resolutions is not None else None,
            body_margin=self.body_margin,
            default_plan_file=self._default_plan_file(),
            case_spacings=self._case_spacings if self._planning_cases() else None,
        )

    def use_plan(self, plan: Plan) -> None:
        """Serve every loader at ``plan`` (given by the task when fitting, by the Segmenter when evaluating)."""
        self.plan = plan

    def _planned(self, dataset: SliceDataset, stage: str) -> SliceDataset:
        if self.plan is None:  # used on its own, without a model: the plan its options and files give
            give_plan(self, None, stage)
        dataset.plan = self.plan
        return dataset

    # -- datasets and loaders ------------------------------------------------------------------------------
    def _dataset(
        self, cases: list[tuple[CaseFiles, int]], augment: bool = False, foreground: np.ndarray | None = None
    ) -> SliceDataset:
        return SliceDataset(
            name=self.name,
            root=self.root_string,
            cases=cases,
            spec=self.label_spec,
            labelled=np.stack([self._labelled(f) for f, _ in cases]) if cases else np.zeros((0, NUM_CLASSES), bool),
            intensity=self.intensity,
            augment=augment,
            foreground=foreground,
            foreground_share=self.foreground_share,
            centre_short=self.centre_short,
            cache_cases=self.cache_cases,
            ignore_unknown_labels=self._ignore_unknown,
            affine_tolerance=self.affine_tolerance,
            nonfinite=self.nonfinite,
            skip_bad=self._skip_bad,
        )

    @property
    def _skip_bad(self) -> bool:
        return False

    def _training_windows(self) -> list[int]:
        return list(self.plan.window) if self.plan is not None else (self.resolutions or [DEFAULT_WINDOW])

    def micro_batch_plan(self, accumulate: int = 1) -> MicroBatchPlan | None:
        """The training resolution cycle as (window, micro-batch) pairs and each window's loss weight; None without
        ``micro_batch_size`` (:func:`~delinea.datamodules.samplers.micro_batch_plan`).

        Raises:
            OptionError: ``accumulate`` (the Trainer's ``accumulate_grad_batches``) is no whole number of cycles.
        """
        return micro_batch_plan(self.batch_size, self.micro_batch_size, self._training_windows(), accumulate)

    def _loader(
        self, dataset: SliceDataset, train: bool, seed: int = 0, empty_slice_ratio: float | None = None
    ) -> DataLoader:
        accumulate = int(getattr(self._trainer_or_none(), "accumulate_grad_batches", 1) or 1)
        plan = self.micro_batch_plan(accumulate) if train else None
        micro = {window: size for window, size in plan[0]} if plan is not None else None
        sampler = SliceBatchSampler(
            None,
            self.batch_size,
            False,
            case_of=dataset.case_of,
            foreground=dataset.foreground,
            resolutions=self.plan.window if self.plan is not None else (DEFAULT_WINDOW,),
            shuffle=train,
            seed=seed,
            empty_slice_ratio=empty_slice_ratio if train else None,
            block_cases=self.cache_cases,
            lanes=max(1, self.num_workers),
            micro_batch_sizes=micro,
            accumulate=accumulate if micro is not None else 1,
        )
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _trainer_or_none(self) -> Any:
        try:
            return self.trainer
        except RuntimeError:
            return None

    def predict_cases(self) -> list[str]:
        """The case ids ``predict`` writes, in loader order."""
        return self._cases_of("predict")

    def _cases_of(self, split: str) -> list[str]:
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        dataset = self._datasets.get(split)
        return [] if dataset is None else [f.case_id for f in dataset.files]
