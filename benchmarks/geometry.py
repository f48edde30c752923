"""The plan's geometry: what resampling costs the loader, what sliding windows cost at test time, and what the
mask rule keeps.

    .venv/bin/python benchmarks/geometry.py            # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/geometry.py --quick    # smaller volumes and fewer repeats

Sections (markdown tables on stdout, everything in ``benchmarks/results/geometry.json``):

1. ``loader``: samples per second of ``SliceDataset.__getitem__`` for training windows and whole evaluation
   slices, resampled onto the plan's lattice (this code) against the pre-plan rule (each slice stretched to
   ``window x window``, bilinear image, nearest mask), interleaved in one run, on generated 512 x 512 CTs at
   0.8 mm (plan 1.5 mm, windows 256) and on the bundled 3 mm CT (plan 3 mm, windows 128).
2. ``inference``: seconds per volume of the whole bundled CT (112 slices) for the UNet and MedDelinea (demo-size
   backbones, DDIM 5 steps): one stretched 128² window per slice (before) against sliding windows on the plan's
   lattice at 3 mm (the demo) and at 1.5 mm (a finer plan, more windows), side by side.
3. ``masks``: Dice per organ of the sample labels' round trip native -> plan -> native, and the share of a thin
   line (0.8, 1.6, 2.4 mm wide at 0.8 mm) kept at a 3 mm plan, for the one-hot bilinear rule (this code),
   nearest neighbour and one-hot area averaging.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/geometry.py` from anywhere

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from benchmarks.common import describe_device, median, paired_ratio, side_by_side
from delinea.datamodules import FolderDataModule
from delinea.datamodules.batches import give_plan
from delinea.datamodules.dataset import SliceDataset
from delinea.geometry import Axes, Region, from_lattice, mask_to_lattice
from delinea.labels import FOREGROUND, NUM_CLASSES
from delinea.segmenter import Segmenter
from delinea.tasks import MedDelineaTask, UNetTask
from delinea.testing.phantoms import write_folder

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "delinea" / "sample"
WEIGHTS = ROOT / "delinea" / "demo" / "weights"
RESULTS = Path(__file__).parent / "results" / "geometry.json"


class StretchedSlices(SliceDataset):
    """The rule before the plan, for comparison: every whole slice stretched to ``window x window`` (bilinear,
    antialiased image; nearest mask), whatever its spacing and aspect ratio; evaluation at the first window."""

    stretch = 128

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, window, _ = (key, 0, 0) if isinstance(key, (int, np.integer)) else key
        size = int(window) or self.stretch
        number, k = int(self.case_of[index]), int(self.slice_of[index])
        loaded = self.case(number)
        image = torch.from_numpy(loaded.image_slice(k, self.intensity))[None, None]
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        mask = torch.from_numpy(loaded.label[:, :, k].astype(np.float32))[None, None]
        mask = F.interpolate(mask, size=(size, size), mode="nearest-exact")[0, 0].long()
        return {"image": image, "mask": mask, "case_id": loaded.files.case_id, "slice_index": k}


def _datasets(root: Path, spacing: float, window: int, tmp: Path) -> tuple[SliceDataset, StretchedSlices]:
    dm = FolderDataModule(
        root=str(root), split="all", resolution=window, spacing=spacing, split_file=str(tmp / f"{root.name}.json")
    )
    planned = dm.dataset("train")
    stretched = StretchedSlices.__new__(StretchedSlices)
    stretched.__dict__.update(planned.__dict__)
    stretched.stretch = window
    return planned, stretched


def loader(quick: bool, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """Samples per second of both rules, interleaved."""
    generated = tmp / "ct512"
    shape = (256, 256, 8) if quick else (512, 512, 16)
    write_folder(generated, {f"case{i}": "ct" for i in range(2)}, shape=shape, spacing=(0.8, 0.8, 2.5))
    setups = [
        ("generated CT 0.8 mm, plan 1.5 mm", generated, 1.5, 256),
        ("bundled CT 3 mm, plan 3 mm", SAMPLE, 3.0, 128),
    ]
    rows = []
    for name, root, spacing, window in setups:
        planned, stretched = _datasets(root, spacing, window, tmp)
        count = min(len(planned), 16 if quick else 48)
        for kind, request in (("training window", lambda i, w=window: (i, w, i)), ("whole slice (eval)", lambda i: i)):

            def run(dataset: SliceDataset, request: Any = request, count: int = count) -> None:
                for i in range(count):
                    dataset[request(i)]

            for dataset in (planned, stretched):  # fill both volume caches first: time the slice work only
                dataset[request(0)]
            timing = side_by_side(
                {"plan": lambda p=planned: run(p), "stretch": lambda s=stretched: run(s)},
                torch.device("cpu"),
                repeats=repeats,
                warmup=0,
            )
            rows.append(
                {
                    "data": name,
                    "sample": kind,
                    "plan_per_s": round(count / median(timing["plan"]["seconds"]), 1),
                    "stretch_per_s": round(count / median(timing["stretch"]["seconds"]), 1),
                    "plan_time_over_stretch": round(
                        paired_ratio(timing["plan"]["seconds"], timing["stretch"]["seconds"]), 2
                    ),
                    "samples": count,
                    "runs": repeats,
                }
            )
    return rows


def _models() -> dict[str, Any]:
    torch.manual_seed(0)
    unet = UNetTask(channels=[16, 32, 64, 128, 256], num_res_units=2).eval()
    dit, vae = (str(WEIGHTS / "dit"), str(WEIGHTS / "vae")) if (WEIGHTS / "dit").is_dir() else ("DiT-mini/4", "small")
    md = MedDelineaTask(dit=dit, vae=vae, image_size=128, control_blocks=3, sampler="ddim", sampling_steps=5).eval()
    return {"unet": unet, "meddelinea": md}


def _volume_planned(task: Any, dm: FolderDataModule) -> None:
    dataset = dm.dataset("test")
    ct = [f.case_id for f in dataset.files].index("ct")
    indices = np.flatnonzero(dataset.case_of == ct).tolist()
    segmenter = Segmenter(task)
    segmenter.start(dm.case_geometry)
    for start in range(0, len(indices), 16):
        batch = default_collate([dataset[i] for i in indices[start : start + 16]])
        with torch.inference_mode():
            segmenter.add(batch)
    segmenter.finish()


def _volume_stretched(task: Any, image: np.ndarray) -> None:
    slices = torch.from_numpy(image).permute(2, 0, 1)[:, None]
    for start in range(0, len(slices), 16):
        chunk = F.interpolate(slices[start : start + 16], size=(128, 128), mode="bilinear", antialias=True)
        with torch.inference_mode():
            probabilities, _ = task.predict_probabilities(chunk)
        F.interpolate(probabilities, size=image.shape[:2], mode="bilinear").argmax(1)


def inference(repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """Seconds per CT volume: one stretched window per slice against the plan's sliding windows."""
    models = _models()
    image = FolderDataModule(root=str(SAMPLE), split="all", split_file=str(tmp / "s.json")).load_case("ct").image
    rows = []
    for name, task in models.items():
        fns = {"stretched 128² (before)": lambda task=task: _volume_stretched(task, image)}
        windows = {}
        for spacing in (3.0, 1.5):
            dm = FolderDataModule(
                root=str(SAMPLE),
                split="all",
                resolution=128,
                spacing=spacing,
                modality="ct",
                split_file=str(tmp / f"s{spacing}.json"),
            )
            task.set_plan(give_plan(dm, None, "fit"))
            region = Region.from_tensor(dm.dataset("test")[0]["region"])
            stride = 64
            per_axis = [
                math.ceil((a + b) / stride) - math.floor((a - 128) / stride) - 1
                for a, b in ((region.x0, region.x1), (region.y0, region.y1))
            ]
            label = f"plan {spacing:g} mm, windows 128 (overlap 0.5)"
            windows[label] = per_axis[0] * per_axis[1]
            fns[label] = lambda task=task, dm=dm: _volume_planned(task, dm)
        timing = side_by_side(fns, torch.device("cpu"), repeats=repeats, warmup=0)
        base = "stretched 128² (before)"
        for label, measured in timing.items():
            rows.append(
                {
                    "model": name,
                    "geometry": label,
                    "s_per_volume": round(median(measured["seconds"]), 2),
                    "vs_before": round(paired_ratio(measured["seconds"], timing[base]["seconds"]), 2),
                    "windows_per_slice": windows.get(label, 1),
                    "runs": repeats,
                }
            )
    return rows


def masks() -> dict[str, Any]:
    """Round-trip Dice per organ and thin-line survival, for three mask rules."""
    rules = {
        "one-hot bilinear (delinea)": lambda m, axes, region: mask_to_lattice(m, axes, region, NUM_CLASSES),
        "nearest": _nearest,
        "one-hot area": _area,
    }
    dm = FolderDataModule(root=str(SAMPLE), split="all")
    out: dict[str, Any] = {"round_trip": [], "thin_lines": []}
    for case_id in ("ct", "mr"):
        case = dm.load_case(case_id)
        axes = Axes.of(case.geometry.canonical_affine, case.geometry.canonical_shape)
        box = (0, axes.shape[0], 0, axes.shape[1])
        for target in (1.5, 2.0, 4.5, 6.0):
            region = axes.region(box, target)
            for rule, fn in rules.items():
                back = np.zeros_like(case.label)
                for k in range(case.label.shape[2]):
                    onehot = F.one_hot(fn(case.label[:, :, k], axes, region), NUM_CLASSES).permute(2, 0, 1).float()
                    back[:, :, k] = from_lattice(onehot, region, axes, box).argmax(0).numpy()
                dice = {
                    o: round(
                        float(
                            2 * ((back == c) & (case.label == c)).sum() / ((back == c).sum() + (case.label == c).sum())
                        ),
                        4,
                    )
                    for c, o in enumerate(FOREGROUND, 1)
                }
                out["round_trip"].append(
                    {
                        "case": case_id,
                        "native_mm": 3.0,
                        "plan_mm": target,
                        "rule": rule,
                        "mean": round(float(np.mean(list(dice.values()))), 4),
                        **dice,
                    }
                )
    rng = np.random.default_rng(0)
    axes = Axes((0.0, 0.0), (0.8, 0.8), (400, 400))
    region = axes.region((0, 400, 0, 400), 3.0)
    yy, xx = np.mgrid[:400, :400]
    for width in (1, 2, 3):
        kept = {rule: [] for rule in rules}
        for _ in range(20):
            angle = rng.uniform(0, math.pi)
            distance = np.abs((xx - 200) * math.sin(angle) - (yy - 200) * math.cos(angle))
            line = ((distance <= width / 2) & ((xx - 200) ** 2 + (yy - 200) ** 2 < 150**2)).astype(np.int64)
            along = np.linspace(-140, 140, 200)
            rows = ((200 + along * math.cos(angle)) * 0.8 / 3.0).astype(int) - region.x0
            cols = ((200 + along * math.sin(angle)) * 0.8 / 3.0).astype(int) - region.y0
            for rule, fn in rules.items():
                coarse = F.max_pool2d(fn(line, axes, region)[None, None].float(), 3, 1, 1)[0, 0].numpy()
                kept[rule].append(float(coarse[rows, cols].mean()))  # a coarse pixel (or neighbour) keeps it
        out["thin_lines"].append({"width_mm": width * 0.8, **{r: round(float(np.mean(v)), 3) for r, v in kept.items()}})
    return out


def _nearest(mask: np.ndarray, axes: Axes, region: Region) -> torch.Tensor:
    rows = ((region.x0 + np.arange(region.size[0]) + 0.5) * region.spacing - axes.origin[0]) / axes.spacing[0]
    cols = ((region.y0 + np.arange(region.size[1]) + 0.5) * region.spacing - axes.origin[1]) / axes.spacing[1]
    r = np.clip(np.round(rows).astype(int), 0, mask.shape[0] - 1)
    c = np.clip(np.round(cols).astype(int), 0, mask.shape[1] - 1)
    return torch.from_numpy(np.asarray(mask)[r[:, None], c[None, :]].astype(np.int64))


def _area(mask: np.ndarray, axes: Axes, region: Region) -> torch.Tensor:
    from delinea.geometry import to_lattice

    onehot = F.one_hot(torch.as_tensor(np.asarray(mask)).long(), NUM_CLASSES).permute(2, 0, 1).float()
    return to_lattice(onehot, axes, region, fill=0.0).argmax(0)  # antialiased shares: an area average


def table(rows: list[dict[str, Any]], title: str) -> str:
    columns = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller volumes, fewer repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 3
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.environ.setdefault("DELINEA_SPLIT_DIR", str(tmp))
        result = {
            "device": describe_device(torch.device("cpu")),
            "threads": torch.get_num_threads(),
            "loader": loader(args.quick, repeats, tmp),
        }
        print(
            table(result["loader"], "1. Loader: samples per second, plan lattice vs stretched (same run)"), flush=True
        )
        result["inference"] = inference(repeats, tmp)
        print(table(result["inference"], "2. Test time per CT volume (112 slices), side by side"), flush=True)
        result["masks"] = masks()
    print(table(result["masks"]["round_trip"], "3a. Round trip native 3 mm -> plan -> native: Dice per organ"))
    print(table(result["masks"]["thin_lines"], "3b. Share of a thin line kept at a 3 mm plan (native 0.8 mm)"))
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
