"""AMOS 2022: 300 CT and 60 MRI labelled abdominal scans (imagesTr/labelsTr and imagesVa/labelsVa)."""

from __future__ import annotations

import re
from typing import Any, Literal

from delinea.datamodules.labelled import LabelledDataModule
from delinea.datamodules.utils import CaseFiles, LabelSpec
from delinea.errors import DatasetError, OptionError
from delinea.io import nifti_files, pair_by_id
from delinea.labels import AMOS

# 0 background, 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
# 8 aorta ("arota" in dataset.json), 9 postcava, 10 pancreas, 11 right adrenal, 12 left adrenal,
# 13 duodenum, 14 bladder, 15 prostate/uterus.
SPEC = LabelSpec(AMOS, known=frozenset(range(16)))
CT_MAX_ID = 500  # AMOS readme: ids below 500 are CT, the others MRI


def amos_modality(case_id: str) -> str:
    """``'ct'`` for AMOS ids up to 500, ``'mr'`` above (the official readme's rule)."""
    match = re.search(r"(\d+)$", case_id)
    if match is None:
        raise DatasetError(f"AMOS case id {case_id!r} does not end in a number")
    return "ct" if int(match.group(1)) <= CT_MAX_ID else "mr"


class AMOSDataModule(LabelledDataModule):
    """AMOS 2022 from ``imagesTr``/``labelsTr`` and ``imagesVa``/``labelsVa`` (``imagesTs`` has no labels).

    The split (80:10:10 by case) is made over CT and MRI together, then filtered by ``modality``, so the CT
    test cases are the same whether or not MRI is included.

    Args:
        root: the ``amos22`` folder; default ``$DELINEA_AMOS_ROOT``.
        modality: ``'ct'`` (ids <= 500), ``'mr'`` (ids > 500) or ``'both'``.
        **kwargs: see :class:`~delinea.datamodules.base.LabelledDataModule`.
    """

    name = "amos"
    layout = "<root>/imagesTr/amos_0001.nii.gz + <root>/labelsTr/amos_0001.nii.gz (and imagesVa/labelsVa)"

    def __init__(self, root: str | None = None, modality: Literal["ct", "mr", "both"] = "both", **kwargs: Any) -> None:
        if modality not in ("ct", "mr", "both"):
            raise OptionError(f"amos: modality must be 'ct', 'mr' or 'both', got {modality!r}")
        self.modality = modality
        super().__init__(root, **kwargs)

    @property
    def label_spec(self) -> LabelSpec:
        return SPEC

    def include(self, files: CaseFiles) -> bool:
        return self.modality == "both" or files.modality == self.modality

    def discover(self) -> list[CaseFiles]:
        cases = []
        for images, labels in (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")):
            image_dir, label_dir = self.root / images, self.root / labels
            pairs = pair_by_id(
                nifti_files(image_dir, strip="_0000"),
                nifti_files(label_dir),
                image_dir,
                label_dir,
            )
            cases += [CaseFiles(c, image, label, modality=amos_modality(c)) for c, image, label in pairs]
        return cases
