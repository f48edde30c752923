"""Prediction on new scans: a NIfTI file, a folder of NIfTI files, or a DICOM series folder; no labels."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import DataLoader

from delinea.datamodules.base import MedSegDataModule
from delinea.datamodules.utils import CaseFiles
from delinea.errors import OptionError
from delinea.io import DatasetError, is_nifti, nifti_files, nifti_stem, written_by_predict


class ScanDataModule(MedSegDataModule):
    """Slices of unlabelled scans for ``predict``, resampled to the model's plan; :meth:`case_geometry` gives
    each scan's grid for writing predictions back onto it.

    Predict batches (:class:`~delinea.datamodules.batches.PredictBatch`) hold whole slices, case by case with slices
    ascending, one case per batch.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a folder of them, or a folder holding one DICOM series.
        modality: ``'ct'``, ``'mr'`` or ``'auto'`` (CT if the scan holds values below -500 HU).
        **kwargs: slices and loaders: see :class:`~delinea.datamodules.base.MedSegDataModule`. ``resolution`` is
            the sliding window (None: the model's); ``spacing`` and ``plan_file``, if given, must agree with the
            model's plan.
    """

    name = "scan"
    nonfinite = "replace"

    def __init__(self, path: str, modality: Literal["ct", "mr", "auto"] = "ct", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if modality not in ("ct", "mr", "auto"):
            raise OptionError(f"scan: modality must be 'ct', 'mr' or 'auto', got {modality!r}")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DatasetError(
                f"{self.path}: no such file or folder "
                "(expected a NIfTI file, a folder of them, or a DICOM series folder)"
            )
        self.modality = modality

    @property
    def root_string(self) -> str:
        return str(self.path.resolve())

    def discover(self) -> list[CaseFiles]:
        """The scans: the file, the folder's NIfTI files, or the DICOM series folder. Label and uncertainty maps
        that ``delinea predict`` wrote (their header says so) are not scans: a folder's are skipped with a warning,
        a file of them is refused."""
        if self.path.is_file():
            if not is_nifti(self.path):
                raise DatasetError(f"{self.path}: not a NIfTI file (.nii/.nii.gz); for DICOM pass the series folder")
            if written_by_predict(self.path):
                raise DatasetError(f"{self.path}: a segmentation that delinea predict wrote, not a scan")
            return [CaseFiles(nifti_stem(self.path), self.path, modality=self.modality)]
        if is_nifti(self.path):  # read_volume names the folder
            return [CaseFiles(nifti_stem(self.path), self.path, modality=self.modality)]
        files = nifti_files(self.path)
        outputs = sorted(path.name for path in files.values() if written_by_predict(path))
        if outputs:
            named = ", ".join(outputs[:3]) + (", ..." if len(outputs) > 3 else "")
            warnings.warn(
                f"{self.path}: skipped {len(outputs)} segmentation(s) that delinea predict wrote ({named}); they are "
                "outputs, not scans",
                stacklevel=2,
            )
            files = {case_id: path for case_id, path in files.items() if path.name not in outputs}
            if not files:
                raise DatasetError(f"{self.path}: holds only segmentations that delinea predict wrote, no scan")
        if files:
            return [CaseFiles(case_id, path, modality=self.modality) for case_id, path in files.items()]
        return [CaseFiles(self.path.name, self.path, modality=self.modality)]  # a DICOM series, checked on setup

    def setup(self, stage: str) -> None:
        """Check every scan's header and index its slices (any stage serves the predict slices). NaN or infinite
        voxels are replaced by the scan's lowest value where the scan is read (counted in each batch's
        ``nonfinite``: the prediction's sidecar notes it)."""
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
