"""Aggregate per-case metrics into the paper's tables, write them into a run folder, and draw overlays.

The flow at the end of ``delinea test``::

    rows = case_rows(case_id, case_metrics(pred, gt, spacing, labelled))   # per case, on each rank
    rows = gather_rows(rows)                                                # every rank: all cases once
    paths = write_reports(rows, run_dir)                                    # rank 0 only

Means: per organ, the mean over the cases where the organ is evaluated (status ``ok``, ``pred_empty`` or
``gt_empty``; one-sided empties enter with Dice 0 and the distance penalty); mDSC / mHD95 / mASSD are the
mean over organs of those per-organ means, over organs evaluated in at least one case (so on a single-organ
dataset mDSC is that organ's DSC). ``both_empty`` and ``unlabelled`` pairs are excluded and counted.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from delinea.evaluation.metrics import EVALUATED, STATUSES, OrganMetrics
from delinea.labels import FOREGROUND, ORGAN_IDS, PALETTE
from delinea.outputs import atomic_path, write_atomic

METRICS: tuple[str, ...] = ("dice", "hd95", "assd")
CSV_COLUMNS: tuple[str, ...] = ("case", "organ", "status", "dice", "hd95", "assd")


class Row(TypedDict):
    """One (case, organ) result: a row of the per-case CSV."""

    case: str
    organ: str
    status: str
    dice: float
    hd95: float
    assd: float


def case_rows(case_id: str, metrics: Mapping[str, OrganMetrics]) -> list[Row]:
    """Flatten :func:`delinea.evaluation.metrics.case_metrics` output of one case into rows."""
    return [
        Row(case=str(case_id), organ=organ, status=m["status"], dice=m["dice"], hd95=m["hd95"], assd=m["assd"])
        for organ, m in metrics.items()
    ]


def gather_rows(rows: Sequence[Row]) -> list[Row]:
    """Collect rows from every DDP rank so each (case, organ) is counted once; identity without DDP.

    Uses ``torch.distributed.all_gather_object`` when a process group is initialised (every rank gets the
    full list). Duplicates -- ``DistributedSampler`` pads the last batch by repeating cases -- are dropped,
    keeping the lowest rank's row (a stochastic sampler may give a repeated case slightly different numbers).
    The result is sorted by case id, then organ id, so it does not depend on the world size.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(rows))
        flat = [row for part in gathered for row in part]
    else:
        flat = list(rows)
    unique: dict[tuple[str, str], Row] = {}
    for row in flat:
        unique.setdefault((row["case"], row["organ"]), row)
    return sorted(unique.values(), key=lambda r: (r["case"], ORGAN_IDS.get(r["organ"], 0)))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(rows: Iterable[Row]) -> dict[str, Any]:
    """Per-organ means and mDSC / mHD95 / mASSD with counts, as a JSON-ready dict (None where undefined).

    Returns:
        ``{"organs": {organ: {"dice", "hd95", "assd", "n", "pred_empty", "gt_empty", "both_empty",
        "unlabelled"}}, "mDSC", "mHD95", "mASSD", "excluded": {"both_empty", "unlabelled"}, "penalised",
        "cases"}``. Dice is a fraction in [0, 1], distances in mm; ``n`` counts the cases that enter the
        organ's mean; ``penalised`` counts one-sided empty pairs scored with the distance penalty.
    """
    rows = list(rows)
    organs = list(FOREGROUND) + sorted({r["organ"] for r in rows} - set(FOREGROUND))
    per_organ: dict[str, dict[str, Any]] = {}
    for organ in organs:
        mine = [r for r in rows if r["organ"] == organ]
        unknown = {r["status"] for r in mine} - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown status {sorted(unknown)} for organ {organ!r}; expected one of {STATUSES}")
        used = [r for r in mine if r["status"] in EVALUATED]
        entry: dict[str, Any] = {m: _mean([float(r[m]) for r in used]) for m in METRICS}  # type: ignore[literal-required]  # METRICS are Row's number keys
        entry["n"] = len(used)
        for status in ("pred_empty", "gt_empty", "both_empty", "unlabelled"):
            entry[status] = sum(r["status"] == status for r in mine)
        per_organ[organ] = entry
    evaluated = [e for e in per_organ.values() if e["n"] > 0]
    return {
        "organs": per_organ,
        "mDSC": _mean([e["dice"] for e in evaluated]),
        "mHD95": _mean([e["hd95"] for e in evaluated]),
        "mASSD": _mean([e["assd"] for e in evaluated]),
        "excluded": {
            "both_empty": sum(e["both_empty"] for e in per_organ.values()),
            "unlabelled": sum(e["unlabelled"] for e in per_organ.values()),
        },
        "penalised": sum(e["pred_empty"] + e["gt_empty"] for e in per_organ.values()),
        "cases": len({r["case"] for r in rows}),
    }


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.2f}"


def markdown_table(summary: Mapping[str, Any], method: str = "delinea") -> str:
    """The per-organ table (organs as rows) and the paper-style one-line table (organs as columns).

    Dice is shown in %, HD95 and ASSD in mm; "–" marks an organ evaluated in no case.
    """
    organs = summary["organs"]
    lines = [
        "| organ | n | Dice (%) | HD95 (mm) | ASSD (mm) |",
        "|---|---:|---:|---:|---:|",
    ]
    for organ, e in organs.items():
        lines.append(f"| {organ} | {e['n']} | {_fmt(e['dice'], 100)} | {_fmt(e['hd95'])} | {_fmt(e['assd'])} |")
    lines.append(
        f"| **mean** | {summary['cases']} cases | **{_fmt(summary['mDSC'], 100)}** | "
        f"**{_fmt(summary['mHD95'])}** | **{_fmt(summary['mASSD'])}** |"
    )
    header = ["Method", "mDSC (%) ↑", "mHD95 (mm) ↓", "mASSD (mm) ↓", *organs]
    row = [method, _fmt(summary["mDSC"], 100), _fmt(summary["mHD95"]), _fmt(summary["mASSD"])]
    row += [_fmt(e["dice"], 100) for e in organs.values()]
    excluded = summary["excluded"]
    return "\n".join(
        [
            *lines,
            "",
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
            "| " + " | ".join(row) + " |",
            "",
            f"Organ columns: Dice (%). Excluded (case, organ) pairs: {excluded['both_empty']} both empty, "
            f"{excluded['unlabelled']} unlabelled. {summary['penalised']} pairs with one empty mask are scored "
            "Dice 0 and HD95 = ASSD = the diagonal of the volume's extent (mm).",
            "",
        ]
    )


def _check_free(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")


def write_per_case_csv(rows: Iterable[Row], path: str | Path, overwrite: bool = False) -> Path:
    """One line per (case, organ); NaN (not evaluated) is written as ``nan``."""
    path = Path(path)
    _check_free([path], overwrite)
    with atomic_path(path) as temporary, temporary.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            # repr keeps full precision and writes NaN as "nan"
            writer.writerow({k: (repr(float(row[k])) if k in METRICS else row[k]) for k in CSV_COLUMNS})  # type: ignore[literal-required]  # CSV_COLUMNS are Row's keys
    return path


def write_reports(
    rows: Sequence[Row], run_dir: str | Path, overwrite: bool = False, prefix: str = "metrics", method: str = "delinea"
) -> dict[str, Path]:
    """Write ``<prefix>_per_case.csv``, ``<prefix>_summary.json`` and ``<prefix>_table.md`` into ``run_dir``.

    Every target is checked before anything is written, so a refusal leaves the folder untouched.

    Raises:
        FileExistsError: naming the first existing file, unless ``overwrite`` is True.
    """
    run_dir = Path(run_dir)
    paths = {
        "csv": run_dir / f"{prefix}_per_case.csv",
        "json": run_dir / f"{prefix}_summary.json",
        "markdown": run_dir / f"{prefix}_table.md",
    }
    _check_free(paths.values(), overwrite)
    summary = summarize(rows)
    write_per_case_csv(rows, paths["csv"], overwrite=True)
    # allow_nan=False: summarize() uses None for undefined means, so the file is strict JSON
    write_atomic(paths["json"], json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_atomic(paths["markdown"], markdown_table(summary, method=method))
    return paths


def _display(slice2d: np.ndarray, radiological: bool) -> np.ndarray:
    """(X, Y) slice of an RAS+ array -> (rows, cols) for imshow: anterior up, patient right on the
    viewer's left when ``radiological`` (on the right otherwise)."""
    out = slice2d.T[::-1]  # rows = Y from anterior (top) to posterior
    return out[:, ::-1] if radiological else out


def _overlay_rgba(labels: np.ndarray, alpha: float) -> np.ndarray:
    """Palette colours, translucent inside each organ and opaque on its outline (white spleen and grey
    stomach would otherwise vanish on a CT)."""
    colours = ((PALETTE.numpy() + 1.0) / 2.0).clip(0, 1)  # palette lives in the VAE's [-1, 1] range
    ids = labels.clip(0, len(colours) - 1).astype(np.int64)
    padded = np.pad(ids, 1, mode="edge")
    edge = np.zeros(ids.shape, dtype=bool)
    for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):  # 4-neighbours
        edge |= padded[dr : dr + ids.shape[0], dc : dc + ids.shape[1]] != ids
    rgba = np.zeros((*ids.shape, 4), dtype=np.float32)
    rgba[..., :3] = colours[ids]
    rgba[..., 3] = np.where(ids > 0, np.where(edge, 1.0, alpha), 0.0)
    return rgba


def _pick_slices(counts: np.ndarray, n_slices: int) -> list[int]:
    """The slice with the most foreground in each of ``n_slices`` equal parts of the foreground's z-range,
    so the figure shows the top, middle and bottom of the organs rather than three neighbouring slices."""
    zs = np.flatnonzero(counts)
    if zs.size == 0:
        return [len(counts) // 2]
    picked = set()
    for part in np.array_split(np.arange(zs[0], zs[-1] + 1), min(max(1, n_slices), zs[-1] - zs[0] + 1)):
        picked.add(int(part[np.argmax(counts[part])]))
    return sorted(picked)


def save_overlays(
    image: np.ndarray,
    gt: np.ndarray | None,
    pred: np.ndarray,
    path_prefix: str | Path,
    n_slices: int = 3,
    *,
    spacing: Sequence[float] | None = None,
    radiological: bool = True,
    alpha: float = 0.45,
    overwrite: bool = False,
) -> Path:
    """Save one PNG (``<path_prefix>.png``): a row per axial slice, columns image / ground truth / prediction.

    Slices are along the last axis (Z): the foreground's z-range in ``gt`` (``pred`` when ``gt`` is None) is
    cut into ``n_slices`` parts and each part's slice with the most foreground is shown, in slice order.
    Label colours are the unified palette of ``delinea.labels``.
    Orientation: arrays are assumed RAS+ (nibabel's canonical, as the loaders produce); slices are drawn
    anterior up and, by default, in radiological convention (patient's right on the viewer's left).

    Args:
        image: (X, Y, Z) intensities, any float range (displayed between its 0.5 and 99.5 percentiles).
        gt: (X, Y, Z) unified label ids, or None when there is no ground truth (predict).
        pred: (X, Y, Z) unified label ids.
        path_prefix: output path without the ``.png`` suffix; parent folders are created.
        n_slices: how many slices to show.
        spacing: voxel size in mm (X, Y, Z); sets the pixel aspect ratio. None: square pixels.
        radiological: patient's right on the viewer's left (True) or on the right (False).
        alpha: label opacity.
        overwrite: replace an existing PNG.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, pred = np.asarray(image, dtype=np.float32), np.asarray(pred)
    if image.ndim != 3 or pred.shape != image.shape or (gt is not None and np.shape(gt) != image.shape):
        raise ValueError(
            f"image, gt and pred must be 3D arrays of one shape, got {image.shape}, "
            f"{None if gt is None else np.shape(gt)}, {pred.shape}"
        )
    path = Path(f"{path_prefix}.png")
    _check_free([path], overwrite)
    ref = pred if gt is None else np.asarray(gt)
    slices = _pick_slices((ref > 0).sum(axis=(0, 1)), n_slices)

    panels: list[tuple[str, np.ndarray | None]] = [("image", None), ("ground truth", gt), ("prediction", pred)]
    if gt is None:
        del panels[1]
    vmin, vmax = np.percentile(image, [0.5, 99.5])
    aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
    fig, axes = plt.subplots(len(slices), len(panels), figsize=(3 * len(panels), 3 * len(slices)), squeeze=False)
    fig.patch.set_facecolor("black")  # the palette has white (spleen): a dark page keeps the legend readable
    present: set[int] = set()
    for i, z in enumerate(slices):
        background = _display(image[:, :, z], radiological)
        for j, (title, labels) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(background, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            if labels is not None:
                lab = np.asarray(labels)[:, :, z]
                present.update(int(v) for v in np.unique(lab) if v > 0)
                ax.imshow(_overlay_rgba(_display(lab, radiological), alpha), aspect=aspect, interpolation="nearest")
            ax.set_title(f"{title}, z={z}", fontsize=8, color="white")
            ax.axis("off")
    if present:
        colours = ((PALETTE.numpy() + 1.0) / 2.0).clip(0, 1)
        handles = [Patch(color=colours[c], label=FOREGROUND[c - 1]) for c in sorted(present) if c <= len(FOREGROUND)]
        fig.legend(
            handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7,
            frameon=False, labelcolor="white",
        )  # fmt: skip
    fig.tight_layout(rect=(0, 0.06 if present else 0, 1, 1))
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=100, facecolor=fig.get_facecolor(), format="png")
    finally:
        plt.close(fig)
    return path


__all__ = [
    "Row",
    "case_rows",
    "gather_rows",
    "markdown_table",
    "save_overlays",
    "summarize",
    "write_per_case_csv",
    "write_reports",
]
