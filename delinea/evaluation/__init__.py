"""Evaluation: per-case 3D metrics (Dice, HD95, ASSD) and the reports built from them."""

from delinea.evaluation.metrics import (
    OrganMetrics,
    case_metrics,
    dice_from_counts,
    empty_penalty,
    mean_dice,
    overlap_counts,
    surface_distances,
)
from delinea.evaluation.report import (
    Row,
    case_rows,
    gather_rows,
    markdown_table,
    save_overlays,
    summarize,
    write_per_case_csv,
    write_reports,
)

__all__ = [
    "OrganMetrics",
    "Row",
    "case_metrics",
    "case_rows",
    "dice_from_counts",
    "empty_penalty",
    "gather_rows",
    "markdown_table",
    "mean_dice",
    "overlap_counts",
    "save_overlays",
    "summarize",
    "surface_distances",
    "write_per_case_csv",
    "write_reports",
]
