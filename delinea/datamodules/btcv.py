"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, Synapse RawData): 30 labelled abdominal CTs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from delinea.datamodules.labelled import LabelledDataModule
from delinea.datamodules.utils import CaseFiles, LabelSpec
from delinea.io import nifti_files, pair_by_id
from delinea.labels import BTCV

# 0 background, 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
# 8 aorta, 9 IVC, 10 portal and splenic veins, 11 pancreas, 12 right adrenal, 13 left adrenal.
SPEC = LabelSpec(BTCV, known=frozenset(range(14)))


class BTCVDataModule(LabelledDataModule):
    """BTCV from ``RawData/Training/img/imgXXXX.nii.gz`` and ``label/labelXXXX.nii.gz``; case ids ``XXXX``.

    Use RawData, not RegData; the unlabelled ``Testing`` folder is not used. Split 80:10:10 by case.

    Args:
        root: the folder holding ``RawData`` (or ``RawData`` itself, or ``RawData/Training``); default
            ``$DELINEA_BTCV_ROOT``.
        **kwargs: see :class:`~delinea.datamodules.base.LabelledDataModule`.
    """

    name = "btcv"
    layout = "<root>/RawData/Training/img/img0001.nii.gz and <root>/RawData/Training/label/label0001.nii.gz"

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)

    @property
    def label_spec(self) -> LabelSpec:
        return SPEC

    def _training(self) -> Path:
        for candidate in (self.root / "RawData" / "Training", self.root / "Training", self.root):
            if (candidate / "img").is_dir() or (candidate / "label").is_dir():
                return candidate
        raise self._no_cases()

    def discover(self) -> list[CaseFiles]:
        base = self._training()
        images = {k.removeprefix("img"): v for k, v in nifti_files(base / "img").items()}
        labels = {k.removeprefix("label"): v for k, v in nifti_files(base / "label").items()}
        pairs = pair_by_id(images, labels, base / "img", base / "label", "img{}.nii.gz", "label{}.nii.gz")
        return [CaseFiles(case_id, image, label, modality="ct") for case_id, image, label in pairs]
