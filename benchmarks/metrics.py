"""Seconds per 512x512x300 case with 8 organs: delinea's case_metrics vs MONAI's HD95 + ASSD.

Run: ``.venv/bin/python benchmarks/metrics.py [--repeats 3] [--shape 512 512 300]``. Prints a markdown table
and writes ``benchmarks/results/metrics.json``. Two synthetic cases on the same grid: ``typical`` (every
organ predicted with a shift and a size error) and ``far_fp`` (the same plus one false-positive voxel per
organ in the far corner, which stretches every organ's bounding box to the whole volume). MONAI is timed
from the label maps too (binary masks per organ, then ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)``: each computes the surfaces and distances itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from delinea.evaluation.metrics import case_metrics
from delinea.labels import FOREGROUND

SPACING = (0.78, 0.78, 1.5)
# (centre, radii) as fractions of the shape: a rough abdominal layout of the 8 organs
ORGANS = {
    1: ((0.50, 0.58, 0.50), (0.025, 0.025, 0.40)),  # aorta
    2: ((0.38, 0.50, 0.55), (0.035, 0.03, 0.08)),  # gallbladder
    3: ((0.66, 0.64, 0.45), (0.06, 0.06, 0.16)),  # kidney_left
    4: ((0.34, 0.64, 0.45), (0.06, 0.06, 0.16)),  # kidney_right
    5: ((0.30, 0.45, 0.60), (0.20, 0.17, 0.25)),  # liver
    6: ((0.52, 0.52, 0.50), (0.12, 0.03, 0.06)),  # pancreas
    7: ((0.72, 0.55, 0.60), (0.07, 0.06, 0.16)),  # spleen
    8: ((0.62, 0.38, 0.62), (0.10, 0.09, 0.15)),  # stomach
}


def label_map(shape: tuple[int, int, int], shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Ellipsoidal organs; ``shift`` moves centres (fraction of the shape), ``scale`` grows the radii."""
    lab = np.zeros(shape, np.uint8)
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    # largest first, so the small organs (gallbladder next to the liver) are not painted over
    for c, (centre, radii) in sorted(ORGANS.items(), key=lambda item: -float(np.prod(item[1][1]))):
        lo = [max(int((ce + shift - r * scale * 1.1) * n), 0) for ce, r, n in zip(centre, radii, shape)]
        hi = [min(int((ce + shift + r * scale * 1.1) * n) + 1, n) for ce, r, n in zip(centre, radii, shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.ix_(*(ax[s] for ax, s in zip(axes, box)))
        inside = sum(((g - (ce + shift) * n) / (r * scale * n)) ** 2 for g, ce, r, n in zip(grid, centre, radii, shape))
        lab[box][inside <= 1] = c
    return lab


def monai_case(pred: np.ndarray, gt: np.ndarray) -> dict[str, tuple[float, float]]:
    out = {}
    for c, organ in enumerate(FOREGROUND, start=1):
        p = torch.from_numpy(pred == c)[None, None].float()
        g = torch.from_numpy(gt == c)[None, None].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(SPACING))
            a = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=list(SPACING))
        out[organ] = (float(h), float(a))
    return out


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--monai-repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "metrics.json")
    args = parser.parse_args()
    shape = tuple(args.shape)

    gt = label_map(shape)
    typical = label_map(shape, shift=0.006, scale=1.04)
    far = typical.copy()
    for c in range(1, 9):  # one far voxel per organ, near the corner opposite the organs
        far[-1 - c, -1, -1] = c
    results: dict[str, dict] = {}
    for name, pred in (("typical", typical), ("far_fp", far)):
        row: dict[str, float] = {}
        for method in ("kdtree", "edt"):
            row[f"delinea_{method}_s"], ours = timed(
                lambda pred=pred, method=method: case_metrics(pred, gt, SPACING, method=method), args.repeats
            )
        row["monai_hd95_assd_s"], theirs = timed(lambda pred=pred: monai_case(pred, gt), args.monai_repeats)
        statuses = {ours[o]["status"] for o in FOREGROUND}
        assert statuses == {"ok"}, f"every organ must be present in both maps, got {statuses}"
        row["max_rel_diff_vs_monai"] = max(
            abs(ours[o][k] - v) / max(abs(v), 1e-9) for o in FOREGROUND for k, v in zip(("hd95", "assd"), theirs[o])
        )
        row["mean_dice"] = float(np.mean([ours[o]["dice"] for o in FOREGROUND]))
        results[name] = row

    report = {
        "shape": shape,
        "spacing_mm": SPACING,
        "organs": 8,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"Seconds per {'x'.join(map(str, shape))} case, 8 organs, spacing {SPACING} mm, {os.cpu_count()} CPUs\n")
    print("| case | delinea (KD-tree, default) | delinea (EDT) | MONAI HD95 + ASSD | speed-up | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['delinea_kdtree_s']:.2f} | {r['delinea_edt_s']:.2f} | {r['monai_hd95_assd_s']:.2f} | "
            f"{r['monai_hd95_assd_s'] / r['delinea_kdtree_s']:.1f}x | {r['max_rel_diff_vs_monai']:.1e} |"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
