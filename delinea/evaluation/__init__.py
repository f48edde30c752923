"""Evaluation: per-case 3D metrics (Dice, HD95, ASSD) and the reports built from them."""

from delinea.evaluation.metrics import OrganMetrics, case_metrics, empty_penalty, surface_distances

__all__ = ["OrganMetrics", "case_metrics", "empty_penalty", "surface_distances"]
