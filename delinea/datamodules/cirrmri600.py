"""CirrMRI600+: 628 cirrhotic-liver MRIs (310 T1W, 318 T2W); liver labels only."""

from __future__ import annotations

from typing import Any, Literal

from delinea.datamodules.base import LabelledDataModule, nifti_files, pair_by_id
from delinea.datamodules.utils import CaseFiles, LabelSpec
from delinea.labels import ORGAN_IDS, only_labelled

# Binary masks (possibly 0/255): every voxel > 0 is liver; the other organs are unlabelled, not background.
SPEC = LabelSpec(binary=ORGAN_IDS["liver"], labelled=tuple(only_labelled("liver").tolist()))
SUBSETS = ("train", "valid", "test")


class CirrMRI600DataModule(LabelledDataModule):
    """CirrMRI600+ from ``Cirrhosis_T1_3D/`` and ``Cirrhosis_T2_3D/``, each with ``{train,valid,test}_images``
    and ``{train,valid,test}_masks`` (images and masks paired by file name); case ids ``t1_<stem>``.

    The official train/valid/test folders are pooled and re-split 80:10:10 by case with ``seed``; pass a
    ``split_file`` listing them to use the official split instead.

    Args:
        root: the folder holding ``Cirrhosis_T1_3D`` and/or ``Cirrhosis_T2_3D``; default
            ``$DELINEA_CIRRMRI600_ROOT``.
        sequence: ``'t1'``, ``'t2'`` or ``'both'``.
        **kwargs: see :class:`~delinea.datamodules.base.LabelledDataModule`.
    """

    name = "cirrmri600"
    layout = "<root>/Cirrhosis_T1_3D/train_images/<case>.nii.gz + <root>/Cirrhosis_T1_3D/train_masks/<case>.nii.gz (also valid_, test_, and Cirrhosis_T2_3D)"

    def __init__(self, root: str | None = None, sequence: Literal["t1", "t2", "both"] = "both", **kwargs: Any) -> None:
        if sequence not in ("t1", "t2", "both"):
            raise ValueError(f"cirrmri600: sequence must be 't1', 't2' or 'both', got {sequence!r}")
        self.sequence = sequence
        super().__init__(root, **kwargs)

    @property
    def label_spec(self) -> LabelSpec:
        return SPEC

    def include(self, files: CaseFiles) -> bool:
        return self.sequence == "both" or files.case_id.startswith(self.sequence + "_")

    def discover(self) -> list[CaseFiles]:
        cases = []
        for seq in ("t1", "t2"):
            base = self.root / f"Cirrhosis_{seq.upper()}_3D"
            for subset in SUBSETS:
                image_dir, mask_dir = base / f"{subset}_images", base / f"{subset}_masks"
                pairs = pair_by_id(
                    nifti_files(image_dir),
                    nifti_files(mask_dir),
                    lambda c, d=image_dir: d / f"{c}.nii.gz",
                    lambda c, d=mask_dir: d / f"{c}.nii.gz",
                )
                cases += [CaseFiles(f"{seq}_{c}", image, label, modality="mr") for c, image, label in pairs]
        return cases
