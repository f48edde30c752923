"""CirrMRI600+: 628 cirrhotic-liver MRIs (310 T1W, 318 T2W); liver labels only."""

from __future__ import annotations

from pathlib import Path

from delinea.datamodules.labelled import SequenceDataModule
from delinea.datamodules.utils import LabelSpec
from delinea.labels import ORGAN_IDS, only_labelled

# Binary masks (possibly 0/255): every voxel > 0 is liver; the other organs are unlabelled, not background.
SPEC = LabelSpec(binary=ORGAN_IDS["liver"], labelled=tuple(only_labelled("liver").tolist()))
SUBSETS = ("train", "valid", "test")


class CirrMRI600DataModule(SequenceDataModule):
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
    layout = (
        "<root>/Cirrhosis_T1_3D/train_images/<case>.nii.gz + <root>/Cirrhosis_T1_3D/train_masks/<case>.nii.gz "
        "(also valid_, test_, and Cirrhosis_T2_3D)"
    )

    @property
    def label_spec(self) -> LabelSpec:
        return SPEC

    def folders(self, sequence: str) -> list[tuple[Path, Path]]:
        base = self.root / f"Cirrhosis_{sequence.upper()}_3D"
        return [(base / f"{subset}_images", base / f"{subset}_masks") for subset in SUBSETS]
