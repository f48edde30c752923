"""ATLAS-8k: AbdomenAtlas 1.0 / 1.1 (Mini), thousands of CTs with (mostly AI-made) organ labels; pretraining."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from delinea.datamodules.labelled import LabelledDataModule
from delinea.datamodules.utils import CaseFiles, LabelSpec
from delinea.io import DatasetError
from delinea.labels import ATLAS8K, ATLAS8K_FILES

# combined_labels ids: 1.0 has 1..9 (7 postcava), 1.1 adds 10..25; all but the 8 organs map to background.
SPEC = LabelSpec(ATLAS8K, known=frozenset(range(26)))


def _first(folder: Path, stem: str) -> Path:
    """``<stem>.nii.gz`` or ``<stem>.nii`` in ``folder``, whichever exists (the former if neither).

    Raises:
        DatasetError: both exist; which one is meant cannot be guessed.
    """
    found = [folder / f"{stem}{suffix}" for suffix in (".nii.gz", ".nii") if (folder / f"{stem}{suffix}").exists()]
    if len(found) > 1:
        raise DatasetError(f"{folder}: {found[0].name} and {found[1].name} are both {stem!r}; remove one")
    return found[0] if found else folder / f"{stem}.nii.gz"


class Atlas8kDataModule(LabelledDataModule):
    """AbdomenAtlas: one folder per case, ``<case>/ct.nii.gz`` plus ``combined_labels.nii.gz`` (1.0) or the
    per-organ masks ``segmentations/<organ>.nii.gz`` (1.1; all eight organs required, flattened in the order
    of :data:`delinea.labels.ATLAS8K_FILES`, later organs winning where masks overlap).

    Pretraining split 90:10 train:val (no test split). AbdomenAtlas 1.1 Mini cases 5196-9262 ship labels
    only: they fail with "image ... is missing" unless ``skip_bad_cases=True``. Its CTs include BTCV and
    AMOS scans, so testing on those after pretraining here risks leakage.

    Args:
        root: the folder of ``BDMAP_*`` case folders; default ``$DELINEA_ATLAS8K_ROOT``.
        **kwargs: see :class:`~delinea.datamodules.base.LabelledDataModule`.
    """

    name = "atlas8k"
    ratios = (0.9, 0.1, 0.0)
    layout = (
        "<root>/BDMAP_00000001/ct.nii.gz with <root>/BDMAP_00000001/combined_labels.nii.gz "
        "or <root>/BDMAP_00000001/segmentations/<organ>.nii.gz"
    )

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)

    @property
    def label_spec(self) -> LabelSpec:
        return SPEC

    def discover(self) -> list[CaseFiles]:
        cases = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            image, combined, organs = _first(folder, "ct"), _first(folder, "combined_labels"), folder / "segmentations"
            if not (image.exists() or combined.exists() or organs.is_dir()):
                continue  # not a case folder
            if combined.exists():
                cases.append(CaseFiles(folder.name, image, combined, modality="ct"))
            elif organs.is_dir():
                parts = tuple((_first(organs, name), unified) for name, unified in ATLAS8K_FILES.items())
                cases.append(CaseFiles(folder.name, image, None, parts, modality="ct"))
            else:
                cases.append(CaseFiles(folder.name, image, combined, modality="ct"))  # label reported missing
        return cases
