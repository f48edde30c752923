"""Section ``paper`` (CUDA; part of `make bench` there): the paper's network on the paper's hardware.

The paper's MedDelinea (DiT-XL/2, SD VAE, K = 15) on random weights, zero-initialised layers perturbed so that every
gradient flows: one training step (``losses`` + ``backward`` + ``AdamW.step``) at 256² and 512² with the
configs' micro-batches under bf16 autocast, with and without activation checkpointing: samples/s, peak memory
(``max_memory_allocated``) against the memory plan (:mod:`delinea.models.memory`); and sampling (EulerAncestral,
20 steps, bf16) in seconds per slice and per 100-slice volume (slices in batches of ``volume_batch``), against the
UNet baseline's forward pass. Sized for one GPU in under 8 minutes; tests/test_bench.py runs its code at toy size
on the CPU. The paper quotes 2.88 s per inference on an A6000.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import PeakMemory, autocast, median, sync
from delinea.models.meddelinea import CHECKPOINT_PARTS
from delinea.models.memory import GiB, estimate
from delinea.tasks import MedDelineaTask, UNetTask
from delinea.testing.backbones import pretrained_like

MiB = 2**20


def _batch(n: int, size: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n * size)
    return {
        "image": (torch.rand(n, 1, size, size, generator=g) * 2 - 1).to(device),
        "mask": torch.randint(0, 9, (n, size, size), generator=g).to(device),
        "labelled": torch.ones(n, 9, dtype=torch.bool, device=device),
    }


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run(
    device: torch.device,
    dit: str = "DiT-XL/2",
    vae: str = "sd",
    control_blocks: int = 15,
    micro_batch: dict[int, int] | None = None,
    steps: int = 3,
    sampling_steps: int = 20,
    volume_slices: int = 100,
    volume_batch: int = 8,
    dtype: torch.dtype | None = torch.bfloat16,
    unet_channels: list[int] | None = None,
) -> dict[str, Any]:
    """Training steps per resolution x checkpointing, then sampling against the UNet; see the module docstring."""
    micro_batch = micro_batch or {256: 32, 512: 8}
    torch.manual_seed(0)
    task = MedDelineaTask(dit=dit, vae=vae, image_size=min(micro_batch), control_blocks=control_blocks)
    pretrained_like(task.model, std=0.02, only_zero=True)
    pretrained_like(task.model.control.patch_embed, std=0.02)
    task = task.to(device).train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=2e-5)
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "32-true"
    rows = []
    for resolution, n in sorted(micro_batch.items()):
        batch = _batch(n, resolution, device)
        for parts in ((), CHECKPOINT_PARTS):
            task.model.set_activation_checkpointing(parts)
            plan = estimate(task.model, resolution, n, precision, parts)
            row: dict[str, Any] = {
                "resolution": resolution,
                "micro_batch": n,
                "checkpointing": list(parts),
                "plan_gib": round(plan.peak / GiB, 2),
            }

            def step(batch: dict[str, Any] = batch) -> None:
                with autocast(device, dtype):
                    loss = task.losses(batch, generator=torch.Generator(device).manual_seed(1))["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            try:
                step()  # warm-up (and AdamW's state, which the plan counts)
                seconds = []
                with PeakMemory(device) as peak:
                    for _ in range(steps):
                        sync(device)
                        start = time.perf_counter()
                        step()
                        sync(device)
                        seconds.append(time.perf_counter() - start)
                row |= {
                    "step_s": round(median(seconds), 4),
                    "samples_per_s": round(n / median(seconds), 2),
                    "peak_gib": round((peak.baseline_mib + peak.mib) / 1024, 2),
                }
            except RuntimeError as error:
                if not _out_of_memory(error):
                    raise
                row["out_of_memory"] = True
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
    task.model.set_activation_checkpointing(())
    task.eval()
    sampling = _sampling(task, device, min(micro_batch), sampling_steps, volume_slices, volume_batch, dtype)
    unet = UNetTask(channels=unet_channels) if unet_channels else UNetTask()
    unet = unet.to(device).eval()
    slices = _batch(volume_batch, min(micro_batch), device)["image"]

    def unet_volume() -> None:
        with torch.no_grad(), autocast(device, dtype):
            for _ in range(-(-volume_slices // volume_batch)):
                unet.predict_probabilities(slices)

    unet_volume()
    sync(device)
    start = time.perf_counter()
    unet_volume()
    sync(device)
    unet_seconds = time.perf_counter() - start
    sampling |= {
        "unet_s_per_volume": round(unet_seconds, 3),
        "unet_s_per_slice": round(unet_seconds / volume_slices, 5),
    }
    return {
        "network": f"{dit}, {vae} VAE, K={control_blocks}",
        "precision": precision,
        "rows": rows,
        "sampling": sampling,
    }


def _sampling(
    task: MedDelineaTask,
    device: torch.device,
    resolution: int,
    steps: int,
    volume_slices: int,
    volume_batch: int,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    image = _batch(1, resolution, device)["image"]
    slices = _batch(volume_batch, resolution, device)["image"]
    task.model.sample(image, steps=min(2, steps), dtype=dtype)  # warm-up
    sync(device)
    start = time.perf_counter()
    task.model.sample(image, steps=steps, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    sync(device)
    one = time.perf_counter() - start
    start = time.perf_counter()
    task.model.sample(slices, steps=steps, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    sync(device)
    batched = (time.perf_counter() - start) / volume_batch
    return {
        "resolution": resolution,
        "sampler": "euler_ancestral",
        "steps": steps,
        "s_per_slice": round(one, 4),
        "s_per_slice_batched": round(batched, 4),
        "volume_batch": volume_batch,
        "s_per_volume": round(batched * volume_slices, 2),
        "volume_slices": volume_slices,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"Paper network ({result['network']}, {result['precision']}): one training step",
        "",
        "| res | micro-batch | checkpointing | samples/s | step s | peak GiB | plan GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        parts = ", ".join(row["checkpointing"]) or "none"
        if row.get("out_of_memory"):
            lines.append(
                f"| {row['resolution']} | {row['micro_batch']} | {parts} | out of memory | | | {row['plan_gib']} |"
            )
        else:
            lines.append(
                f"| {row['resolution']} | {row['micro_batch']} | {parts} | {row['samples_per_s']} | {row['step_s']} | "
                f"{row['peak_gib']} | {row['plan_gib']} |"
            )
    s = result["sampling"]
    lines += [
        "",
        f"Sampling at {s['resolution']}² ({s['sampler']}, {s['steps']} steps): {s['s_per_slice']} s for one slice, "
        f"{s['s_per_slice_batched']} s per slice in batches of {s['volume_batch']}, {s['s_per_volume']} s per "
        f"{s['volume_slices']}-slice volume; UNet {s['unet_s_per_volume']} s per volume.",
    ]
    return "\n".join(lines)
