"""PanSegData: 767 pancreas MRIs (385 venous-phase T1W, 382 T2W) from five centres; pancreas labels only."""

from __future__ import annotations

from typing import Any, Literal

from delinea.datamodules.base import LabelledDataModule, nifti_files, pair_by_id
from delinea.datamodules.utils import CaseFiles, LabelSpec
from delinea.labels import ORGAN_IDS, only_labelled

SPEC = LabelSpec(binary=ORGAN_IDS["pancreas"], labelled=tuple(only_labelled("pancreas").tolist()))


class PanSegDataModule(LabelledDataModule):
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

    def __init__(self, root: str | None = None, sequence: Literal["t1", "t2", "both"] = "both", **kwargs: Any) -> None:
        if sequence not in ("t1", "t2", "both"):
            raise ValueError(f"panseg: sequence must be 't1', 't2' or 'both', got {sequence!r}")
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
            folders = [p for p in self.root.iterdir() if p.is_dir() and p.name.lower() == seq]
            if not folders:
                continue
            image_dir, label_dir = folders[0] / "imagesTr", folders[0] / "labelsTr"
            pairs = pair_by_id(
                nifti_files(image_dir, strip="_0000"),
                nifti_files(label_dir),
                lambda c, d=image_dir: d / f"{c}.nii.gz",
                lambda c, d=label_dir: d / f"{c}.nii.gz",
            )
            cases += [CaseFiles(f"{seq}_{c}", image, label, modality="mr") for c, image, label in pairs]
        return cases
