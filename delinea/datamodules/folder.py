"""Any folder of NIfTI pairs ``images/<case>.nii.gz`` + ``labels/<case>.nii.gz``: the bundled sample, users' data."""

from __future__ import annotations

from typing import Any, Literal

from delinea.datamodules.labelled import LabelledDataModule
from delinea.datamodules.utils import CaseFiles, LabelSpec
from delinea.errors import OptionError
from delinea.io import nifti_files, pair_by_id
from delinea.labels import NUM_CLASSES


class FolderDataModule(LabelledDataModule):
    """A generic labelled folder: ``<root>/images/<case>.nii.gz`` and ``<root>/labels/<case>.nii.gz``.

    Labels are in the unified ids of :mod:`delinea.labels` (0..8) unless ``label_table`` maps them; every
    class counts as labelled. Image names may end in the nnU-Net channel suffix ``_0000``.

    Args:
        root: the folder; default ``$DELINEA_FOLDER_ROOT``.
        modality: ``'ct'``, ``'mr'``, or ``'auto'`` (per case: CT if it holds values below -500 HU).
        label_table: source id -> unified id; ids not listed are unknown (an error, see
            ``ignore_unknown_labels``) except 0. None: labels are already unified.
        split: ``'random'`` (seeded 80:10:10 by case, written to ``split_file``) or ``'all'`` (every case in
            every split: for demos and overfitting checks, never for reporting results).
        **kwargs: see :class:`~delinea.datamodules.base.LabelledDataModule`.
    """

    name = "folder"
    layout = "<root>/images/<case>.nii.gz + <root>/labels/<case>.nii.gz (labels in unified ids 0..8)"

    def __init__(
        self,
        root: str | None = None,
        modality: Literal["ct", "mr", "auto"] = "auto",
        label_table: dict[int, int] | None = None,
        split: Literal["random", "all"] = "random",
        **kwargs: Any,
    ) -> None:
        if modality not in ("ct", "mr", "auto"):
            raise OptionError(f"folder: modality must be 'ct', 'mr' or 'auto', got {modality!r}")
        if split not in ("random", "all"):
            raise OptionError(f"folder: split must be 'random' or 'all', got {split!r}")
        table = (
            {i: i for i in range(NUM_CLASSES)}
            if label_table is None
            else {int(k): int(v) for k, v in label_table.items()}
        )
        bad = {k: v for k, v in table.items() if k < 0 or not 0 <= v < NUM_CLASSES}
        if bad:
            raise OptionError(
                f"folder: label_table entries {bad} must map ids >= 0 to unified ids 0..{NUM_CLASSES - 1}"
            )
        self.modality = modality
        self.split_mode = split
        self._spec = LabelSpec(table, known=frozenset(table) | {0})
        super().__init__(root, **kwargs)

    @property
    def label_spec(self) -> LabelSpec:
        return self._spec

    @property
    def split(self) -> dict[str, list[str]]:
        if self.split_mode == "all":
            if not self.files:
                raise self._no_cases()
            ids = sorted(self.files)
            return {"train": ids, "val": ids, "test": ids}
        return super().split

    def discover(self) -> list[CaseFiles]:
        image_dir, label_dir = self.root / "images", self.root / "labels"
        pairs = pair_by_id(
            nifti_files(image_dir, strip="_0000"),
            nifti_files(label_dir),
            image_dir,
            label_dir,
        )
        return [CaseFiles(c, image, label, modality=self.modality) for c, image, label in pairs]
