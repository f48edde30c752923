"""Reading and writing volumes: NIfTI and DICOM series in, NIfTI out, one canonical orientation in between.

Every volume is reoriented to the closest canonical orientation, RAS+ (nibabel's convention): array axis 0
increases towards the patient's **right**, axis 1 towards anterior, axis 2 towards superior. Axis 2 is
therefore the axial axis that slices are taken along, and the patient's left kidney has the *smaller* axis-0
index. Reorientation only permutes and flips axes, so :meth:`Geometry.to_original` maps a canonical array
back to the input's voxel order exactly, and a prediction can be written with the input's shape and affine.

DICOM is LPS+ (x towards the patient's left, y posterior); :func:`read_dicom_series` flips x and y to build
a RAS+ affine, the NIfTI convention.

Also here: finding NIfTI files in a folder and pairing images with labels by case id (:func:`nifti_files`,
:func:`pair_by_id`). Files are written whole or not at all (:mod:`delinea.outputs`).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from delinea.errors import DatasetError
from delinea.outputs import atomic_path

__all__ = [
    "PREDICTION_DESCRIPTION",
    "DatasetError",
    "Geometry",
    "Volume",
    "is_nifti",
    "nifti_files",
    "nifti_stem",
    "pair_by_id",
    "read_dicom_series",
    "read_geometry",
    "read_volume",
    "save_nifti",
    "written_by_predict",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CANONICAL = orientations.axcodes2ornt(("R", "A", "S"))
# What a corrupt or truncated file raises inside nibabel/numpy/gzip.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError)
#: The header description (``descrip``) of the label and uncertainty maps ``delinea predict`` writes: how a later
#: run tells its own outputs from scans.
PREDICTION_DESCRIPTION = "delinea prediction"


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without ``.nii``/``.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def pair_by_id(
    images: dict[str, Path],
    labels: dict[str, Path],
    image_dir: Path,
    label_dir: Path,
    image_name: str = "{}.nii.gz",
    label_name: str = "{}.nii.gz",
) -> list[tuple[str, Path, Path]]:
    """Pair image and label files by case id. A case with only one of the two gets the path the other should
    have (``<dir>/<name with the id>``, which does not exist), so checking the case reports exactly which file is
    missing."""
    return [
        (case_id, images.get(case_id, image_dir / image_name.format(case_id)),
         labels.get(case_id, label_dir / label_name.format(case_id)))
        for case_id in sorted(set(images) | set(labels))
    ]  # fmt: skip


def nifti_files(folder: Path, strip: str = "") -> dict[str, Path]:
    """NIfTI files of ``folder`` by stem (with ``strip`` removed from the end of the stem, e.g. ``_0000``).

    Raises:
        DatasetError: two files give one stem (``b.nii.gz`` and ``b_0000.nii.gz``, ``c.nii`` and ``c.nii.gz``):
            which one is the case cannot be guessed; or a folder has a NIfTI name.
    """
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() and is_nifti(path) and not path.name.startswith("."):
            raise DatasetError(f"{path}: a folder named like a NIfTI file; expected a .nii or .nii.gz file")
        if path.is_file() and is_nifti(path) and not path.name.startswith("."):
            stem = nifti_stem(path)
            if strip and stem.endswith(strip):
                stem = stem[: -len(strip)]
            if stem in out:
                raise DatasetError(
                    f"{folder}: {out[stem].name} and {path.name} are both case {stem!r}; remove or rename one"
                )
            out[stem] = path
    return out


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume lies in space, before and after canonical reorientation.

    Attributes:
        original_affine: voxel-to-RAS+ world affine (mm) of the array as stored in the file.
        original_shape: shape of the array as stored in the file (3 axes).
        canonical_affine: affine of the canonical (RAS+) array.
        canonical_shape: shape of the canonical array.
        spacing: voxel size in mm in the canonical array's axis order.
        ornt: nibabel orientation transform from the stored array to the canonical one.
    """

    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    ornt: np.ndarray = field(repr=False)

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...], source: str | Path = "the affine") -> Geometry:
        """Geometry of an array of ``shape`` (3 axes) stored with ``affine``.

        Raises:
            DatasetError: the affine is not finite or is singular (no orientation or spacing); names ``source``.
        """
        affine = np.asarray(affine, dtype=np.float64)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0)) if np.isfinite(affine).all() else np.zeros(3)
        if not spacing.all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
            raise DatasetError(
                f"{source}: the voxel-to-world affine {affine[:3, :3].round(4).tolist()} is singular or not finite, "
                "so the scan's orientation and voxel size are unknown; fix the header's qform/sform"
            )
        shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
        ornt = orientations.ornt_transform(orientations.io_orientation(affine), _CANONICAL)
        canonical_affine = affine @ orientations.inv_ornt_aff(ornt, shape3)
        order = [int(axis) for axis in np.argsort(ornt[:, 0])]
        canonical_shape = (shape3[order[0]], shape3[order[1]], shape3[order[2]])
        sx, sy, sz = (float(s) for s in np.sqrt((canonical_affine[:3, :3] ** 2).sum(0)))
        return cls(affine, shape3, canonical_affine, canonical_shape, (sx, sy, sz), ornt)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Reorient an array in the stored voxel order (extra trailing axes allowed) to canonical RAS+; a view."""
        if tuple(array.shape[:3]) != self.original_shape:
            raise ValueError(f"array shape {array.shape[:3]} does not match the original shape {self.original_shape}")
        return orientations.apply_orientation(array, self.ornt)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Map a canonical array (extra trailing axes allowed) back to the stored voxel order; a view."""
        if tuple(array.shape[:3]) != self.canonical_shape:
            raise ValueError(f"array shape {array.shape[:3]} does not match the canonical shape {self.canonical_shape}")
        back = orientations.ornt_transform(_CANONICAL, orientations.io_orientation(self.original_affine))
        return orientations.apply_orientation(array, back)

    def same_grid(self, other: Geometry, atol: float = 1e-3) -> bool:
        """Whether two volumes cover the same voxel grid once canonical (shape equal, affines within ``atol`` mm)."""
        return self.canonical_shape == other.canonical_shape and bool(
            np.allclose(self.canonical_affine, other.canonical_affine, rtol=0.0, atol=atol)
        )


@dataclass(eq=False)
class Volume:
    """A volume in canonical orientation.

    ``array`` holds the stored (unscaled) values for NIfTI, reoriented without a copy (a memory map for
    uncompressed files); the real value of a voxel is ``array * slope + intercept``. :meth:`values` applies it.
    """

    array: np.ndarray
    geometry: Geometry
    path: Path
    slope: float = 1.0
    intercept: float = 0.0

    def values(self, dtype: type = np.float32) -> np.ndarray:
        """The scaled canonical array as ``dtype`` (a copy)."""
        out: np.ndarray = self.array.astype(dtype)
        if self.slope != 1.0:
            out *= dtype(self.slope)
        if self.intercept != 0.0:
            out += dtype(self.intercept)
        return out


def _squeeze_to_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Drop trailing singleton axes beyond the third; refuse anything that is not a 3D volume."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DatasetError(
            f"{path}: expected a 3D volume (a 4D volume with one trailing singleton axis is accepted), "
            f"got a {len(shape)}D array of shape {shape}"
        )
    return shape[0], shape[1], shape[2]


def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if path.is_dir():
        raise DatasetError(f"{path}: a folder named like a NIfTI file; expected a .nii or .nii.gz file")
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as error:
        raise DatasetError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from error
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DatasetError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":  # RGB24/RGBA32 are records; complex has no order
        raise DatasetError(
            f"{path}: holds {'colour (RGB) ' if dtype.fields is not None else ''}voxels of type {dtype}; expected "
            "one grey value per voxel (an integer or floating-point scan or label map)"
        )
    return img


def written_by_predict(path: str | Path) -> bool:
    """Whether a NIfTI file is a label or uncertainty map that ``delinea predict`` wrote (its header says so)."""
    try:
        header: Any = nib.load(str(path)).header
        description = bytes(header["descrip"].item()).split(b"\0", 1)[0].decode("ascii", "replace")
    except (*_READ_ERRORS, KeyError):
        return False
    return description.startswith(PREDICTION_DESCRIPTION)


def read_geometry(path: str | Path) -> Geometry:
    """Read only the header of a volume (NIfTI file or DICOM series folder) and return its geometry.

    Raises:
        DatasetError: the file is missing, unreadable, or not a 3D volume.
    """
    path = Path(path)
    if path.is_dir() and not is_nifti(path):
        return read_dicom_series(path, header_only=True).geometry
    img = _load_nifti(path)
    return Geometry.from_affine(img.affine, _squeeze_to_3d(img.shape, path), path)


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI file or a DICOM series folder and reorient it to canonical RAS+.

    NIfTI data keep their stored dtype and scaling (:class:`Volume` applies slope/intercept on demand), so a
    CT volume of int16 costs 2 bytes a voxel in memory and an uncompressed ``.nii`` stays memory-mapped.

    Raises:
        DatasetError: the path is missing, unreadable, corrupt, or not a 3D volume.
    """
    path = Path(path)
    if path.is_dir() and not is_nifti(path):
        return read_dicom_series(path)
    if not is_nifti(path):
        raise DatasetError(f"{path}: expected a NIfTI file (.nii or .nii.gz) or a DICOM series folder")
    img = _load_nifti(path)
    shape = _squeeze_to_3d(img.shape, path)
    geometry = Geometry.from_affine(img.affine, shape, path)
    try:
        proxy: Any = img.dataobj  # an ArrayProxy (stored values + scaling) or an in-memory array
        if nib.is_proxy(proxy):
            array = np.asanyarray(proxy.get_unscaled())
            slope, intercept = float(proxy.slope), float(proxy.inter)
        else:
            array, slope, intercept = np.asanyarray(proxy), 1.0, 0.0
    except _READ_ERRORS as error:
        raise DatasetError(f"{path}: corrupt or truncated image data ({type(error).__name__}: {error})") from error
    if not np.isfinite(slope) or not np.isfinite(intercept):
        slope, intercept = 1.0, 0.0  # NIfTI: a NaN scl_slope means "no scaling"
    array = geometry.to_canonical(array.reshape(shape))
    return Volume(array, geometry, path, slope, intercept)


def read_dicom_series(folder: str | Path, header_only: bool = False) -> Volume:
    """Read one DICOM series from a folder into a canonical RAS+ float32 volume.

    Slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of the
    ImageOrientationPatient row and column cosines); RescaleSlope/RescaleIntercept are applied per slice.

    Args:
        folder: a folder holding the files of exactly one series (non-DICOM files are ignored).
        header_only: read the headers only; the returned array is then empty (shape (0, 0, 0)).

    Raises:
        DatasetError: no DICOM files, several series, missing geometry tags, inconsistent slices, or
            unreadable pixel data.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder (expected a DICOM series folder)")
    datasets = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=header_only)
        except (InvalidDicomError, *_READ_ERRORS):
            continue
        if "ImagePositionPatient" in ds or "PixelData" in ds:
            datasets.append((file, ds))
    if not datasets:
        raise DatasetError(f"{folder}: no readable DICOM image files (expected one DICOM series)")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise DatasetError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    for file, ds in datasets:
        missing = [tag for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if tag not in ds]
        if missing:
            raise DatasetError(f"{file}: DICOM slice lacks {', '.join(missing)}; cannot place it in space")
    cosines = np.asarray(datasets[0][1].ImageOrientationPatient, dtype=np.float64)
    row, col = cosines[:3], cosines[3:]
    normal = np.cross(row, col)
    datasets.sort(key=lambda item: float(np.dot(np.asarray(item[1].ImagePositionPatient, float), normal)))
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in datasets])
    if len(datasets) > 1:
        steps = np.diff(positions @ normal)
        if np.any(steps < 1e-4):
            raise DatasetError(f"{folder}: two DICOM slices share one position; is this one series?")
        if np.ptp(steps) > 1e-2 * max(float(np.mean(steps)), 1.0):
            raise DatasetError(f"{folder}: DICOM slices are unevenly spaced ({steps.min():.3f}..{steps.max():.3f} mm)")
        step = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        thickness = float(datasets[0][1].get("SliceThickness", 1.0) or 1.0)
        step = normal * thickness
    row_spacing, col_spacing = (float(v) for v in datasets[0][1].PixelSpacing)  # between rows, between columns
    # Array axis 0 runs along a row (the column index), axis 1 down a column (the row index).
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing
    lps[:3, 1] = col * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS+ -> RAS+
    rows, cols = int(datasets[0][1].Rows), int(datasets[0][1].Columns)
    shape = (cols, rows, len(datasets))
    geometry = Geometry.from_affine(affine, shape, folder)
    if header_only:
        return Volume(np.zeros((0, 0, 0), np.float32), geometry, folder)
    array = np.empty(shape, dtype=np.float32)
    for k, (file, ds) in enumerate(datasets):
        try:
            pixels = ds.pixel_array
        except Exception as error:  # pydicom raises many types for bad or unsupported pixel data
            raise DatasetError(f"{file}: cannot decode DICOM pixel data ({type(error).__name__}: {error})") from error
        if pixels.shape != (rows, cols):
            raise DatasetError(f"{file}: slice of shape {pixels.shape}, expected ({rows}, {cols}) like the series")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        array[:, :, k] = pixels.T.astype(np.float32) * slope + intercept
    return Volume(geometry.to_canonical(array), geometry, folder)


def save_nifti(
    array: np.ndarray, affine: np.ndarray, path: str | Path, overwrite: bool = False, description: str = ""
) -> Path:
    """Write ``array`` with ``affine`` as a NIfTI file (atomically, :func:`atomic_path`), refusing to replace an
    existing file unless asked.

    Args:
        array: the voxel data, in the voxel order that ``affine`` describes.
        affine: 4x4 voxel-to-RAS+ affine.
        path: the output file (``.nii`` or ``.nii.gz``); parent folders are created.
        overwrite: replace ``path`` if it exists.
        description: the header's ``descrip`` (at most 80 characters).

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: ``path`` is not a NIfTI file name or ``affine`` is not 4x4.
        OutputError: the file cannot be written (a full disk, a read-only folder); an earlier file is kept.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or choose another output) to replace it")
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.int64:
        array = array.astype(np.int32)  # int64 NIfTI is poorly supported by other readers
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if description:
        img.header["descrip"] = description.encode("ascii")[:80]
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"  # nibabel compresses by the file name
    with atomic_path(path, suffix=suffix) as temporary:
        nib.save(img, str(temporary))
    return path
