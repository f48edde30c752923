"""Prediction on new scans: a NIfTI file, a folder of NIfTI files, or a DICOM series folder; no labels."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader

from delinea.datamodules.base import MedSegDataModule, nifti_files
from delinea.datamodules.utils import CaseFiles
from delinea.io import DatasetError, is_nifti, nifti_stem


class ScanDataModule(MedSegDataModule):
    """Slices of unlabelled scans for ``predict``, resampled to the model's plan; :meth:`case_geometry` gives
    each scan's grid for writing predictions back onto it.

    Predict batches carry ``image`` (B, 1, H, W), ``case_id``, ``slice_index`` and an empty ``cache_key``,
    case by case with slices ascending, one case per batch.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a folder of them, or a folder holding one DICOM series.
        modality: ``'ct'``, ``'mr'`` or ``'auto'`` (CT if the scan holds values below -500 HU).
        resolution: sliding window size; None: the model's.
        batch_size: slices per batch.
        num_workers: loader worker processes.
        window: CT window in HU.
        percentiles: MRI percentile window.
        cache_cases: volumes kept per worker.
        spacing: in-plane spacing in mm to resample to; None: the model's plan (given, it must agree).
        plan_file: a plan JSON (it must agree with the model's plan).
        body_margin: body crop margin in mm of a plan made here (with ``spacing``), or None; a model's plan keeps
            its own.
    """

    name = "scan"

    def __init__(
        self,
        path: str,
        modality: Literal["ct", "mr", "auto"] = "ct",
        resolution: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        window: tuple[float, float] = (-175.0, 250.0),
        percentiles: tuple[float, float] = (0.5, 99.5),
        cache_cases: int = 2,
        spacing: float | None = None,
        plan_file: str | None = None,
        body_margin: float | None = 10.0,
    ) -> None:
        super().__init__(resolution, batch_size, num_workers, window, percentiles, cache_cases, spacing=spacing,
                         plan_file=plan_file, body_margin=body_margin)
        if modality not in ("ct", "mr", "auto"):
            raise ValueError(f"scan: modality must be 'ct', 'mr' or 'auto', got {modality!r}")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DatasetError(f"{self.path}: no such file or folder (expected a NIfTI file, a folder of them, or a DICOM series folder)")
        self.modality = modality

    @property
    def root_string(self) -> str:
        return str(self.path.resolve())

    def discover(self) -> list[CaseFiles]:
        if self.path.is_file():
            if not is_nifti(self.path):
                raise DatasetError(f"{self.path}: not a NIfTI file (.nii/.nii.gz); for DICOM pass the series folder")
            return [CaseFiles(nifti_stem(self.path), self.path, modality=self.modality)]
        files = nifti_files(self.path)
        if files:
            return [CaseFiles(case_id, path, modality=self.modality) for case_id, path in files.items()]
        return [CaseFiles(self.path.name, self.path, modality=self.modality)]  # a DICOM series, checked on setup

    def setup(self, stage: str) -> None:
        """Check every scan's header and index its slices (any stage serves the predict slices)."""
        if "predict" not in self._datasets:
            cases, _ = self._checked(list(self.files), needs_label=False, skip=False)
            self._datasets["predict"] = self._dataset(cases)

    def predict_dataloader(self) -> DataLoader:
        """Every slice of every scan, scan by scan, slices ascending."""
        if "predict" not in self._datasets:
            self.setup("predict")
        return self._loader(self._planned(self._datasets["predict"], "predict"), train=False)

    def test_cases(self) -> list[str]:
        """Same as :meth:`predict_cases` (scans have no test split; their slices are the predict set)."""
        return self.predict_cases()
