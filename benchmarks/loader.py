"""Loader benchmark (section ``loader`` of ``make bench``): training samples per second per loader worker against
what a GPU consumes.

It writes its own realistic CTs (``--shape``, default 512 x 512 x 300 at 0.78 x 0.78 x 1.5 mm, int16 .nii.gz with
organs, bone and scanner noise, labels in the unified ids), preprocesses them to the 0.8 mm plan with
``delinea preprocess``'s function, and measures, per worker (one process, one torch thread, as a DataLoader worker
runs):

* samples/s at 256² and 512², with and without the paper's augmentation, from the source files with the volumes
  already read (``nifti_warm``), counting the whole-volume reads each sampler configuration makes
  (``nifti_cold``: the warm time plus reads per case x seconds per read / slices per case), and from the store;
* whole-volume reads per case per epoch in each sampler configuration (workers, ranks, micro-batches, resolution
  cycles), replaying the batch sampler's batches through one LRU volume cache per worker, as
  :class:`~delinea.datamodules.dataset.SliceDataset` keeps;
* worker memory (the process's anonymous resident memory grown while serving: cached volumes, augmentation);
* preprocessing seconds and store bytes per case against the ``.nii.gz``;
* against the demand of an A6000 and an H100 (estimated from FLOPs; docs: DESIGN 2c), the workers per GPU.

``--baseline REF`` (e.g. the commit before this work) times the same requests with that commit's code
(``git archive``) in processes interleaved with the current ones, and counts its sampler's reads: the "before".

    python benchmarks/loader.py [--cases 6] [--shape 512 512 300] [--baseline REF] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "loader.json"
SPACING = (0.78, 0.78, 1.5)
PLAN_MM = 0.8
#: Training samples per second one GPU consumes (FLOPs of delinea's modules at the paper's size, activation
#: checkpointing, L_seg on 80 % of samples, 40 % of dense bf16 peak; issue #23 and DESIGN 2c).
DEMAND = {"A6000": {256: 20.0, 512: 5.0}, "H100": {256: 127.0, 512: 30.0}}
#: The sampler configurations whose whole-volume reads are counted: (name, workers, ranks, windows, micro-batches,
#: accumulate). The paper's pretraining: windows [256, 512], micro-batches {256: 32, 512: 8}, 20 per step.
CONFIGS = [
    ("1 worker, 256", 1, 1, [256], None, 1),
    ("8 workers, 256", 8, 1, [256], None, 1),
    ("8 workers, 256/512", 8, 1, [256, 512], None, 1),
    ("8 workers, micro-batches 256", 8, 1, [256], {256: 32}, 1),
    ("8 workers, paper mix (micro-batches)", 8, 1, [256, 512], {256: 32, 512: 8}, 20),
    ("8 ranks x 3 workers, paper mix", 3, 8, [256, 512], {256: 32, 512: 8}, 20),
]


# -- data ------------------------------------------------------------------------------------------------------


def write_ct(image_path: Path, label_path: Path, seed: int, shape: Sequence[int]) -> None:
    """A CT-like case: a body with fat, muscle, spine and the eight organs (HU), scanner noise, stored int16
    ``.nii.gz`` in LPS (as DICOM converters write), labels in the unified ids."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in shape)
    x = (np.arange(nx) - nx / 2) * SPACING[0]
    y = (np.arange(ny) - ny / 2) * SPACING[1]
    gx, gy = np.meshgrid(x, y, indexing="ij")
    body = (gx / (nx * SPACING[0] * 0.42)) ** 2 + (gy / (ny * SPACING[1] * 0.3)) ** 2
    organs = [  # (unified id, HU, centre x, y in fractions of the body's half-axes, radii in mm, z share)
        (5, 60, -0.45, 0.05, (80, 70), (0.2, 0.8)), (7, 50, 0.55, 0.1, (40, 35), (0.3, 0.7)),
        (3, 150, 0.35, 0.45, (30, 25), (0.1, 0.5)), (4, 155, -0.35, 0.45, (30, 25), (0.1, 0.45)),
        (1, 200, 0.05, 0.35, (12, 12), (0.0, 1.0)), (6, 45, 0.05, -0.05, (50, 15), (0.3, 0.5)),
        (8, 10, 0.3, -0.35, (45, 35), (0.5, 0.85)), (2, 5, -0.25, -0.4, (15, 12), (0.35, 0.5)),
    ]  # fmt: skip
    image = np.empty((nx, ny, nz), np.int16)
    label = np.zeros((nx, ny, nz), np.uint8)
    texture = rng.normal(0, 25, (nx // 8 + 1, ny // 8 + 1))
    smooth = np.kron(texture, np.ones((8, 8)))[:nx, :ny]  # fat and muscle texture
    half = (nx * SPACING[0] * 0.42, ny * SPACING[1] * 0.3)
    for k in range(nz):
        share = k / max(1, nz - 1)
        slice_ = np.where(body <= 1, np.where(body > 0.8, 40.0, -90.0) + smooth, -1000.0)
        spine = ((gx / 18) ** 2 + ((gy - half[1] * 0.7) / 18) ** 2) <= 1
        slice_[spine] = 700.0
        for unified, hu, cx, cy, (rx, ry), (z0, z1) in organs:
            if z0 <= share <= z1:
                taper = np.sin(np.pi * (share - z0) / max(z1 - z0, 1e-6)) ** 0.5
                inside = (
                    ((gx - cx * half[0]) / (rx * taper + 1)) ** 2 + ((gy - cy * half[1]) / (ry * taper + 1)) ** 2
                ) <= 1
                slice_[inside] = hu
                label[:, :, k][inside] = unified
        slice_ += rng.normal(0, 12, slice_.shape)  # scanner noise
        image[:, :, k] = np.clip(np.round(slice_), -1024, 3071)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-nx / 2 * SPACING[0], -ny / 2 * SPACING[1], 0.0]
    # Stored in LPS, as DICOM converters write: x and y reversed, the affine saying so.
    stored_affine = affine @ np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    for array, path, dtype in ((image, image_path, np.int16), (label, label_path, np.uint8)):
        path.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(np.ascontiguousarray(array[::-1, ::-1]).astype(dtype), stored_affine)
        img.set_qform(stored_affine, code=1)
        img.set_sform(stored_affine, code=1)
        img.header.set_data_dtype(dtype)
        nib.save(img, str(path))


def make_data(root: Path, cases: int, shape: Sequence[int]) -> float:
    """The cases under ``root/images`` and ``root/labels`` (kept when already there); seconds spent."""
    started = time.perf_counter()
    for i in range(cases):
        image, label = root / "images" / f"ct{i:02d}.nii.gz", root / "labels" / f"ct{i:02d}.nii.gz"
        if not (image.exists() and label.exists()):
            write_ct(image, label, i, shape)
    return time.perf_counter() - started


# -- one worker's rates (run in a process of its own, with the code tree under test first on the path) -------------


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_rates(options: dict[str, Any]) -> dict[str, Any]:
    """Samples/s of one worker for every (source, window, augment) asked for, interleaved, one torch thread."""
    import torch

    from delinea.datamodules import FolderDataModule

    torch.set_num_threads(1)
    out: dict[str, Any] = {"rates": {}, "memory_mib": {}}
    modules = {}
    for source in options["sources"]:
        for augment in (False, True):
            kwargs = dict(root=options["root"], split="all", spacing=PLAN_MM, resolution=[256, 512], augment=augment,
                          split_file=options["split_file"], cache_cases=options["cache_cases"])  # fmt: skip
            if options.get("has_store"):
                kwargs["store"] = source == "store"
            modules[(source, augment)] = FolderDataModule(**kwargs).dataset("train")
    rng = np.random.default_rng(options["seed"])
    some = modules[next(iter(modules))]
    warm_cases = min(options["cache_cases"], len(some.files))
    eligible = np.flatnonzero(some.case_of < warm_cases)
    requests = [
        (int(i), int(s))
        for i, s in zip(rng.choice(eligible, options["count"]), rng.integers(0, 2**31, options["count"]))
    ]
    reads = []
    for (source, augment), dataset in modules.items():  # warm: volumes read (and timed), memory measured
        before = _anon_mib()
        for number in range(warm_cases):
            if source == "nifti" and not augment:
                start = time.perf_counter()
                dataset.case(number)
                dataset.box(number, dataset.case(number))
                reads.append(time.perf_counter() - start)
            elif source == "nifti":
                dataset._cache, dataset._boxes = modules[(source, False)]._cache, modules[(source, False)]._boxes
        for window in (256, 512):
            for index, seed in requests[:3]:
                dataset[(index, window, seed)]
        out["memory_mib"][f"{source}{'_augment' if augment else ''}"] = round(_anon_mib() - before, 1)
    out["read_seconds"] = reads
    times: dict[str, list[float]] = {}
    for _ in range(options["rounds"]):
        for (source, augment), dataset in modules.items():
            for window in (256, 512):
                key = f"{source}|{window}|{augment}"
                start = time.perf_counter()
                for index, seed in requests:
                    dataset[(index, window, seed)]
                times.setdefault(key, []).append(len(requests) / (time.perf_counter() - start))
    out["rates"] = times
    return out


def run_worker(tree: Path, options: dict[str, Any]) -> dict[str, Any]:
    """:func:`worker_rates` in a fresh process with ``tree`` first on the path (its own delinea)."""
    env = os.environ | {"PYTHONPATH": f"{tree}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(options)],
        env=env, capture_output=True, text=True, cwd=tree,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"worker in {tree} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- reads per case per epoch ----------------------------------------------------------------------------------


def worker_reads(
    batches: Sequence[Sequence[Sequence[int]]], case_of: np.ndarray, workers: int, cache_cases: int
) -> Counter:
    """Whole-volume reads per case when loader worker ``i % workers`` serves batch ``i`` (the DataLoader's round
    robin) and each worker keeps its ``cache_cases`` most recently read volumes (SliceDataset's LRU cache)."""
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(max(1, workers))]
    reads: Counter = Counter()
    for i, batch in enumerate(batches):
        cache = caches[i % max(1, workers)]
        for request in batch:
            case = int(case_of[int(request[0])])
            if case in cache:
                cache.move_to_end(case)
                continue
            reads[case] += 1
            cache[case] = None
            while len(cache) > cache_cases:
                cache.popitem(last=False)
    return reads


def reads_per_case(sampler_class: Any, case_of: np.ndarray, cache_cases: int = 4) -> list[dict[str, Any]]:
    """Whole-volume reads per case in one epoch (cold caches) for each of :data:`CONFIGS`."""
    rows = []
    for name, workers, ranks, windows, micro, accumulate in CONFIGS:
        total = 0
        for rank in range(ranks):
            options: dict[str, Any] = {"resolutions": windows, "shuffle": True, "seed": 0, "block_cases": cache_cases,
                                       "lanes": workers, "num_replicas": ranks, "rank": rank}  # fmt: skip
            if micro is not None:
                options |= {"micro_batch_sizes": micro, "accumulate": accumulate}
            sampler = sampler_class(None, 32, False, case_of=case_of, **options)
            total += sum(worker_reads(list(sampler), case_of, workers, cache_cases).values())
        rows.append({"configuration": name, "reads_per_case": round(total / len(np.unique(case_of)), 2)})
    return rows


def _load_sampler(tree: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"samplers_{abs(hash(tree))}", tree / "delinea/datamodules/samplers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SliceBatchSampler


# -- the section -----------------------------------------------------------------------------------------------


def run(
    cases: int = 6,
    shape: Sequence[int] = (512, 512, 300),
    count: int = 20,
    rounds: int = 3,
    baseline: str | None = None,
    data_dir: Path | None = None,
    realistic_cases: int = 200,
) -> dict[str, Any]:
    """The whole section; returns the JSON-ready result."""
    from delinea.datamodules import FolderDataModule
    from delinea.datamodules.samplers import SliceBatchSampler
    from delinea.preprocess import preprocess

    temporary = tempfile.TemporaryDirectory()
    work = Path(data_dir) if data_dir is not None else Path(temporary.name)
    root = work / "data"
    generate_s = make_data(root, cases, shape)
    nifti_mb = statistics.median(p.stat().st_size for p in (root / "images").glob("*.nii.gz")) / 2**20
    split_file = work / "split.json"
    store = work / "split.store"
    if store.exists() and (store / "store.json").exists() and data_dir is None:
        raise RuntimeError(f"{store} exists")
    dm = FolderDataModule(
        root=str(root), split="all", spacing=PLAN_MM, resolution=[256, 512], split_file=str(split_file)
    )
    summary = preprocess(dm, processes=1, echo=lambda line: None)
    depth = int(shape[2])
    result: dict[str, Any] = {
        "cases": cases, "shape": list(shape), "spacing_mm": list(SPACING), "plan_mm": PLAN_MM,
        "nifti_mb_per_case": round(nifti_mb, 1), "generate_seconds": round(generate_s, 1),
        "preprocess": {"seconds_per_case": summary["seconds_per_case"],
                       "read_seconds_per_case": summary["read_seconds_per_case"],
                       "store_mb_per_case": round((summary["bytes_per_case"] or 0) / 2**20, 1) if summary["written"]
                       else round(_store_mb(store) / cases, 1)},
        "count": count, "rounds": rounds, "baseline": baseline,
    }  # fmt: skip
    trees = {"current": ROOT}
    if baseline is not None:
        trees["baseline"] = _checkout(baseline, work / "baseline")
    options = {"root": str(root), "split_file": str(split_file), "count": count, "rounds": 1, "seed": 0,
               "cache_cases": 4, "has_store": True, "sources": ["nifti", "store"]}  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for r in range(rounds):  # processes interleaved: current, baseline, current, ...
        for name, tree in trees.items():
            own = options | {"seed": r}
            if name == "baseline":
                own |= {"has_store": False, "sources": ["nifti"], "split_file": str(work / "baseline_split.json")}
            runs[name].append(run_worker(tree, own))
    # Reads per case per epoch: this benchmark's cases, and a dataset of realistic size (only the case list matters).
    small = np.repeat(np.arange(cases), depth)
    large = np.repeat(np.arange(realistic_cases), depth)
    samplers = {"current": SliceBatchSampler} | ({"baseline": _load_sampler(trees["baseline"])} if baseline else {})
    reads = {
        name: {"bench_cases": reads_per_case(cls, small), f"{realistic_cases}_cases": reads_per_case(cls, large)}
        for name, cls in samplers.items()
    }
    result["reads"] = reads
    result["rows"] = _rows(runs, reads, depth)
    result["memory_mib"] = {name: _median_dict([run["memory_mib"] for run in rs]) for name, rs in runs.items()}
    result["read_seconds"] = {
        name: round(statistics.median(s for run in rs for s in run["read_seconds"]), 3) for name, rs in runs.items()
    }
    result["ratios"] = _ratios(runs)
    result["workers_per_gpu"] = _workers(result["rows"])
    temporary.cleanup()
    return result


def _store_mb(store: Path) -> float:
    return sum(p.stat().st_size for p in store.glob("cases/*/*.npy")) / 2**20


def _checkout(ref: str, target: Path) -> Path:
    """``ref``'s tree (``git archive``) in ``target``."""
    if not (target / "delinea").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "delinea"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def _median_dict(items: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(item[key] for item in items), 1) for key in items[0]}


def _rows(runs: dict[str, list[dict[str, Any]]], reads: dict[str, Any], depth: int) -> list[dict[str, Any]]:
    rows = []
    for name, rs in runs.items():
        read_s = statistics.median(s for run in rs for s in run["read_seconds"])
        paper = next(r for r in reads[name]["bench_cases"] if r["configuration"].startswith("8 workers, paper"))
        for key in rs[0]["rates"]:
            source, window, augment = key.split("|")
            rate = statistics.median(v for run in rs for v in run["rates"][key])
            row = {"code": name, "source": source, "window": int(window), "augment": augment == "True",
                   "samples_per_s": round(rate, 1)}  # fmt: skip
            if source == "nifti":  # the reads of the paper's configuration, spread over the case's slices
                cold = 1 / (1 / rate + paper["reads_per_case"] * read_s / depth)
                rows.append(row | {"source": "nifti_warm"})
                rows.append(row | {"source": "nifti_cold", "samples_per_s": round(cold, 1)})
            else:
                rows.append(row)
    return rows


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Paired ratios (median over rounds) of the store against the source files, and against the baseline."""
    out = {}
    current = runs["current"]
    for window in (256, 512):
        for augment in (False, True):
            store = [run["rates"][f"store|{window}|{augment}"][0] for run in current]
            nifti = [run["rates"][f"nifti|{window}|{augment}"][0] for run in current]
            out[f"store_over_nifti_warm_{window}{'_augment' if augment else ''}"] = round(
                statistics.median(s / n for s, n in zip(store, nifti)), 2
            )
            if "baseline" in runs:
                base = [run["rates"][f"nifti|{window}|{augment}"][0] for run in runs["baseline"]]
                out[f"store_over_baseline_warm_{window}{'_augment' if augment else ''}"] = round(
                    statistics.median(s / b for s, b in zip(store, base)), 2
                )
    return out


def _workers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Workers per GPU at 256², 512² and the paper's mix (as many samples at each size) for each source."""
    out = []
    for code in sorted({r["code"] for r in rows}):
        for source in ("nifti_cold", "store"):
            rate = {
                r["window"]: r["samples_per_s"]
                for r in rows
                if r["code"] == code and r["source"] == source and r["augment"]
            }
            if len(rate) < 2:
                continue
            for gpu, demand in DEMAND.items():
                mix = (1 / rate[256] + 1 / rate[512]) / (1 / demand[256] + 1 / demand[512])
                out.append(
                    {
                        "code": code,
                        "source": source,
                        "gpu": gpu,
                        "workers_256": round(demand[256] / rate[256], 2),
                        "workers_512": round(demand[512] / rate[512], 2),
                        "workers_paper_mix": round(mix, 2),
                        "workers_8_gpus_paper_mix": round(8 * mix, 1),
                    }
                )
    return out


def render(result: dict[str, Any]) -> str:
    """The section's markdown tables."""
    from benchmarks.common import table

    shape = "x".join(map(str, result["shape"]))
    text = table(
        result["rows"], ["code", "source", "window", "augment", "samples_per_s"],
        f"8. Loader: samples/s per worker (1 torch thread), {result['cases']} CTs of {shape} at "
        f"{result['spacing_mm'][0]} mm, plan {result['plan_mm']} mm",
    )  # fmt: skip
    for name, by_size in result["reads"].items():
        for size, rows in by_size.items():
            text += "\n" + table(
                rows,
                ["configuration", "reads_per_case"],
                f"8b. Whole-volume reads per case per epoch ({name} sampler, {size})",
            )
    text += "\n" + table(
        result["workers_per_gpu"],
        ["code", "source", "gpu", "workers_256", "workers_512", "workers_paper_mix", "workers_8_gpus_paper_mix"],
        "8c. Loader workers per GPU (augmentation on)",
    )
    p = result["preprocess"]
    text += (
        f"\nPreprocessing: {p['seconds_per_case']} s per case ({p['read_seconds_per_case']} s of it reading), store "
        f"{p['store_mb_per_case']} MB per case against {result['nifti_mb_per_case']} MB of .nii.gz. Whole-volume read: "
        f"{result['read_seconds']} s. Worker memory (MiB, anonymous RSS grown; 4 cached volumes from .nii.gz): "
        f"{result['memory_mib']}. Ratios (paired, medians over rounds): {result['ratios']}.\n"
    )
    return text


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, met or not."""
    rate = {(r["code"], r["source"], r["window"], r["augment"]): r["samples_per_s"] for r in result["rows"]}
    out: dict[str, Any] = {}
    for window, floor in ((256, 50), (512, 25)):
        value = rate.get(("current", "store", window, True))
        out[f"store_{window}_augmented_at_least_{floor}_per_s"] = {
            "value": value,
            "met": value is not None and value >= floor,
        }
    for window in (256, 512):
        key = f"store_over_baseline_warm_{window}"
        if key in result["ratios"]:
            out[f"store_{window}_unaugmented_at_least_10x_before"] = {
                "value": result["ratios"][key],
                "met": result["ratios"][key] >= 10,
            }
    worst = {size: max(r["reads_per_case"] for r in rows) for size, rows in result["reads"]["current"].items()}
    out["nifti_reads_per_case_at_most_1.5"] = {"value": worst, "met": all(v <= 1.5 for v in worst.values())}
    memory = result["memory_mib"]["current"].get("store_augment")
    out["store_worker_memory_at_most_300_mb"] = {
        "value": memory,
        "met": memory is not None and memory * 1.048576 <= 300,
    }
    h100 = next(
        (
            w
            for w in result["workers_per_gpu"]
            if w["code"] == "current" and w["source"] == "store" and w["gpu"] == "H100"
        ),
        None,
    )
    if h100 is not None:
        out["8_h100_paper_mix_at_most_3_workers_per_gpu"] = {
            "value": h100["workers_paper_mix"],
            "met": h100["workers_paper_mix"] <= 3,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--count", type=int, default=20, help="samples per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved processes per code tree")
    parser.add_argument("--baseline", default=None, help="a git ref whose loader is timed as 'before'")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the generated CTs and the store here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker_rates(json.loads(args.worker))))
        return
    sys.path.insert(0, str(ROOT))
    result = run(args.cases, args.shape, args.count, args.rounds, args.baseline, args.data_dir)
    result["targets"] = targets(result)
    print(render(result))
    print(json.dumps(result["targets"], indent=1))
    RESULTS.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
