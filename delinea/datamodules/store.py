"""The slice store: every case of a dataset brought onto a plan once, so loader workers cut windows from memory maps.

``delinea preprocess`` (:mod:`delinea.preprocess`) writes it, as nnU-Net's ``plan_and_preprocess`` does; ``fit``,
``validate`` and ``test`` read it (``--data.store``, or the store found beside the split). Layout::

    <store>/store.json                 what every stored pixel depends on: plan geometry, normalisation, labels
    <store>/cases/<case>/image.npy     float16 (Z, h, w): slice k of the case on its lattice region, in [-1, 1]
    <store>/cases/<case>/label.npy     uint8 (Z, h, w): the unified label on the same region (labelled cases)
    <store>/cases/<case>/case.json     the completion marker, written last: source fingerprint, region, box

**Why memory-mapped ``.npy``** (the numbers are in ``benchmarks/README.md``): a worker reads a window as a few
hundred row reads from the page cache, with no decompression and no library beyond numpy. Uncompressed, the store
holds only the body box at the plan's spacing, the image in half precision: 3 bytes per stored voxel, about twice
a CT's ``.nii.gz``. A compressed store (blosc2, as nnU-Net v2) would be smaller at the price of a dependency and a
decompression per window.

**Half precision, the same pixels.** Images are stored as float16: in [-1, 1] that is steps of at most 2^-11
(about 0.2 HU in the default CT window). Slices read from the source files are rounded the same way
(:class:`~delinea.datamodules.dataset.SliceDataset`), so a dataset served from its store and from its files gives
identical tensors, and evaluation identical numbers.

**Evaluation keeps the native grid from the source files.** Metrics are computed on each case's own grid: the
case's geometry (header) and its label are read from the source files, once per case and evaluation, as without a
store; the store serves the slices that the model sees.

**Fingerprint: sizes and modification times** of each case's source files (what the case index keys on), not a
content hash: hashing 8,000 CTs would read hundreds of GB again on every check, and a rewritten file changes its
time. A store copied with its source to another machine stays valid when the copy keeps times (``rsync -a``).
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delinea.datamodules.utils import CaseFiles, Intensity, LabelSpec
from delinea.geometry import Plan, Region
from delinea.io import DatasetError
from delinea.outputs import atomic_path, write_atomic

VERSION = 1
FORMAT = "npy-float16"
#: Memory maps a process keeps open (a map costs an mmap and a file header read; pages live in the page cache).
OPEN_CASES = 32


def store_settings(plan: Plan, intensity: Intensity, spec: LabelSpec | None, ignore_unknown: bool) -> dict[str, Any]:
    """Everything the stored pixels depend on besides the source files: the plan's geometry (not its windows),
    the intensity normalisation and the label mapping."""
    return {
        "spacing_mm": dict(plan.spacing),
        "body_margin_mm": plan.body_margin,
        "window_hu": list(intensity.window),
        "percentiles": list(intensity.percentiles),
        "labels": None
        if spec is None
        else {
            "table": {str(k): v for k, v in sorted(spec.table.items())},
            "known": None if spec.known is None else sorted(spec.known),
            "binary": spec.binary,
            "ignore_unknown": bool(ignore_unknown),
        },
    }


def describe_settings(settings: dict[str, Any]) -> str:
    """One line: ``ct 0.8 mm per pixel, body + 10 mm, CT window -175..250 HU, MRI 0.5-99.5 %``."""
    spacing = ", ".join(f"{m} {s:g} mm" for m, s in settings["spacing_mm"].items())
    margin = settings["body_margin_mm"]
    crop = "whole slices" if margin is None else f"body + {margin:g} mm"
    low, high = settings["window_hu"]
    plow, phigh = settings["percentiles"]
    return f"{spacing} per pixel, {crop}, CT window {low:g}..{high:g} HU, MRI {plow:g}-{phigh:g} %"


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings without the spacings, which are compared per case (a plan may name modalities a dataset lacks)."""
    return {k: v for k, v in settings.items() if k != "spacing_mm"}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON whole or not at all (:func:`~delinea.outputs.write_atomic`): a reader (or a killed run) never sees
    half of it."""
    write_atomic(path, json.dumps(data, indent=1))


def _check_case_id(case_id: str) -> str:
    if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise DatasetError(f"case id {case_id!r} cannot name a folder of the store")
    return case_id


class SliceStore:
    """A preprocessed dataset: per case, its slices on the plan's lattice as memory-mapped arrays.

    Args:
        path: the store folder (``store.json`` inside).

    Raises:
        DatasetError: the folder holds no store, or one of another version.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        meta_file = self.path / "store.json"
        try:
            self.meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as error:
            raise DatasetError(
                f"{self.path}: not a delinea slice store ({type(error).__name__}: {error}); make one with "
                "`delinea preprocess`"
            ) from None
        if self.meta.get("version") != VERSION or self.meta.get("format") != FORMAT:
            raise DatasetError(
                f"{self.path}: a store of version {self.meta.get('version')} ({self.meta.get('format')}); this delinea "
                f"reads version {VERSION} ({FORMAT}): run `delinea preprocess` into a new folder"
            )
        self.settings: dict[str, Any] = self.meta["settings"]
        self._records: dict[str, dict[str, Any] | None] = {}
        self._open: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()

    @classmethod
    def create(cls, path: str | Path, settings: dict[str, Any], dataset: str, root: str) -> SliceStore:
        """Open the store at ``path``, making it if the folder has none.

        Raises:
            DatasetError: the folder holds a store made with other settings (nothing is overwritten), or another
                non-empty folder.
        """
        path = Path(path).expanduser()
        if (path / "store.json").exists():
            store = cls(path)
            common = set(store.settings["spacing_mm"]) & set(settings["spacing_mm"])
            if _comparable(store.settings) != _comparable(settings) or any(
                store.settings["spacing_mm"][m] != settings["spacing_mm"][m] for m in common
            ):
                raise DatasetError(
                    f"{path} holds a store made for {describe_settings(store.settings)}; this run needs "
                    f"{describe_settings(settings)}: choose another --data.store, or delete that folder"
                )
            return store
        if path.exists() and any(path.iterdir()):
            raise DatasetError(f"{path} is a non-empty folder without a store.json; choose an empty or new folder")
        (path / "cases").mkdir(parents=True, exist_ok=True)
        meta = {"version": VERSION, "format": FORMAT, "settings": settings, "dataset": dataset, "root": root}
        _write_json(path / "store.json", meta)
        return cls(path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # every process maps its own files
        state["_records"] = {}  # workers serve from the dataset's layouts; markers are read again if asked for
        return state

    # -- cases -----------------------------------------------------------------------------------------------
    def folder(self, case_id: str) -> Path:
        """The folder of one case."""
        return self.path / "cases" / _check_case_id(case_id)

    def record(self, case_id: str) -> dict[str, Any] | None:
        """The completion marker of a case (None until the case is completely written)."""
        if case_id not in self._records:
            try:
                self._records[case_id] = json.loads((self.folder(case_id) / "case.json").read_text())
            except (OSError, ValueError):
                return None
        return self._records[case_id]

    def is_current(self, files: CaseFiles) -> bool:
        """Whether the case is stored from its source files as they are now."""
        record = self.record(files.case_id)
        return record is not None and record["stat"] == files.stat_key()

    def check(
        self, settings: dict[str, Any], plan: Plan, cases: Sequence[CaseFiles], what: str
    ) -> list[dict[str, Any]]:
        """The records of ``cases`` after checking that the store serves them as this run would read them.

        Args:
            settings: :func:`store_settings` of this run.
            plan: this run's plan (each stored case must be at its modality's spacing).
            cases: the cases the run serves.
            what: names the run in messages (``btcv train split``).

        Raises:
            DatasetError: one line: other settings, or cases missing, or source files changed since.
        """
        if _comparable(settings) != _comparable(self.settings):
            raise DatasetError(
                f"store {self.path} was made for {describe_settings(self.settings)}, but the {what} are read at "
                f"{describe_settings(settings)}: run `delinea preprocess` with this run's plan and options into "
                "another --data.store, or pass --data.store false to read the source files"
            )
        missing = [f.case_id for f in cases if self.record(f.case_id) is None]
        changed = [f.case_id for f in cases if f.case_id not in missing and not self.is_current(f)]
        if missing or changed:
            parts = [f"{len(missing)} case(s) missing (e.g. {missing[:3]})"] if missing else []
            parts += (
                [f"{len(changed)} case(s) whose source files changed since (e.g. {changed[:3]})"] if changed else []
            )
            raise DatasetError(
                f"store {self.path} does not match the {what}: {'; '.join(parts)}; run `delinea preprocess` with the "
                "same options again (it redoes only those cases), or pass --data.store false"
            )
        records = [self._records[f.case_id] or {} for f in cases]
        for record in records:
            wanted = plan.spacing_for(record["modality"])
            if abs(record["region"][4] - wanted) > 1e-6 * wanted:
                raise DatasetError(
                    f"store {self.path} holds case {record['case_id']!r} at {record['region'][4]:g} mm per pixel, but "
                    f"the {what} are read at {wanted:g} mm ({plan.describe()}): run `delinea preprocess` with this "
                    "run's plan into another --data.store, or pass --data.store false to read the source files"
                )
        return records

    # -- reading ---------------------------------------------------------------------------------------------
    def arrays(self, case_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The case's image (Z, h, w) float16 and label (Z, h, w) uint8 (None when unlabelled), memory-mapped."""
        if case_id in self._open:
            self._open.move_to_end(case_id)
            return self._open[case_id]
        folder = self.folder(case_id)
        try:
            image = np.load(folder / "image.npy", mmap_mode="r")
            label = np.load(folder / "label.npy", mmap_mode="r") if (folder / "label.npy").exists() else None
        except (OSError, ValueError) as error:
            raise DatasetError(f"store {self.path}: cannot read case {case_id!r} ({error}); preprocess again") from None
        self._open[case_id] = (image, label)
        while len(self._open) > OPEN_CASES:
            self._open.popitem(last=False)
        return image, label

    # -- writing ---------------------------------------------------------------------------------------------
    def write_case(
        self,
        files: CaseFiles,
        modality: str,
        region: Region,
        box: Sequence[int],
        depth: int,
        slices: Iterable[tuple[Any, Any]],
        labelled: bool,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one case and, last, its completion marker; a case killed midway has no marker and is redone.

        Args:
            files: the case's source files (their fingerprint goes in the marker).
            modality: ``ct`` or ``mr``.
            region: the lattice region every slice covers.
            box: the scan's voxels ``(x0, x1, y0, y1)`` the region covers.
            depth: the number of axial slices.
            slices: yields ``(image (h, w) float, label (h, w) int or None)`` for k = 0, 1, ...
            labelled: whether a label is written.
            extra: more fields for the marker (timings).

        Returns:
            The marker.
        """
        folder = self.folder(files.case_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "case.json").unlink(missing_ok=True)
        self._records.pop(files.case_id, None)
        shape = (int(depth), *region.size)
        # Each array whole (atomic_path: temporary names of this process and host, so two processes or nodes writing
        # one case never share a file; flushed to the disk before the rename and before the marker).
        foreground = []
        with contextlib.ExitStack() as stack:
            image_file = stack.enter_context(atomic_path(folder / "image.npy"))
            label_file = stack.enter_context(atomic_path(folder / "label.npy")) if labelled else None
            image = np.lib.format.open_memmap(image_file, "w+", np.float16, shape)
            label = np.lib.format.open_memmap(label_file, "w+", np.uint8, shape) if label_file is not None else None
            for k, (image_slice, label_slice) in enumerate(slices):
                image[k] = np.asarray(image_slice, dtype=np.float16)
                if label is not None and label_slice is not None:
                    label[k] = np.asarray(label_slice, dtype=np.uint8)
                    if label[k].any():
                        foreground.append(k)
            for array in (image, label):
                if array is not None:
                    array.flush()
            del image, label  # the maps are closed before the files are renamed
        if not labelled:
            (folder / "label.npy").unlink(missing_ok=True)
        size = sum((folder / n).stat().st_size for n in ("image.npy", "label.npy") if (folder / n).exists())
        record = {
            "case_id": files.case_id,
            "stat": files.stat_key(),
            "modality": modality,
            "region": [region.x0, region.x1, region.y0, region.y1, region.spacing],
            "box": [int(v) for v in box],
            "slices": int(depth),
            "labelled": labelled,
            "foreground": foreground,
            "bytes": size,
            **(extra or {}),
        }
        _write_json(folder / "case.json", record)
        self._records[files.case_id] = record
        return record
