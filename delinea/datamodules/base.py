"""Base datamodules: 2D axial slices of 3D CT/MRI volumes at the plan's spacing, the batch contract every task
relies on.

Batch contract (train, val, test; predict carries ``image``, ``case_id``, ``slice_index``, ``cache_key``)::

    image        float32 (B, 1, H, W)  in [-1, 1]  (CT: HU window; MRI: per-volume 0.5-99.5 percentiles)
    mask         int64   (B, H, W)     unified organ ids 0..8 (delinea.labels.ORGANS)
    labelled     bool    (B, 9)        classes the source annotates (background False in single-organ sets)
    case_id      list[str]
    slice_index  int64   (B,)          axial index k in the canonical volume
    cache_key    list[str]             SHA-1 naming the served tensor; "" when augmented (never cache)
    seed         int64   (B,)          the sample's draw (crop, augmentation); a task's training noise derives
                                       from it, so a resumed run draws the same; 0 at evaluation

Slice ``k`` is ``canonical[:, :, k]`` of the RAS+ volume (H along x = towards patient right, W along
y = anterior), resampled in-plane to the plan's spacing (:mod:`delinea.datamodules.plan`). Training batches
are ``window x window`` crops of it; validation, test and predict batches are whole resampled slices, one case
per batch (case by case with slices ascending; with loader workers, each worker's run of cases, interleaved:
:class:`~delinea.datamodules.samplers.SliceBatchSampler`), so a task can cover them with windows, stack them into
volumes on each case's own grid (:meth:`MedSegDataModule.case_geometry`) and score them against
:meth:`MedSegDataModule.load_label`; each rank gets whole cases.
"""

from __future__ import annotations

import logging
import os
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

from delinea.datamodules.dataset import SliceDataset
from delinea.datamodules.index import CaseIndex
from delinea.datamodules.plan import Plan, check_spacing, check_windows
from delinea.datamodules.samplers import ResumableLoader, SliceBatchSampler, describe_cycle, micro_batch_cycle
from delinea.datamodules.splits import default_split_path, load_or_create_split, take_fraction
from delinea.datamodules.store import SliceStore, store_settings
from delinea.datamodules.utils import (
    CaseFiles,
    Intensity,
    LabelSpec,
    check_case,
    load_case_files,
    read_label,
)
from delinea.errors import OptionError
from delinea.io import DatasetError, Geometry, is_nifti, nifti_stem, read_geometry
from delinea.labels import NUM_CLASSES

#: Training windows when neither the datamodule nor a model's plan names one.
DEFAULT_WINDOW = 256

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
            self._micro(list(micro_batch_size) if isinstance(micro_batch_size, dict) else [0])
        self.num_workers = num_workers
        self.intensity = Intensity((float(window[0]), float(window[1])), (float(percentiles[0]), float(percentiles[1])))
        self.cache_cases = cache_cases
        self.affine_tolerance = affine_tolerance
        self.spacing = None if spacing is None else check_spacing(spacing)
        self.plan_file = None if plan_file is None else Path(plan_file).expanduser()
        self.foreground_share = float(foreground_share)
        self.centre_short = bool(centre_short)
        self.body_margin = body_margin
        #: The geometry every loader serves; resolved once, before the first loader (:meth:`plan_for`).
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

    def load_label(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """A case's canonical unified label (uint8, X Y Z) and the classes it annotates (bool (9,)); the image
        is not read.

        Raises:
            DatasetError: the case has no label, or its label file is bad.
        """
        files = self._case_files(case_id)
        spec = self.label_spec
        if spec is None or not files.has_label:
            raise DatasetError(f"case {case_id!r} ({files.image}) has no label to evaluate against")
        label = read_label(files, spec, self.case_geometry(case_id), self._ignore_unknown, self.affine_tolerance)
        return label, self._labelled(files)

    def load_image(self, case_id: str) -> np.ndarray:
        """A case's whole canonical image normalised to [-1, 1] (float32, X Y Z), e.g. for overlay figures."""
        loaded = load_case_files(
            self._case_files(case_id), None, self.intensity, atol=self.affine_tolerance, nonfinite=self.nonfinite
        )
        return loaded.image(self.intensity)

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

    def _inspect(self, files: Sequence[CaseFiles], needs_label: bool, foreground: bool = False) -> dict[str, dict]:
        # With skip_bad_cases every case is also read whole once (cached in the index), so cases whose data or
        # labels are bad are left out before training rather than met by the loader.
        return self._index.inspect(
            files, needs_label, self.label_spec, foreground, self.affine_tolerance, self._ignore_unknown,
            threads=max(1, self.num_workers), verify=self._skip_bad, nonfinite=self.nonfinite,
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

    def _windows(self, fallback: Plan | None) -> tuple[int, ...]:
        if self.resolutions is not None:
            return tuple(self.resolutions)
        return fallback.window if fallback is not None else (DEFAULT_WINDOW,)

    def _explicit_plan(self, fallback: Plan | None) -> Plan | None:
        """The plan the user named: ``spacing``, else ``plan_file``; None if neither."""
        if self.spacing is not None:
            return Plan.uniform(self.spacing, self._windows(fallback), "explicit spacing", self.body_margin)
        if self.plan_file is not None and self.plan_file.exists():
            plan = Plan.load(self.plan_file)
            return plan.with_window(self.resolutions) if self.resolutions is not None else plan
        return None

    def _computed_plan(self) -> Plan:
        """The median in-plane spacing of the training cases, per modality, from the case index."""
        spacings: dict[str, list[float]] = {}
        for entry in self._inspect(self._planning_cases(), needs_label=False).values():
            if entry["error"] is None and entry.get("spacing"):
                spacings.setdefault(entry["modality"], []).extend(entry["spacing"])
        return Plan.from_cases(spacings, self._windows(None), self.body_margin)

    def plan_for(self, model_plan: Plan | None, stage: str) -> Plan:
        """Resolve and keep the plan every loader serves, given the model's own plan (or None).

        Fitting: explicit ``spacing`` or ``plan_file``, else the model's plan (a resumed run, or ``init_from``:
        fine-tuning keeps its parent's geometry), else the plan file beside the split, else the median of the
        training cases, written beside the split. Evaluation: the model's plan; an explicit spacing or plan file
        that disagrees with it is an error, since a model only knows its own pixel scale.

        Raises:
            DatasetError: an explicit plan disagrees with the model's at evaluation, or a plan file is bad.
        """
        explicit = self._explicit_plan(model_plan)
        if stage != "fit" and model_plan is not None:
            if explicit is not None and not explicit.same_geometry(model_plan):
                where = f"spacing={self.spacing}" if self.spacing is not None else f"plan_file {self.plan_file}"
                raise DatasetError(
                    f"{self.name}: {where} ({explicit.describe()}) disagrees with the model's plan "
                    f"({model_plan.describe()}); a model segments at the spacing it was trained at: drop the option"
                )
            plan = model_plan.with_window(self.resolutions) if self.resolutions is not None else model_plan
        elif explicit is not None:
            plan = explicit
        elif model_plan is not None:
            plan = model_plan.with_window(self.resolutions) if self.resolutions is not None else model_plan
        else:
            target = self.plan_file or self._default_plan_file()
            if target is not None and target.exists():
                plan = Plan.load(target)
                plan = plan.with_window(self.resolutions) if self.resolutions is not None else plan
            else:
                if not self._planning_cases():
                    raise DatasetError(
                        f"{self.name}: no model plan and no training cases to plan a spacing from; "
                        "pass spacing=... (mm per pixel) or predict with a checkpoint"
                    )
                plan = self._computed_plan()
                if target is not None:
                    plan.save(target)
            if stage != "fit":
                warnings.warn(f"{self.name}: the model carries no plan; evaluating at {plan.describe()}", stacklevel=2)
        self.plan = plan
        log.info("%s: plan %s", self.name, plan.describe())
        return plan

    def _model_plan(self) -> Plan | None:
        """The attached model's plan (a delinea task's ``plan`` attribute), if any."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        plan = getattr(module, "plan", None)
        return plan if isinstance(plan, Plan) else None

    def _planned(self, dataset: SliceDataset, stage: str) -> SliceDataset:
        if self.plan is None:
            self.plan_for(self._model_plan(), stage)
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

    def _micro(self, windows: Sequence[int]) -> dict[int, int]:
        """Micro-batch size per training window, checked against ``batch_size``."""
        micro = self.micro_batch_size
        sizes = (
            {int(w): int(micro) for w in windows}
            if isinstance(micro, int)
            else {int(k): int(v) for k, v in (micro or {}).items()}
        )
        try:
            micro_batch_cycle(self.batch_size, windows, sizes)
        except ValueError as error:
            raise OptionError(str(error)) from None
        return sizes

    def micro_batch_plan(self, accumulate: int = 1) -> tuple[list[tuple[int, int]], dict[int, float]] | None:
        """The training resolution cycle as (window, micro-batch) pairs and each window's loss weight (its
        micro-batch over the step's mean micro-batch, so every sample of a step weighs the same); None without
        ``micro_batch_size``.

        Raises:
            OptionError: ``accumulate`` (the Trainer's ``accumulate_grad_batches``) is no whole number of cycles.
        """
        if self.micro_batch_size is None:
            return None
        windows = list(self.plan.window) if self.plan is not None else (self.resolutions or [DEFAULT_WINDOW])
        cycle = micro_batch_cycle(self.batch_size, windows, self._micro(windows))
        if accumulate % len(cycle):
            cycles = max(1, -(-accumulate // len(windows)))  # reading the value as batches of batch_size
            raise OptionError(
                f"trainer.accumulate_grad_batches {accumulate} counts micro-batches and must be a whole number of "
                f"resolution cycles ({describe_cycle(cycle)}: {len(cycle)} micro-batches), so that every optimiser "
                f"step holds the same slices of each size: e.g. {cycles * len(cycle)} for "
                f"{cycles * len(windows)} batches of {self.batch_size}"
            )
        mean = sum(size for _, size in cycle) / len(cycle)
        return cycle, {window: size / mean for window, size in cycle}

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


class LabelledDataModule(MedSegDataModule):
    """Base of the labelled datasets: discovery, seeded case-level splits, fractions, checks, the plan.

    Args:
        root: dataset folder; if None, ``$DELINEA_<NAME>_ROOT`` (e.g. ``DELINEA_BTCV_ROOT``), else
            ``$DELINEA_DATA/<name>``.
        fraction: share of the training cases used, in (0, 1]; a seeded, nested subset, at least one case.
        seed: seed of the split, the fraction and the training order.
        augment: random training augmentation (crop, affine, elastic, intensity; no left-right flip).
        empty_slice_ratio: share of training slices without foreground per epoch, in [0, 1); None keeps all.
            Needs one pass over the training labels at setup.
        split_file: JSON split to read, or to write if missing; default under ``$DELINEA_SPLIT_DIR`` or
            ``~/.cache/delinea/splits`` (see :mod:`delinea.datamodules.splits`). The computed plan is written
            beside it (``<split>.plan.json``).
        skip_bad_cases: skip cases with missing, unreadable or inconsistent files (warned, listed in
            ``skipped_cases``) instead of raising.
        ignore_unknown_labels: map label ids outside the dataset's table to background (warned) instead of
            raising.
        store: the slice store that ``delinea preprocess`` wrote (:mod:`delinea.datamodules.store`) to serve the
            slices from: a path, True for the one beside the split file (``<split>.store``) when it is there, False
            to read the source files. A store made for another plan, normalisation or label mapping, or from files
            that changed since, is refused.
        **kwargs: slices and loaders (resolution, batch_size, num_workers, spacing, ...): see
            :class:`MedSegDataModule`.
    """

    #: train:val:test ratios of a new split.
    ratios: ClassVar[tuple[float, float, float]] = (0.8, 0.1, 0.1)
    #: The expected layout, for error messages.
    layout: ClassVar[str] = ""

    def __init__(
        self,
        root: str | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        augment: bool = False,
        empty_slice_ratio: float | None = None,
        split_file: str | None = None,
        skip_bad_cases: bool = False,
        ignore_unknown_labels: bool = False,
        store: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 < fraction <= 1:
            raise OptionError(f"{self.name}: fraction must be in (0, 1], got {fraction}")
        if empty_slice_ratio is not None and not 0 <= empty_slice_ratio < 1:
            raise OptionError(f"{self.name}: empty_slice_ratio must be in [0, 1) or None, got {empty_slice_ratio}")
        self.root = self._resolve_root(root)
        self.fraction = fraction
        self.seed = seed
        self.augment = augment
        self.empty_slice_ratio = empty_slice_ratio
        self.split_file = Path(split_file) if split_file else default_split_path(self.name, self.root, seed)
        self.skip_bad_cases = skip_bad_cases
        self.ignore_unknown_labels = ignore_unknown_labels
        self.store: bool | str = (
            {"true": True, "false": False}.get(store.lower(), store) if isinstance(store, str) else store
        )
        self._split: dict[str, list[str]] | None = None
        self._stores_checked: set[int] = set()

    @classmethod
    def env_var(cls) -> str:
        """The environment variable read when ``root`` is not given."""
        return f"DELINEA_{cls.name.upper()}_ROOT"

    def _resolve_root(self, root: str | None) -> Path:
        if root is None:
            root = os.environ.get(self.env_var())
        if root is None and os.environ.get("DELINEA_DATA"):
            root = str(Path(os.environ["DELINEA_DATA"]) / self.name)
        if root is None:
            raise DatasetError(
                f"{self.name}: no root given; pass root=... or set {self.env_var()} (or DELINEA_DATA, "
                f"holding a '{self.name}' folder). Expected layout: {self.layout}"
            )
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DatasetError(f"{self.name}: root {path} is not a folder. Expected layout: {self.layout}")
        return path

    @property
    def root_string(self) -> str:
        return str(self.root.resolve())

    @property
    def _ignore_unknown(self) -> bool:
        return self.ignore_unknown_labels

    @property
    def _skip_bad(self) -> bool:
        return self.skip_bad_cases

    def include(self, files: CaseFiles) -> bool:
        """Whether a case takes part (modality or sequence filters); splits are made over all cases."""
        return True

    def _no_cases(self) -> DatasetError:
        return DatasetError(f"{self.name}: no cases found in {self.root}. Expected layout: {self.layout}")

    # -- splits --------------------------------------------------------------------------------------------
    @property
    def split(self) -> dict[str, list[str]]:
        """The train/val/test case ids over all cases (read from ``split_file``, or made and written there)."""
        if self._split is None:
            if not self.files:
                raise self._no_cases()
            meta = {"dataset": self.name, "root": self.root_string}
            self._split = load_or_create_split(self.split_file, list(self.files), self.ratios, self.seed, meta)
            listed = {c for cases in self._split.values() for c in cases}
            new = sorted(set(self.files) - listed)
            if new:
                warnings.warn(
                    f"{self.name}: {len(new)} case(s) in {self.root} are not in the split file {self.split_file} "
                    f"(added after it was written?), e.g. {new[:3]}; they are not used. To split again, delete the "
                    "split file or pass another split_file",
                    stacklevel=2,
                )
        return self._split

    def _split_ids(self, split: str, whole: bool = False) -> list[str]:
        """The split's case ids that take part; of the training split, the ``fraction`` unless ``whole``."""
        ids = [c for c in self.split.get(split, []) if self.include(self.files[c])]
        return take_fraction(ids, self.fraction) if split == "train" and ids and not whole else ids

    def _index_path(self) -> Path | None:
        return self.split_file.with_name(self.split_file.stem + ".cases.json")

    def _default_plan_file(self) -> Path | None:
        return self.split_file.with_name(self.split_file.stem + ".plan.json")

    def store_path(self) -> Path:
        """Where the slice store is read from (``store`` as a path), else beside the split file."""
        if isinstance(self.store, (str, Path)) and not isinstance(self.store, bool):
            return Path(self.store).expanduser()
        return self.split_file.with_name(self.split_file.stem + ".store")

    def store_settings(self) -> dict[str, Any]:
        """What the served pixels depend on besides the files (the plan's geometry, normalisation, labels)."""
        if self.plan is None:
            raise RuntimeError(f"{self.name}: the plan is resolved before the store is read or written")
        return store_settings(self.plan, self.intensity, self.label_spec, self._ignore_unknown)

    def _planned(self, dataset: SliceDataset, stage: str) -> SliceDataset:
        """The dataset with the plan set and, when there is a store to read, its slices served from the store."""
        dataset = super()._planned(dataset, stage)
        if id(dataset) in self._stores_checked or self.store is False:
            return dataset
        path = self.store_path()
        if not (path / "store.json").exists():
            if self.store is not True:
                raise DatasetError(
                    f"{self.name}: --data.store {path} holds no slice store; write it with `delinea preprocess` and "
                    "the same data options, or pass --data.store false to read the source files"
                )
        else:
            store, settings = SliceStore(path), self.store_settings()
            assert self.plan is not None  # resolved by _planned
            dataset.use_store(store, store.check(settings, self.plan, dataset.files, f"{self.name} cases"))
            log.info("%s: %d cases served from the slice store %s", self.name, len(dataset.files), path)
        self._stores_checked.add(id(dataset))
        return dataset

    def _planning_cases(self) -> list[CaseFiles]:
        # The whole training split (before ``fraction``), like nnU-Net's dataset fingerprint: few-shot subsets
        # of one dataset share one plan.
        return [self.files[c] for c in self.split["train"] if self.include(self.files[c])]

    def prepare_data(self) -> None:
        """Make the split file and inspect every case once per node (Lightning runs this on local rank 0
        before ``setup``, so the other ranks find the case index filled)."""
        for split in ("train", "val", "test"):
            foreground = split == "train" and self.empty_slice_ratio is not None
            files = [self.files[i] for i in self._split_ids(split)]
            self._inspect(files, True, foreground)

    def setup(self, stage: str) -> None:
        """Build the slice datasets that ``stage`` needs, checking every case (cached in the case index)."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}[stage]
        for split in wanted:
            if split in self._datasets:
                continue
            foreground = split == "train" and self.empty_slice_ratio is not None
            cases, flags = self._checked(self._split_ids(split), True, self.skip_bad_cases, foreground)
            self._datasets[split] = self._dataset(cases, augment=self.augment and split == "train", foreground=flags)
        if stage == "predict":
            self._datasets["predict"] = self._datasets["test"]

    # -- loaders -------------------------------------------------------------------------------------------
    def _get(self, split: str, stage: str) -> SliceDataset:
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "fit", "test": "test", "predict": "predict"}[split])
        dataset = self._datasets[split]
        if len(dataset.files) == 0:
            raise DatasetError(
                f"{self.name}: the {split} split has no cases (split file {self.split_file}); "
                "the dataset may be too small for this split or every case was filtered out"
            )
        return self._planned(dataset, stage)

    def dataset(self, split: str) -> SliceDataset:
        """The slice dataset of ``train``, ``val``, ``test`` or ``predict``, with the plan set (for inspection:
        ``dm.dataset("train")[(index, window, seed)]`` is one training sample)."""
        return self._get(split, "fit" if split in ("train", "val") else split)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, case-blocked training windows at alternating sizes."""
        dataset = self._get("train", "fit")
        return self._loader(dataset, train=True, seed=self.seed, empty_slice_ratio=self.empty_slice_ratio)

    def val_dataloader(self) -> DataLoader:
        """Every slice of the validation cases, whole, case by case, slices ascending."""
        stage = "fit" if self.trainer is not None and self.trainer.state.fn == "fit" else "validate"
        return self._loader(self._get("val", stage), train=False)

    def test_dataloader(self) -> DataLoader:
        """Every slice of the test cases, whole, case by case, slices ascending."""
        return self._loader(self._get("test", "test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        """The test slices (labelled datasets predict on their test split)."""
        return self._loader(self._get("predict", "predict"), train=False)

    def train_cases(self) -> list[str]:
        """Training case ids (after fraction, filters and skipping)."""
        return self._cases_of("train")

    def val_cases(self) -> list[str]:
        """Validation case ids in loader order."""
        return self._cases_of("val")

    def test_cases(self) -> list[str]:
        """Test case ids in loader order."""
        return self._cases_of("test")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, resolution={self.resolutions}, "
            f"spacing={self.spacing}, fraction={self.fraction}, seed={self.seed})"
        )

    __str__ = __repr__  # LightningDataModule's __str__ builds every dataloader


class SequenceDataModule(LabelledDataModule):
    """Base of the MR datasets that hold two sequences (T1, T2) as case ids ``t1_<stem>`` / ``t2_<stem>``.

    Args:
        root: the dataset folder.
        sequence: ``'t1'``, ``'t2'`` or ``'both'``; the split is made over both, then filtered.
        **kwargs: see :class:`LabelledDataModule`.
    """

    def __init__(self, root: str | None = None, sequence: Literal["t1", "t2", "both"] = "both", **kwargs: Any) -> None:
        if sequence not in ("t1", "t2", "both"):
            raise OptionError(f"{self.name}: sequence must be 't1', 't2' or 'both', got {sequence!r}")
        self.sequence = sequence
        super().__init__(root, **kwargs)

    def include(self, files: CaseFiles) -> bool:
        return self.sequence == "both" or files.case_id.startswith(self.sequence + "_")

    @abstractmethod
    def folders(self, sequence: str) -> list[tuple[Path, Path]]:
        """The (image folder, label folder) pairs that hold ``sequence``'s cases."""

    def discover(self) -> list[CaseFiles]:
        cases = []
        for sequence in ("t1", "t2"):
            for image_dir, label_dir in self.folders(sequence):
                images, labels = nifti_files(image_dir, strip="_0000"), nifti_files(label_dir)
                cases += [
                    CaseFiles(f"{sequence}_{case_id}", image, label, modality="mr")
                    for case_id, image, label in pair_by_id(images, labels, image_dir, label_dir)
                ]
        return cases


def pair_by_id(
    images: dict[str, Path],
    labels: dict[str, Path],
    image_dir: Path,
    label_dir: Path,
    image_name: str = "{}.nii.gz",
    label_name: str = "{}.nii.gz",
) -> list[tuple[str, Path, Path]]:
    """Pair image and label files by case id. A case with only one of the two gets the path the other should
    have (``<dir>/<name with the id>``, which does not exist), so checking the case reports exactly which file is
    missing."""
    return [
        (case_id, images.get(case_id, image_dir / image_name.format(case_id)),
         labels.get(case_id, label_dir / label_name.format(case_id)))
        for case_id in sorted(set(images) | set(labels))
    ]  # fmt: skip


def nifti_files(folder: Path, strip: str = "") -> dict[str, Path]:
    """NIfTI files of ``folder`` by stem (with ``strip`` removed from the end of the stem, e.g. ``_0000``).

    Raises:
        DatasetError: two files give one stem (``b.nii.gz`` and ``b_0000.nii.gz``, ``c.nii`` and ``c.nii.gz``):
            which one is the case cannot be guessed; or a folder has a NIfTI name.
    """
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() and is_nifti(path) and not path.name.startswith("."):
            raise DatasetError(f"{path}: a folder named like a NIfTI file; expected a .nii or .nii.gz file")
        if path.is_file() and is_nifti(path) and not path.name.startswith("."):
            stem = nifti_stem(path)
            if strip and stem.endswith(strip):
                stem = stem[: -len(strip)]
            if stem in out:
                raise DatasetError(
                    f"{folder}: {out[stem].name} and {path.name} are both case {stem!r}; remove or rename one"
                )
            out[stem] = path
    return out
