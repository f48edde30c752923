"""Tiny synthetic abdominal volumes written in each dataset's on-disk layout, for tests and benchmarks (test
fixtures: nothing in the library imports this module).

Organs are ellipsoids at anatomically plausible places in canonical RAS+ voxel space (axis 0 towards the
patient's right, 1 anterior, 2 superior): liver and right kidney at large x, spleen and left kidney at small
x. Each case is stored in one of :data:`ORIENTATIONS` (LPS like DICOM-converted NIfTI, permuted axes...),
so readers must reorient to recover the phantom. Each writer returns the phantoms it wrote, keyed by the
datamodule's case id, so tests can compare exact voxel counts.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from delinea.labels import AMOS, ATLAS8K, ATLAS8K_FILES, BTCV, ORGAN_IDS

#: Stored orientations cycled through the cases; canonical is RAS.
ORIENTATIONS: tuple[str, ...] = ("LPS", "RAS", "LPI", "PSL")
SHAPE = (24, 20, 6)
SPACING = (1.6, 1.4, 3.0)

# (centre, radii) in fractions of the canonical volume; x = 1 is the patient's far right.
ORGAN_BLOBS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "liver": ((0.72, 0.55, 0.6), (0.2, 0.25, 0.4)),
    "spleen": ((0.2, 0.35, 0.6), (0.1, 0.14, 0.3)),
    "kidney_left": ((0.3, 0.22, 0.45), (0.09, 0.12, 0.3)),
    "kidney_right": ((0.7, 0.22, 0.4), (0.09, 0.12, 0.3)),
    "aorta": ((0.47, 0.33, 0.5), (0.06, 0.07, 0.5)),
    "pancreas": ((0.45, 0.5, 0.5), (0.15, 0.07, 0.2)),
    "stomach": ((0.3, 0.72, 0.65), (0.13, 0.12, 0.25)),
    "gallbladder": ((0.6, 0.75, 0.45), (0.08, 0.09, 0.25)),
}
# A structure outside the eight organs (its source id maps to background), between the kidneys.
EXTRA_BLOB = ((0.53, 0.3, 0.5), (0.04, 0.05, 0.4))
HU = {"liver": 60, "spleen": 50, "kidney_left": 150, "kidney_right": 155, "aorta": 200, "pancreas": 45,
      "stomach": 10, "gallbladder": 5}  # fmt: skip
MR = {"liver": 420, "spleen": 600, "kidney_left": 700, "kidney_right": 710, "aorta": 150, "pancreas": 480,
      "stomach": 300, "gallbladder": 900}  # fmt: skip


@dataclass
class Phantom:
    """One synthetic case in canonical RAS+ voxel space.

    Attributes:
        image: intensities (HU for CT), float32 (X, Y, Z).
        label: unified ids, uint8 (X, Y, Z); structures outside the eight organs are 0.
        extra: where the extra (background-mapped) structure is, bool (X, Y, Z).
        affine: canonical voxel-to-RAS+ affine.
        orientation: the axis codes the case is stored in.
        modality: ``'ct'`` or ``'mr'``.
    """

    image: np.ndarray
    label: np.ndarray
    extra: np.ndarray
    affine: np.ndarray
    orientation: str
    modality: str

    def stored(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``array`` (canonical) as stored in ``orientation``, with the stored affine."""
        ornt = orientations.ornt_transform(
            orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(self.orientation)
        )
        out = orientations.apply_orientation(array, ornt)
        return np.ascontiguousarray(out), self.affine @ orientations.inv_ornt_aff(ornt, array.shape)

    def source_label(self, table: dict[int, int], extra_id: int | None) -> np.ndarray:
        """The unified label written in a dataset's source ids (``table``: source -> unified)."""
        inverse = {unified: source for source, unified in table.items()}
        lut = np.zeros(256, dtype=np.uint8)
        for unified, source in inverse.items():
            lut[unified] = source
        out = lut[self.label]
        if extra_id is not None:
            out[self.extra] = extra_id
        return out


def make_phantom(
    seed: int = 0,
    modality: str = "ct",
    orientation: str = "RAS",
    shape: Sequence[int] = SHAPE,
    spacing: Sequence[float] = SPACING,
    organs: Sequence[str] | None = None,
) -> Phantom:
    """Build one phantom; ``seed`` jitters organ positions and noise, ``organs`` limits which are drawn."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij"), -1)  # (X, Y, Z, 3)
    label = np.zeros(shape, dtype=np.uint8)
    body = (((grid[..., 0] - 0.5) / 0.48) ** 2 + ((grid[..., 1] - 0.5) / 0.47) ** 2) <= 1
    if modality == "ct":
        image = np.where(body, 30.0, -1000.0) + rng.normal(0, 8, shape)
    else:
        image = np.where(body, 250.0, 5.0) + np.abs(rng.normal(0, 10, shape))
    values = HU if modality == "ct" else MR
    for name in organs if organs is not None else ORGAN_BLOBS:
        nominal, radii = ORGAN_BLOBS[name]
        centre = np.asarray(nominal) + rng.uniform(-0.02, 0.02, 3)
        inside = (((grid - centre) / np.asarray(radii)) ** 2).sum(-1) <= 1
        label[inside] = ORGAN_IDS[name]
        image[inside] = values[name] + rng.normal(0, 5, int(inside.sum()))
    extra = (((grid - np.asarray(EXTRA_BLOB[0])) / np.asarray(EXTRA_BLOB[1])) ** 2).sum(-1) <= 1
    extra &= label == 0
    # The first and last slices stay empty, so there are slices without foreground.
    label[:, :, 0] = label[:, :, -1] = 0
    extra[:, :, 0] = extra[:, :, -1] = False
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    if modality == "ct":
        image = np.maximum(image, -1024.0)  # scanners store nothing below -1024 HU
    return Phantom(image.astype(np.float32), label, extra, affine, orientation, modality)


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array.astype(dtype) if dtype is not None else array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_case(
    phantom: Phantom,
    image_path: Path,
    label_path: Path | None,
    table: dict[int, int] | None,
    extra_id: int | None = None,
    binary: bool = False,
) -> None:
    """Write a phantom's image and label (in source ids: via ``table``, or ``binary`` 0/1 of the organs)."""
    image, affine = phantom.stored(phantom.image)
    _save(
        np.round(image) if phantom.modality == "ct" else image,
        affine,
        image_path,
        np.int16 if phantom.modality == "ct" else np.float32,
    )
    if label_path is None:
        return
    if binary:
        source = (phantom.label > 0).astype(np.uint8)
    else:
        source = phantom.source_label(table if table is not None else {i: i for i in range(9)}, extra_id)
    stored, affine = phantom.stored(source)
    _save(stored, affine, label_path, np.uint8)


def _orientation(i: int, orientations_: Sequence[str]) -> str:
    return orientations_[i % len(orientations_)]


def write_btcv(
    root: str | Path, n: int = 5, seed: int = 0, orientations_: Sequence[str] = ORIENTATIONS
) -> dict[str, Phantom]:
    """BTCV RawData layout; ids 0001...; IVC (id 9) as the extra structure."""
    base = Path(root) / "RawData" / "Training"
    out = {}
    for i in range(n):
        case = f"{i + 1:04d}"
        phantom = make_phantom(seed + i, "ct", _orientation(i, orientations_))
        write_case(phantom, base / "img" / f"img{case}.nii.gz", base / "label" / f"label{case}.nii.gz", BTCV, 9)
        out[case] = phantom
    return out


def write_amos(
    root: str | Path, n_ct: int = 4, n_mr: int = 2, seed: int = 0, orientations_: Sequence[str] = ORIENTATIONS
) -> dict[str, Phantom]:
    """AMOS layout; CT ids from 1, MRI ids from 501; every third case in imagesVa; duodenum (13) extra."""
    root = Path(root)
    out = {}
    ids = [(i + 1, "ct") for i in range(n_ct)] + [(501 + i, "mr") for i in range(n_mr)]
    for j, (number, modality) in enumerate(ids):
        case = f"amos_{number:04d}"
        part = "Va" if j % 3 == 2 else "Tr"
        phantom = make_phantom(seed + j, modality, _orientation(j, orientations_))
        write_case(
            phantom, root / f"images{part}" / f"{case}.nii.gz", root / f"labels{part}" / f"{case}.nii.gz", AMOS, 13
        )
        out[case] = phantom
    return out


def write_atlas8k(
    root: str | Path,
    n: int = 10,
    seed: int = 0,
    per_organ: bool | None = None,
    orientations_: Sequence[str] = ORIENTATIONS,
) -> dict[str, Phantom]:
    """AbdomenAtlas layout: ``combined_labels.nii.gz`` (1.0, postcava 7 extra) or ``segmentations/`` (1.1);
    ``per_organ=None`` alternates between the two."""
    root = Path(root)
    out = {}
    for i in range(n):
        case = f"BDMAP_{i + 1:08d}"
        phantom = make_phantom(seed + i, "ct", _orientation(i, orientations_))
        folder = root / case
        organ_files = per_organ if per_organ is not None else bool(i % 2)
        write_case(
            phantom, folder / "ct.nii.gz", None if organ_files else folder / "combined_labels.nii.gz", ATLAS8K, 7
        )
        if organ_files:
            for name, unified in {**ATLAS8K_FILES, "postcava": None}.items():
                mask = phantom.extra if unified is None else phantom.label == unified
                stored, affine = phantom.stored(mask.astype(np.uint8))
                _save(stored, affine, folder / "segmentations" / f"{name}.nii.gz", np.uint8)
        out[case] = phantom
    return out


def _single_organ(phantom: Phantom, organ: str) -> Phantom:
    """The phantom with only ``organ`` labelled (what a single-organ dataset's masks hold)."""
    label = np.where(phantom.label == ORGAN_IDS[organ], ORGAN_IDS[organ], 0).astype(np.uint8)
    return Phantom(phantom.image, label, phantom.extra, phantom.affine, phantom.orientation, "mr")


def _write_sequences(
    root: Path,
    counts: dict[str, int],
    seed: int,
    orientations_: Sequence[str],
    organ: str,
    organs: list[str],
    paths: Callable[[str, int], tuple[str, Path, Path]],
) -> dict[str, Phantom]:
    """Single-organ MR cases of two sequences; ``paths(sequence, i)`` gives (stem, image path, label path)."""
    out, j = {}, 0
    for seq, n in counts.items():
        for i in range(n):
            phantom = _single_organ(make_phantom(seed + j, "mr", _orientation(j, orientations_), organs=organs), organ)
            stem, image, label = paths(seq, i)
            write_case(phantom, root / image, root / label, None, binary=True)
            out[f"{seq}_{stem}"] = phantom
            j += 1
    return out


def write_cirrmri600(
    root: str | Path, n_t1: int = 5, n_t2: int = 5, seed: int = 0, orientations_: Sequence[str] = ORIENTATIONS
) -> dict[str, Phantom]:
    """CirrMRI600+ layout (``Cirrhosis_T1_3D/{train,valid,test}_{images,masks}``); binary liver masks."""

    def paths(seq: str, i: int) -> tuple[str, Path, Path]:
        subset, stem = ("train", "train", "valid", "test")[i % 4], f"{100 + i}"
        base = Path(f"Cirrhosis_{seq.upper()}_3D")
        return stem, base / f"{subset}_images" / f"{stem}.nii.gz", base / f"{subset}_masks" / f"{stem}.nii.gz"

    return _write_sequences(
        Path(root), {"t1": n_t1, "t2": n_t2}, seed, orientations_, "liver", ["liver", "spleen", "kidney_right"], paths
    )


def write_panseg(
    root: str | Path, n_t1: int = 5, n_t2: int = 5, seed: int = 0, orientations_: Sequence[str] = ORIENTATIONS
) -> dict[str, Phantom]:
    """PanSegData layout (``t1/imagesTr/<case>_0000.nii.gz``, ``t1/labelsTr/<case>.nii.gz``); binary pancreas."""

    def paths(seq: str, i: int) -> tuple[str, Path, Path]:
        stem = f"{seq.upper()}_{i + 1:03d}"
        return stem, Path(seq) / "imagesTr" / f"{stem}_0000.nii.gz", Path(seq) / "labelsTr" / f"{stem}.nii.gz"

    return _write_sequences(
        Path(root), {"t1": n_t1, "t2": n_t2}, seed, orientations_, "pancreas", ["liver", "pancreas"], paths
    )


def write_folder(
    root: str | Path,
    cases: dict[str, str] | None = None,
    seed: int = 0,
    orientations_: Sequence[str] = ORIENTATIONS,
    shape: Sequence[int] = SHAPE,
    spacing: Sequence[float] = SPACING,
) -> dict[str, Phantom]:
    """Generic layout ``images/<case>.nii.gz`` + ``labels/<case>.nii.gz`` in unified ids; ``cases`` maps
    case id -> modality (default: ``{'ct': 'ct', 'mr': 'mr'}``, like the bundled sample)."""
    root = Path(root)
    out = {}
    for j, (case, modality) in enumerate((cases or {"ct": "ct", "mr": "mr"}).items()):
        phantom = make_phantom(seed + j, modality, _orientation(j, orientations_), shape=shape, spacing=spacing)
        write_case(phantom, root / "images" / f"{case}.nii.gz", root / "labels" / f"{case}.nii.gz", None)
        out[case] = phantom
    return out


def write_dicom_series(
    image: np.ndarray,
    affine: np.ndarray,
    folder: str | Path,
    slope: float = 1.0,
    intercept: float = -1024.0,
    shuffle: bool = True,
) -> Path:
    """Write a volume as a CT DICOM series, one file per slice along axis 2 (stored as uint16 with rescale).

    Args:
        image: values (e.g. HU), (X, Y, Z); axis 0 becomes the DICOM column index, axis 1 the row index.
        affine: the volume's voxel-to-RAS+ affine; columns 0 and 1 must be orthogonal (no shear).
        folder: output folder (created).
        slope: RescaleSlope written (stored = (value - intercept) / slope).
        intercept: RescaleIntercept written.
        shuffle: write files in a scrambled order, so readers must sort by position.

    Returns:
        The folder.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    col_spacing, row_spacing = (float(np.linalg.norm(lps[:3, i])) for i in (0, 1))
    row_cos, col_cos = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
    thickness = float(np.linalg.norm(lps[:3, 2]))
    stored = np.round((np.asarray(image, dtype=np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("values do not fit uint16 with this slope/intercept")
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(image.shape[2]) if shuffle else np.arange(image.shape[2])
    for k in range(image.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice{order[k]:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Synthetic^Phantom", "SYN0001"
        ds.StudyDate = ds.SeriesDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [row_spacing, col_spacing]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype(np.uint16)).tobytes()  # (rows, cols)
        ds.save_as(folder / f"slice{order[k]:04d}.dcm", enforce_file_format=True)
    return folder
