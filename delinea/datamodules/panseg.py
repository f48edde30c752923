"""PanSegData: 767 pancreas MRIs (385 venous-phase T1W, 382 T2W) from five centres; pancreas labels only."""

from __future__ import annotations

from pathlib import Path

from delinea.datamodules.labelled import SequenceDataModule
from delinea.datamodules.utils import LabelSpec
from delinea.labels import ORGAN_IDS, only_labelled

SPEC = LabelSpec(binary=ORGAN_IDS["pancreas"], labelled=tuple(only_labelled("pancreas").tolist()))


class PanSegDataModule(SequenceDataModule):
    """PanSegData from the unzipped ``t1.zip``/``t2.zip``: ``t1/imagesTr/<case>[_0000].nii.gz`` +
    ``t1/labelsTr/<case>.nii.gz`` and the same under ``t2/``; case ids ``t1_<case>``. Split 80:10:10 by case.

    T1 and T2 numberings are independent (pairing them needs ``*-name_mapping.json``), so a subject's T1 and
    T2 may fall in different splits. Beware: most Mayo (MCF) T1 scans are stored rotated against their
    header, which reorientation cannot fix; check overlays before training on T1.

    Args:
        root: the folder holding ``t1`` and/or ``t2``; default ``$DELINEA_PANSEG_ROOT``.
        sequence: ``'t1'``, ``'t2'`` or ``'both'``.
        **kwargs: see :class:`~delinea.datamodules.base.LabelledDataModule`.
    """

    name = "panseg"
    layout = "<root>/t1/imagesTr/<case>.nii.gz + <root>/t1/labelsTr/<case>.nii.gz (and t2/)"

    @property
    def label_spec(self) -> LabelSpec:
        return SPEC

    def folders(self, sequence: str) -> list[tuple[Path, Path]]:
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.lower() == sequence]
        return [(found[0] / "imagesTr", found[0] / "labelsTr")] if found else []
