"""Labelled datasets: discovery in a published layout, seeded case-level splits, fractions, and the MR datasets
that hold two sequences."""

from __future__ import annotations

import logging
import os
import warnings
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch.utils.data import DataLoader

from delinea.datamodules.base import MedSegDataModule
from delinea.datamodules.dataset import SliceDataset
from delinea.datamodules.splits import default_split_path, load_or_create_split, take_fraction
from delinea.datamodules.store import SliceStore, store_settings
from delinea.datamodules.utils import CaseFiles
from delinea.errors import OptionError
from delinea.io import DatasetError, nifti_files, pair_by_id

log = logging.getLogger(__name__)


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
