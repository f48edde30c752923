"""Section 2, inference: the accuracy–speed curve of the samplers on the real CT, and the default chosen from it.

Grid: every scheduler x steps x ensemble, each run once on the held-out slab (10 slices of 128², one batch;
the ensemble multiplies the denoiser's batch) through ``MedDelineaTask.predict_probabilities`` (VAE encoding,
sampling, decoding), seeded as the task seeds it; the slab's mDSC comes from that run. Per slice = slab time / 10;
per volume = per slice x the CT's 112 slices.

Then, side by side with several timed runs each: the whole CT volume (112 slices, chunks of ``chunk`` slices,
resize in, predict, resize out and argmax through ``delinea.Segmenter``) with the chosen
default and with the UNet; and the slab with those two and the task's current default sampler. Precision: the
task's ``inference_dtype`` (``auto``: bf16 autocast on CPUs with native bf16 and on CUDA).

The default: the fastest grid setting whose mDSC is within ``tolerance`` of the best mDSC of the grid.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from benchmarks.common import median, paired_ratio, side_by_side, summary, sync
from benchmarks.models import CTData, slab_dice
from delinea.datamodules.batches import give_plan
from delinea.models.diffusion import SCHEDULERS
from delinea.models.meddelinea import inference_dtype as resolve_inference_dtype
from delinea.segmenter import Segmenter

STEPS = (1, 5, 10, 20, 50)
ENSEMBLES = (1, 5)


def configure(task: Any, scheduler: str, steps: int, ensemble: int) -> None:
    """Set the sampler hyperparameters ``predict_probabilities`` reads."""
    task.hparams.sampler, task.hparams.sampling_steps, task.hparams.ensemble = scheduler, steps, ensemble


def predict_labels(task: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        probabilities, _ = task.predict_probabilities(images.to(device))
    return probabilities.argmax(1)


def segment_volume(task: Any, data: CTData, device: torch.device, chunk: int = 16) -> np.ndarray:
    """Label map of the whole CT on its own grid, as ``delinea test`` makes it: the datamodule's whole slices on the
    plan's lattice, covered by windows and resampled back by the :class:`~delinea.Segmenter`."""
    dm = data.datamodule
    task.set_plan(give_plan(dm, None, "fit"))
    dataset = dm.dataset("test")
    ct = [f.case_id for f in dataset.files].index("ct")
    indices = np.flatnonzero(dataset.case_of == ct).tolist()
    segmenter = Segmenter(task)
    segmenter.start(dm.case_geometry)
    done = []
    for start in range(0, len(indices), chunk):
        batch = default_collate([dataset[i] for i in indices[start : start + chunk]])
        with torch.inference_mode():
            done += segmenter.add(batch)
    segmenter.finish()
    assert len(done) == 1
    return done[0].labels


def grid(
    task: Any,
    data: CTData,
    device: torch.device,
    schedulers: list[str],
    steps: tuple[int, ...],
    ensembles: tuple[int, ...],
) -> list[dict[str, Any]]:
    rows = []
    depth = data.depth
    n = len(data.test_images)
    predict_labels(task, data.test_images[:1], device)  # warm-up
    for scheduler in schedulers:
        for ensemble in ensembles:
            for k in steps:
                configure(task, scheduler, k, ensemble)
                sync(device)
                start = time.perf_counter()
                labels = predict_labels(task, data.test_images, device)
                sync(device)
                seconds = time.perf_counter() - start
                dice = slab_dice(labels, data)
                rows.append(
                    {
                        "scheduler": scheduler,
                        "steps": k,
                        "ensemble": ensemble,
                        "slab_s": round(seconds, 4),
                        "s_per_slice": round(seconds / n, 5),
                        "s_per_volume": round(seconds / n * depth, 3),
                        "mDSC": round(dice["mDSC"], 4),
                        "organs": {o: round(v, 4) for o, v in dice["organs"].items()},
                    }
                )
    return rows


def choose_default(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    best = max(r["mDSC"] for r in rows)
    eligible = [r for r in rows if r["mDSC"] >= best - tolerance]
    return min(eligible, key=lambda r: r["s_per_slice"])


def run(
    md: Any,
    unet: Any,
    data: CTData,
    device: torch.device,
    repeats: int = 3,
    tolerance: float = 0.02,
    schedulers: list[str] | None = None,
    steps: tuple[int, ...] = STEPS,
    ensembles: tuple[int, ...] = ENSEMBLES,
    chunk: int = 16,
) -> dict[str, Any]:
    schedulers = schedulers or list(SCHEDULERS)
    current = {"scheduler": md.hparams.sampler, "steps": md.hparams.sampling_steps, "ensemble": md.hparams.ensemble}
    rows = grid(md, data, device, schedulers, steps, ensembles)
    default = choose_default(rows, tolerance)
    chosen = {"scheduler": default["scheduler"], "steps": default["steps"], "ensemble": default["ensemble"]}
    unet_labels = predict_labels(unet, data.test_images, device)
    unet_dice = slab_dice(unet_labels, data)

    # whole volume, side by side: chosen default, the task's current default, UNet
    def volume(settings: dict[str, Any]) -> Any:
        return lambda: (configure(md, **settings), segment_volume(md, data, device, chunk))

    fns = {"default": volume(chosen), "unet": lambda: segment_volume(unet, data, device, chunk)}
    timing = side_by_side(fns, device, repeats=repeats, warmup=0)
    # and the slab, side by side, for the per-slice figures of the same three
    slab_fns = {
        "default": lambda: (configure(md, **chosen), predict_labels(md, data.test_images, device)),
        "unet": lambda: predict_labels(unet, data.test_images, device),
    }
    if current != chosen:
        slab_fns["task_default"] = lambda: (configure(md, **current), predict_labels(md, data.test_images, device))
    slab = side_by_side(slab_fns, device, repeats=repeats, warmup=1)
    configure(md, **current)
    n = len(data.test_images)
    current_row = next((r for r in rows if all(r[k] == v for k, v in current.items())), None)
    headline = []
    depth = data.depth
    for name, label in (
        ("default", f"MedDelinea, chosen default {chosen}"),
        ("task_default", f"MedDelinea, task's current default {current}"),
        ("unet", "UNet"),
    ):
        if name not in slab:
            continue
        dice = {
            "default": default["mDSC"],
            "unet": round(unet_dice["mDSC"], 4),
            "task_default": current_row["mDSC"] if current_row else None,
        }[name]
        row = {
            "model": label,
            "s_per_slice": round(median(slab[name]["seconds"]) / n, 5),
            "mDSC": dice,
            "slice_vs_unet": round(paired_ratio(slab[name]["seconds"], slab["unet"]["seconds"]), 2),
            "runs": repeats,
        }
        if name in timing:  # measured on the whole volume
            row |= {
                "s_per_volume": round(median(timing[name]["seconds"]), 3),
                "volume_vs_unet": round(paired_ratio(timing[name]["seconds"], timing["unet"]["seconds"]), 2),
            }
        else:  # not run on the volume (it takes long): per slice x slices
            row["s_per_volume"] = f"~{median(slab[name]['seconds']) / n * depth:.1f} (slab x {depth / n:.1f})"
        headline.append(row)
    return {
        "grid": rows,
        "default_sampler": chosen,
        "rule": f"fastest setting with slab mDSC >= best - {tolerance} (best {max(r['mDSC'] for r in rows):.4f})",
        "task_default_sampler": current,
        "default_dice": default["mDSC"],
        "default_seconds_per_volume": round(median(timing["default"]["seconds"]), 3),
        "default_volume_timing": summary(timing["default"]["seconds"]),
        "unet_seconds_per_volume": round(median(timing["unet"]["seconds"]), 3),
        "unet_volume_timing": summary(timing["unet"]["seconds"]),
        "unet_dice": round(unet_dice["mDSC"], 4),
        "unet_organs": {o: round(v, 4) for o, v in unet_dice["organs"].items()},
        "default_over_unet_time": round(paired_ratio(timing["default"]["seconds"], timing["unet"]["seconds"]), 3),
        "headline": headline,
        "inference_dtype": f"{md.hparams.get('inference_dtype', 'auto')} -> "
        f"{resolve_inference_dtype(md.hparams.get('inference_dtype', 'auto'), device) or 'caller'}",
        "volume_slices": data.depth,
        "resolution": data.resolution,
        "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
    }
