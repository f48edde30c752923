"""Per-case reading shared by every datamodule: file records, label mapping, intensity normalisation.

Everything here runs in loader worker processes too, so it holds no dataset-wide state.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from delinea.io import DatasetError, Geometry, Volume, read_geometry, read_volume
from delinea.labels import NUM_CLASSES

MODALITIES = ("ct", "mr")


@dataclass(frozen=True)
class LabelSpec:
    """How a dataset's label files map to the unified ids of :mod:`delinea.labels`.

    Attributes:
        table: source id -> unified id; source ids in ``known`` but not in ``table`` become background.
        known: every source id the dataset may contain (0 included); any other value is an error.
            None accepts any non-negative id.
        binary: for single-organ datasets, the unified id that every voxel > 0 becomes (``table`` unused).
        labelled: which unified classes the labels annotate, bool (9,).
    """

    table: dict[int, int] = field(default_factory=dict)
    known: frozenset[int] | None = None
    binary: int | None = None
    labelled: tuple[bool, ...] = (True,) * NUM_CLASSES

    def map(self, raw: np.ndarray, path: Path | str, ignore_unknown: bool = False) -> np.ndarray:
        """Map a source label array to unified uint8 ids.

        Raises:
            DatasetError: ``raw`` holds negative or non-integer values, or ids outside ``known`` (unless
                ``ignore_unknown``, which maps them to background with a warning).
        """
        raw = _integer_labels(raw, path)
        if self.binary is not None:
            return (raw > 0).astype(np.uint8) * np.uint8(self.binary)
        top = int(raw.max(initial=0))
        if self.is_identity(top):  # ids already unified (a folder in delinea's ids): no pass over the volume
            return raw if raw.dtype == np.uint8 else raw.astype(np.uint8)
        if self.known is not None:
            is_known = np.zeros(top + 1, dtype=bool)
            is_known[[i for i in self.known if i <= top]] = True
            if not is_known[raw].all():  # LUT lookup: cheap on a whole CT label map, unlike np.unique
                unknown = sorted(int(v) for v in np.unique(raw[~is_known[raw]]))
                message = f"{path}: label ids {unknown} are not in this dataset's table (expected {sorted(self.known)})"
                if not ignore_unknown:
                    raise DatasetError(message + "; pass ignore_unknown_labels=True to map them to background")
                warnings.warn(message + "; mapped to background", stacklevel=2)
        lut = np.zeros(max(top, max(self.table, default=0)) + 1, dtype=np.uint8)
        for source, unified in self.table.items():
            lut[source] = unified
        return lut[raw]

    def is_identity(self, top: int) -> bool:
        """Whether every id up to ``top`` (a label's maximum) is known and maps to itself, so mapping changes
        nothing."""
        return top < NUM_CLASSES and all(
            self.table.get(i, 0) == i and (self.known is None or i in self.known) for i in range(top + 1)
        )


def _integer_labels(raw: np.ndarray, path: Path | str) -> np.ndarray:
    """Return an integer view/copy of a label array, or raise naming the file if it is not one."""
    if raw.dtype.kind == "b":
        return raw.astype(np.uint8)
    if raw.dtype.kind == "f":
        if raw.size and (not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw))):
            raise DatasetError(f"{path}: label values must be integers, got non-integer floats")
        raw = raw.astype(np.int32)
    elif raw.dtype.kind not in "iu":
        raise DatasetError(f"{path}: label values must be integers, got dtype {raw.dtype}")
    if raw.dtype.kind == "i" and raw.size and raw.min() < 0:
        raise DatasetError(f"{path}: label values must be non-negative, got minimum {raw.min()}")
    return raw


@dataclass(frozen=True)
class CaseFiles:
    """Where one case lives on disk. Small and picklable: the index holds one per case.

    Attributes:
        case_id: unique id within the dataset.
        image: the image file or DICOM folder (may not exist: reported when the case is checked).
        label: the label file, or None.
        label_parts: per-organ binary mask files with the unified id each becomes (AbdomenAtlas
            ``segmentations/``); used when ``label`` is None.
        modality: ``'ct'``, ``'mr'`` or ``'auto'`` (CT if the volume holds values below -500, i.e. air in HU).
    """

    case_id: str
    image: Path
    label: Path | None = None
    label_parts: tuple[tuple[Path, int], ...] = ()
    modality: str = "ct"

    @property
    def has_label(self) -> bool:
        """Whether the case has any label file."""
        return self.label is not None or bool(self.label_parts)

    def label_paths(self) -> list[Path]:
        """Every label file of the case."""
        return [self.label] if self.label is not None else [p for p, _ in self.label_parts]

    def stat_key(self) -> str:
        """Sizes and modification times of the case's files: changes when the data on disk change."""
        parts = []
        for path in [self.image, *self.label_paths()]:
            try:
                stat = path.stat()
                parts.append(f"{stat.st_size}-{stat.st_mtime_ns}")
            except OSError:
                parts.append("missing")
        return "/".join(parts)


def check_case(files: CaseFiles, needs_label: bool, atol: float = 1e-3) -> Geometry:
    """Check a case from its headers: files present, 3D, label on the image's grid.

    Args:
        files: the case.
        needs_label: whether a missing label is an error.
        atol: tolerance in mm between the canonical image and label affines.

    Returns:
        The image geometry.

    Raises:
        DatasetError: naming the file and the problem.
    """
    if not files.image.exists():
        raise DatasetError(f"case {files.case_id!r}: image {files.image} is missing")
    geometry = read_geometry(files.image)
    if needs_label and not files.has_label:
        raise DatasetError(f"case {files.case_id!r}: no label file for image {files.image}")
    for path in files.label_paths():
        if not path.exists():
            raise DatasetError(f"case {files.case_id!r}: label {path} is missing (image {files.image})")
        label_geometry = read_geometry(path)
        if label_geometry.canonical_shape != geometry.canonical_shape:
            raise DatasetError(
                f"{path}: label shape {label_geometry.original_shape} does not match image {files.image} "
                f"shape {geometry.original_shape} (compared after reorienting both to RAS)"
            )
        if not geometry.same_grid(label_geometry, atol):
            raise DatasetError(
                f"{path}: label affine differs from image {files.image} affine by more than {atol} mm; "
                f"label\n{label_geometry.original_affine.round(4)}\nimage\n{geometry.original_affine.round(4)}"
            )
    return geometry


@dataclass(frozen=True)
class Intensity:
    """Intensity normalisation to [-1, 1]: CT through a HU window, MRI through per-volume percentiles.

    Equivalent to MONAI's ``ScaleIntensityRange``/``ScaleIntensityRangePercentiles`` with ``b_min=-1,
    b_max=1, clip=True``, split into a per-volume part (:meth:`bounds`) and a per-slice part (:meth:`apply`)
    so that a worker can keep the stored volume and normalise only the slices it serves.
    """

    window: tuple[float, float] = (-175.0, 250.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def bounds(self, volume: Volume, modality: str) -> tuple[float, float]:
        """The value range ``(low, high)`` mapped to [-1, 1] for this volume."""
        if modality == "ct":
            return float(self.window[0]), float(self.window[1])
        if volume.array.size == 0:
            return 0.0, 1.0
        low, high = (float(v) for v in np.percentile(volume.array, self.percentiles))
        low, high = low * volume.slope + volume.intercept, high * volume.slope + volume.intercept
        low, high = min(low, high), max(low, high)
        return low, high if high > low else low + 1.0

    @staticmethod
    def apply(
        values: np.ndarray, bounds: tuple[float, float], slope: float = 1.0, intercept: float = 0.0
    ) -> np.ndarray:
        """Scale stored values (``values * slope + intercept``) so that ``bounds`` map to [-1, 1], clipped."""
        low, high = bounds
        scale = 2.0 * slope / (high - low)
        offset = 2.0 * (intercept - low) / (high - low) - 1.0
        out = values.astype(np.float32) * np.float32(scale) + np.float32(offset)
        return np.clip(out, -1.0, 1.0, out=out)

    def key(self, modality: str) -> str:
        """A short string naming the normalisation, for cache keys."""
        if modality == "ct":
            return f"ct{self.window[0]:g},{self.window[1]:g}"
        return f"mr{self.percentiles[0]:g},{self.percentiles[1]:g}"


def detect_modality(volume: Volume) -> str:
    """CT if the volume holds values below -500 (air in HU); MRI intensities are non-negative."""
    low = float(volume.array.min()) * volume.slope + volume.intercept if volume.array.size else 0.0
    if volume.slope < 0:
        low = float(volume.array.max()) * volume.slope + volume.intercept
    return "ct" if low < -500 else "mr"


@dataclass(eq=False)
class LoadedCase:
    """A case as a worker keeps it: the stored canonical image plus its normalisation, the unified label."""

    files: CaseFiles
    volume: Volume
    modality: str
    bounds: tuple[float, float]
    label: np.ndarray | None
    #: Voxels that were NaN or infinite and now hold the image's lowest finite value (``nonfinite="replace"``).
    replaced: int = 0

    def image_slice(self, k: int, intensity: Intensity) -> np.ndarray:
        """Normalised axial slice ``k`` (X, Y) float32 in [-1, 1]."""
        return intensity.apply(self.volume.array[:, :, k], self.bounds, self.volume.slope, self.volume.intercept)

    def image(self, intensity: Intensity) -> np.ndarray:
        """The whole normalised canonical image (X, Y, Z) float32."""
        return intensity.apply(self.volume.array, self.bounds, self.volume.slope, self.volume.intercept)

    def body_profiles(self, threshold: float, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Share of voxels brighter than ``threshold`` (a normalised value in [-1, 1]) in every x row and every y
        column of the volume; computed on the stored values, ``chunk`` slices at a time (no float copy of the
        volume)."""
        low, high = self.bounds
        value = low + (threshold + 1.0) / 2.0 * (high - low)  # the real value that normalises to ``threshold``
        raw = (value - self.volume.intercept) / self.volume.slope
        array = self.volume.array
        rows = np.zeros(array.shape[0])
        cols = np.zeros(array.shape[1])
        for start in range(0, array.shape[2], chunk):
            part = np.asarray(array[:, :, start : start + chunk])
            body = part > raw if self.volume.slope > 0 else part < raw
            rows += body.sum(axis=(1, 2))
            cols += body.sum(axis=(0, 2))
        depth = max(1, array.shape[2])
        return rows / (array.shape[1] * depth), cols / (array.shape[0] * depth)


def read_label(
    files: CaseFiles, spec: LabelSpec, geometry: Geometry, ignore_unknown: bool = False, atol: float = 1e-3
) -> np.ndarray:
    """Read a case's label file(s) as a canonical unified uint8 map on the image grid ``geometry``.

    Raises:
        DatasetError: a missing, corrupt or misaligned label file, or unknown label ids.
    """
    label = np.zeros(geometry.canonical_shape, dtype=np.uint8)
    parts = [(files.label, None)] if files.label is not None else list(files.label_parts)
    for path, unified in parts:
        part = read_volume(path)
        if not geometry.same_grid(part.geometry, atol):
            raise DatasetError(
                f"{path}: label grid (shape {part.geometry.original_shape}) does not match image {files.image} "
                f"(shape {geometry.original_shape}) within {atol} mm"
            )
        raw = part.values(np.float32) if (part.slope, part.intercept) != (1.0, 0.0) else np.asarray(part.array)
        if unified is None:
            label = spec.map(raw, path, ignore_unknown)
        else:  # per-organ masks: later organs win where masks overlap
            label[_integer_labels(raw, path) > 0] = unified
    return label


def count_nonfinite(volume: Volume) -> int:
    """NaN or infinite voxels of a volume (0 without reading for integer data, which cannot hold them)."""
    if not np.issubdtype(volume.array.dtype, np.floating):
        return 0
    return int(volume.array.size - np.isfinite(volume.array).sum())


def replace_nonfinite(volume: Volume) -> tuple[Volume, int]:
    """The volume with NaN and infinite voxels set to its lowest finite value (air, for CT), and their count."""
    count = count_nonfinite(volume)
    if not count:
        return volume, 0
    array = np.array(volume.array)
    finite = np.isfinite(array)
    array[~finite] = array[finite].min() if finite.any() else 0
    return dataclasses.replace(volume, array=array), count


def load_case_files(
    files: CaseFiles,
    spec: LabelSpec | None,
    intensity: Intensity,
    ignore_unknown: bool = False,
    atol: float = 1e-3,
    nonfinite: Literal["refuse", "replace"] = "refuse",
) -> LoadedCase:
    """Read a case's image and (if ``spec`` is given) its label, canonical and mapped to unified ids.

    Args:
        nonfinite: what NaN or infinite image voxels do: ``refuse`` (a DatasetError with their count; training and
            evaluation data must be fixed) or ``replace`` (by the lowest finite value, counted in ``replaced``).

    Raises:
        DatasetError: missing, corrupt or inconsistent files, unknown label ids, non-finite voxels to refuse.
    """
    loaded = loaded_case(files, read_volume(files.image), intensity, nonfinite)
    if spec is not None and files.has_label:
        loaded.label = read_label(files, spec, loaded.volume.geometry, ignore_unknown, atol)
    return loaded


def loaded_case(
    files: CaseFiles, volume: Volume, intensity: Intensity, nonfinite: Literal["refuse", "replace"] = "refuse"
) -> LoadedCase:
    """A case's image already read (from its file, or an array in memory), with its modality and normalisation.

    Raises:
        DatasetError: non-finite voxels to refuse, or an unknown modality.
    """
    if nonfinite == "replace":
        volume, replaced = replace_nonfinite(volume)
    else:
        replaced = 0
        if count := count_nonfinite(volume):
            raise DatasetError(
                f"{files.image}: {count} voxel(s) are NaN or infinite; training and evaluation data must be finite "
                "(fix the file, or pass skip_bad_cases=True to leave the case out)"
            )
    modality = detect_modality(volume) if files.modality == "auto" else files.modality
    if modality not in MODALITIES:
        raise DatasetError(f"case {files.case_id!r}: modality {modality!r}, expected one of {MODALITIES} or 'auto'")
    return LoadedCase(files, volume, modality, intensity.bounds(volume, modality), None, replaced)
