"""A small per-case index kept next to the split file, so large datasets are inspected once, not every run.

For each case it records what setup and planning need: the number of axial slices, the in-plane spacing, the
modality (read from the image only when the dataset says ``auto``), the error that makes the case bad (if
any), and, when asked for, which slices hold foreground. Entries are keyed by the sizes and modification
times of the case's files, so an edited or replaced file is inspected again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from delinea.datamodules.utils import (
    CaseFiles,
    Intensity,
    LabelSpec,
    check_case,
    detect_modality,
    load_case_files,
    read_label,
)
from delinea.errors import OutputError
from delinea.io import DatasetError, read_volume
from delinea.outputs import write_atomic

log = logging.getLogger(__name__)
VERSION = 2


class CaseIndex:
    """Per-case facts cached in a JSON file (or only in memory when ``path`` is None or not writable).

    Args:
        path: the JSON file.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("version") == VERSION:
                    self.entries = data["cases"]
            except (OSError, ValueError, KeyError, AttributeError) as error:
                log.warning("ignoring unreadable case index %s (%s)", path, error)

    def inspect(
        self,
        cases: Sequence[CaseFiles],
        needs_label: bool,
        spec: LabelSpec | None = None,
        foreground: bool = False,
        atol: float = 1e-3,
        ignore_unknown: bool = False,
        threads: int = 1,
        verify: bool = False,
        nonfinite: Literal["refuse", "replace"] = "refuse",
        modality: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """Entries for ``cases``, inspecting (in ``threads`` threads) those missing or stale, then saving.

        Each entry holds ``slices`` (int), ``spacing`` (canonical in-plane spacing in mm, two floats),
        ``modality`` (``ct``/``mr``), ``error`` (str or None) and, with ``foreground``, ``foreground`` (the axial
        indices holding any labelled voxel; reading every label also checks its ids). ``verify`` reads every case
        whole, as the loader will (truncated data, NaN voxels under ``nonfinite="refuse"``, label ids), and
        records ``verified``. ``modality`` reads the image of a case whose modality is ``auto`` to detect it (planning
        needs it; a loader detects it where it reads the case anyway).
        """
        todo, fresh_ids = [], set()
        options = _options(atol, ignore_unknown)
        for files in cases:
            entry = self.entries.get(files.case_id)
            fresh = (
                entry is not None
                and entry.get("stat") == files.stat_key()
                and entry.get("options") == options
                and bool(entry.get("needs_label")) >= needs_label
            )
            if fresh:
                fresh_ids.add(files.case_id)
            if (
                entry is None
                or not fresh
                or (foreground and entry.get("error") is None and entry.get("foreground") is None)
                or (verify and entry.get("error") is None and entry.get("verified") != nonfinite)
                or (modality and entry.get("error") is None and entry.get("modality") == "auto")
            ):
                todo.append(files)
        if todo:

            def work(f: CaseFiles) -> dict[str, Any]:
                # What an earlier call found of the same files stays; only the missing reads are made.
                old = self.entries[f.case_id] if f.case_id in fresh_ids else {}
                known_foreground = old.get("foreground") is not None
                known_modality = f.modality == "auto" and old.get("modality", "auto") != "auto"  # detected
                entry = _inspect(f, needs_label or bool(old.get("needs_label")), spec,
                                 foreground and not known_foreground, atol, ignore_unknown,
                                 modality and not known_modality)  # fmt: skip
                if entry["error"] is None:
                    entry.update({k: old[k] for k in ("foreground", "verified") if k in old and k not in entry})
                    entry["modality"] = old["modality"] if known_modality else entry["modality"]
                if verify and entry["error"] is None and entry.get("verified") != nonfinite:
                    try:
                        intensity = Intensity()  # the checks do not depend on the normalisation
                        load_case_files(f, spec if f.has_label else None, intensity, ignore_unknown, atol, nonfinite)
                        entry["verified"] = nonfinite
                    except DatasetError as error:
                        entry["error"] = str(error)
                return entry

            if threads > 1 and len(todo) > 1:  # reading is mostly gzip and file I/O, which release the GIL
                with ThreadPoolExecutor(threads) as pool:
                    results = list(pool.map(work, todo))
            else:
                results = [work(f) for f in todo]
            for files, entry in zip(todo, results):
                self.entries[files.case_id] = entry
            self.save()
        return {f.case_id: self.entries[f.case_id] for f in cases}

    def save(self) -> None:
        """Write the index atomically; a read-only location only costs the cache."""
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps({"version": VERSION, "cases": self.entries}))
        except OutputError as error:
            log.info("case index not saved to %s (%s)", self.path, error)


def _inspect(
    files: CaseFiles,
    needs_label: bool,
    spec: LabelSpec | None,
    foreground: bool,
    atol: float,
    ignore_unknown: bool,
    modality: bool = False,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "stat": files.stat_key(),
        "options": _options(atol, ignore_unknown),
        "needs_label": needs_label,
        "slices": 0,
        "spacing": None,
        "modality": files.modality,
        "error": None,
    }
    try:
        geometry = check_case(files, needs_label, atol)
        entry["slices"] = int(geometry.canonical_shape[2])
        entry["spacing"] = [float(geometry.spacing[0]), float(geometry.spacing[1])]
        if modality and files.modality == "auto":
            entry["modality"] = detect_modality(read_volume(files.image))
        if foreground and spec is not None:
            label = read_label(files, spec, geometry, ignore_unknown, atol)
            entry["foreground"] = np.flatnonzero(label.any(axis=(0, 1))).tolist()
    except DatasetError as error:
        entry["error"] = str(error)
    return entry


def _options(atol: float, ignore_unknown: bool) -> str:
    """The checking options an entry's verdict depends on."""
    return f"atol={atol:g};ignore_unknown={ignore_unknown}"
