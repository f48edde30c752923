"""Loader throughput: slices per second of the pixel pipeline on generated volumes, at resolution 256.

Writes synthetic CT/MR cases (320 x 320 x 40, .nii.gz) to a temporary folder, then times one training epoch
of :class:`~delinea.datamodules.FolderDataModule` (volume reads, normalisation, resize, optional MONAI
augmentation, collation) with 0 and 2 workers. Prints a markdown table and writes
``benchmarks/results/loader.json``. The latent cache is not involved.

    python benchmarks/loader.py [--cases 8] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from delinea.datamodules import FolderDataModule
from delinea.testing.phantoms import write_folder

RESULTS = Path(__file__).parent / "results" / "loader.json"


def run(root: Path, workers: int, augment: bool, batch_size: int, resolution: int | list[int]) -> dict:
    """Time one full training epoch; returns slices/s and the time to the first batch."""
    dm = FolderDataModule(
        root=str(root), resolution=resolution, batch_size=batch_size, num_workers=workers, augment=augment, split="all"
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    start = time.perf_counter()
    first = None
    slices = 0
    for batch in loader:
        slices += batch["image"].shape[0]
        if first is None:
            first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return {
        "workers": workers,
        "augment": augment,
        "resolution": resolution,
        "slices": slices,
        "seconds": round(elapsed, 3),
        "slices_per_s": round(slices / elapsed, 1),
        "first_batch_s": round(first or 0.0, 3),
    }


def main() -> None:
    """Generate data, run every configuration, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=[320, 320, 40])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DELINEA_SPLIT_DIR", tmp)
        root = Path(tmp) / "data"
        cases = {f"case{i:02d}": ("ct" if i % 2 == 0 else "mr") for i in range(args.cases)}
        t = time.perf_counter()
        write_folder(root, cases, shape=args.shape)
        print(f"wrote {args.cases} cases of {tuple(args.shape)} in {time.perf_counter() - t:.1f} s")
        rows = [
            run(root, workers, augment, args.batch_size, resolution)
            for resolution in (256, [256, 512])
            for augment in (False, True)
            for workers in (0, 2)
        ]
    print("\n| resolution | augment | workers | slices/s | first batch (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {r['augment']} | {r['workers']} | {r['slices_per_s']} | {r['first_batch_s']} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "cases": args.cases,
        "shape": args.shape,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        # A shared machine: the load average says how many other processes competed for the cores.
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
