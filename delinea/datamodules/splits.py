"""Case-level, seeded splits written to JSON so that every later stage reads the same split.

Where the file goes when ``split_file`` is not given: ``$DELINEA_SPLIT_DIR`` if set, else
``$XDG_CACHE_HOME/delinea/splits`` (``~/.cache/delinea/splits``), named
``<dataset>-<hash of the absolute root>-seed<seed>.json``. Not inside the data root, which is often
read-only or shared; keyed by root so two copies of a dataset do not share a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from delinea.errors import OutputError
from delinea.io import DatasetError
from delinea.outputs import write_atomic

SPLITS = ("train", "val", "test")


def default_split_path(name: str, root: str | Path, seed: int) -> Path:
    """The default split file for dataset ``name`` at ``root`` and ``seed`` (see the module docstring)."""
    base = os.environ.get("DELINEA_SPLIT_DIR")
    if base is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(cache) / "delinea" / "splits")
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return Path(base) / f"{name}-{digest}-seed{seed}.json"


def make_split(case_ids: Sequence[str], ratios: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Split case ids by a seeded permutation into train/val/test with ``ratios`` (summing to 1).

    Every split with a positive ratio gets at least one case when there are enough cases, and train always
    gets at least one. ``train`` keeps the permutation order, so its first k cases are a seeded subset and
    smaller fractions are nested in larger ones (:func:`take_fraction`).
    """
    ids = sorted(set(case_ids))
    if not ids:
        raise ValueError("cannot split an empty list of cases")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n = len(ids)
    counts = {}
    for split, ratio in zip(SPLITS[1:], ratios[1:]):
        counts[split] = max(1, round(ratio * n)) if ratio > 0 else 0
    while counts["val"] + counts["test"] > n - 1:  # keep one training case: drop test first, then val
        key = "test" if counts["test"] > 0 else "val"
        counts[key] -= 1
    val = order[: counts["val"]]
    test = order[counts["val"] : counts["val"] + counts["test"]]
    train = order[counts["val"] + counts["test"] :]
    return {"train": train, "val": sorted(val), "test": sorted(test)}


def load_or_create_split(
    path: Path, case_ids: Sequence[str], ratios: Sequence[float], seed: int, meta: dict | None = None
) -> dict[str, list[str]]:
    """Read the split at ``path`` if it exists, else make one and write it there (atomically).

    Raises:
        DatasetError: the file is not a valid split, or it names cases that are not in the dataset.
    """
    path = Path(path)
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DatasetError(f"{path}: cannot read the split file ({error}); fix or delete it") from error
        if not isinstance(data, dict) or not all(isinstance(data.get(s, []), list) for s in SPLITS):
            raise DatasetError(f"{path}: a split file must be a JSON object with lists 'train', 'val', 'test'")
        split = {s: [str(c) for c in data.get(s, [])] for s in SPLITS}
        check_disjoint(split, path)
        known = set(case_ids)
        missing = sorted({c for s in SPLITS for c in split[s]} - known)
        if missing:
            raise DatasetError(
                f"{path}: the split names {len(missing)} case(s) not found in the dataset: {missing[:10]}; "
                "was it made for another root? Delete it or pass another split_file"
            )
        return split
    split = make_split(case_ids, ratios, seed)
    data = {**(meta or {}), "seed": seed, "ratios": list(ratios), **split}
    # Written whole and renamed: ranks that race here never read a half-written split.
    try:
        write_atomic(path, json.dumps(data, indent=1))
    except OutputError as error:
        base = os.environ.get("DELINEA_SPLIT_DIR")
        hint = f"set DELINEA_SPLIT_DIR (now {base}) to a writable folder" if base else "set DELINEA_SPLIT_DIR"
        raise DatasetError(
            f"split file {error}; a new split is kept where every later stage reads it: {hint}, or pass "
            "--data.split_file"
        ) from None
    return split


def check_disjoint(split: dict[str, list[str]], path: str | Path) -> None:
    """Refuse a split that lists a case twice (it would train twice) or in two subsets (a test case trained on).

    Raises:
        DatasetError: naming the file, the case and the subsets.
    """
    where: dict[str, list[str]] = {}
    for subset in SPLITS:
        for case in split[subset]:
            where.setdefault(case, []).append(subset)
    repeated = {case: subsets for case, subsets in where.items() if len(subsets) > 1}
    if repeated:
        case, subsets = next(iter(repeated.items()))
        listed = " and ".join(sorted(set(subsets)))
        kind = f"twice in {subsets[0]}" if len(set(subsets)) == 1 else f"in {listed}"
        more = f" (and {len(repeated) - 1} more case(s))" if len(repeated) > 1 else ""
        raise DatasetError(
            f"{path}: case {case!r} is listed {kind}{more}; each case belongs to one subset, once: fix the split file"
        )


def take_fraction(train: Sequence[str], fraction: float) -> list[str]:
    """The first ``max(1, round(fraction * n))`` training cases in split order (a seeded, nested subset)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not train:
        return []
    k = max(1, math.floor(fraction * len(train) + 0.5))
    return list(train[:k])
