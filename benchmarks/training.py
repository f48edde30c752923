"""Section 1, training throughput: slices/s and peak memory of one optimiser step.

Three ways to train, measured side by side in one process on the same batch of real sample-CT slices:

* ``encode``: MedDelinea encoding image and mask through the frozen VAE every step (``latent_cache=None``);
* ``cache``: MedDelinea reading both latents from the on-disk latent cache (filled before timing);
* ``unet``: the MONAI UNet baseline (:class:`~delinea.tasks.UNetTask`, default channels 16..256);
* ``cache_bf16`` (CPUs with native bf16): the cached mode under bf16 autocast, i.e. ``precision: bf16-mixed``.

One step is ``task.losses(batch)`` + ``backward`` + ``AdamW.step`` (the data loader is not timed: see
``benchmarks/loader.py``). Both MedDelinea modes use the same task object and draw the same timesteps and noise
(a seeded generator chosen so that exactly half of the batch has t < ``seg_max_timestep``, the expected share:
those samples also pay for the L_seg decoder pass). On CUDA the step runs under bf16 autocast.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from benchmarks.common import autocast, flash_attention, median, memory_method, paired_ratio, side_by_side
from delinea.datamodules import FolderDataModule
from delinea.models import count_parameters
from delinea.tasks import MedDelineaTask, UNetTask

SAMPLE = Path(__file__).resolve().parents[1] / "delinea" / "sample"


@dataclass(frozen=True)
class Preset:
    """A MedDelinea size: base DiT preset, VAE preset and K copied blocks."""

    name: str
    dit: str
    vae: str
    control_blocks: int


# At 256²: the sd VAE (f=8) gives 32² latents and DiT-S/2, DiT-B/2 see 256 tokens (DiT-XL/2-256's geometry);
# the tiny preset is the CPU-demo scale, the small VAE (f=4) with patch 4 gives the same 256 tokens.
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "DiT-tiny/4", "small", 2),
    "S": Preset("S", "DiT-S/2", "sd", 6),
    "B": Preset("B", "DiT-B/2", "sd", 6),
    # for tests and --quick: every part at toy size
    "toy": Preset("toy", "DiT-tiny/2", "tiny", 2),
}


def sample_batch(resolution: int, batch_size: int, first_slice: int = 86) -> dict[str, Any]:
    """``batch_size`` consecutive axial slices of the sample CT from ``first_slice`` (organs in every one),
    unaugmented, with their cache keys: training windows of ``resolution`` pixels at the spacing that makes the
    CT's 366 mm field of view fill the window (as a finer-spaced scan would)."""
    dm = FolderDataModule(
        root=str(SAMPLE),
        resolution=resolution,
        batch_size=batch_size,
        split="all",
        spacing=366.0 / resolution,
        split_file=str(Path(tempfile.gettempdir()) / "delinea_bench_split.json"),
    )
    dataset = dm.dataset("test")
    ct = [i for i in range(len(dataset)) if dataset.files[int(dataset.case_of[i])].case_id == "ct"]
    start = ct[0] + first_slice
    return default_collate([dataset[(i, resolution, 0)] for i in range(start, start + batch_size)])


def balanced_seed(batch_size: int, max_timestep: int, device: torch.device) -> int:
    """The first seed whose ``torch.randint(0, 1000, (n,))`` (what ``losses`` draws first) puts exactly
    ``round(n * max_timestep / 1000)`` timesteps below ``max_timestep``."""
    want = round(batch_size * max_timestep / 1000)
    for seed in range(10_000):
        t = torch.randint(0, 1000, (batch_size,), generator=torch.Generator(device).manual_seed(seed), device=device)
        if int((t < max_timestep).sum()) == want:
            return seed
    raise RuntimeError("no balanced seed found")


class _DeviceCache:
    """Moves cached latents to the model's device: ``LatentCache`` returns CPU tensors when every slice hits."""

    def __init__(self, cache: Any, device: torch.device) -> None:
        self.cache, self.device = cache, device

    def get_or_compute(self, keys: Any, compute: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.cache.get_or_compute(keys, compute)
        return image.to(self.device), mask.to(self.device)


def _stepper(
    task: torch.nn.Module,
    batch: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype | None,
    seed: int | None = None,
) -> Any:
    trainable = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step() -> float:
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        with autocast(device, dtype), flash_attention(device):
            loss = task.losses(batch, generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def run_preset(
    preset: Preset,
    device: torch.device,
    resolution: int = 256,
    batch_size: int = 2,
    repeats: int = 3,
    dtype: torch.dtype | None = None,
    unet_channels: list[int] | None = None,
    seg_loss_weight: float = 1.0,
    bf16_row: bool = False,
) -> dict[str, Any]:
    """Slices/s and peak memory of the three modes for one preset, measured side by side; ``bf16_row`` adds
    ``cache_bf16``, the cached mode under bf16 autocast (Lightning's ``precision: bf16-mixed``)."""
    torch.manual_seed(0)
    batch = sample_batch(resolution, batch_size)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with tempfile.TemporaryDirectory(prefix="delinea_bench_cache_") as folder:
        task = MedDelineaTask(
            dit=preset.dit,
            vae=preset.vae,
            image_size=resolution,
            control_blocks=preset.control_blocks,
            latent_cache=folder,
            seg_loss_weight=seg_loss_weight,
        ).to(device)
        task.train()
        cache = _DeviceCache(task.latent_cache, device)
        unet = UNetTask(**({"channels": unet_channels} if unet_channels else {})).to(device)
        unet.train()
        seed = balanced_seed(batch_size, task.hparams.seg_max_timestep, device)
        step_md = _stepper(task, batch, device, dtype, seed)
        step_md_bf16 = _stepper(task, batch, device, torch.bfloat16, seed)
        step_unet = _stepper(unet, batch, device, dtype)

        def encode() -> float:
            task.latent_cache = None
            return step_md()

        def cached() -> float:
            task.latent_cache = cache
            return step_md()

        def cached_bf16() -> float:
            task.latent_cache = cache
            return step_md_bf16()

        # Warm-up: one cached step fills the cache (all misses: it encodes, as the encode mode does), one step
        # each of the others builds the kernels and the optimizer state before the memory baseline.
        modes = {"encode": encode, "cache": cached} | ({"cache_bf16": cached_bf16} if bf16_row else {})
        modes["unet"] = step_unet
        cached()
        for fn in modes.values():
            fn()
        hits_before = cache.cache.hits
        timing = side_by_side(modes, device, repeats=repeats, warmup=0, memory=True)
        hits = cache.cache.hits - hits_before
        seg_max = int(task.hparams.seg_max_timestep)
        params = {
            "dit": count_parameters(task.model.dit),
            "vae": count_parameters(task.model.vae.vae),
            "trainable": count_parameters(task, trainable_only=True),
            "unet": count_parameters(unet),
        }
        task = unet = None  # free the models before the next preset (the closures must not see a deleted name)
    label = preset.name + (" (L_diff only)" if seg_loss_weight == 0 else "")
    rows = []
    for mode in timing:
        seconds = timing[mode]["seconds"]
        rows.append(
            {
                "preset": label if mode != "unet" else "UNet",
                "mode": mode,
                "dit": preset.dit if mode != "unet" else "–",
                "vae": preset.vae if mode != "unet" else "–",
                "resolution": resolution,
                "batch": batch_size,
                "step_s": round(median(seconds), 4),
                "slices_per_s": round(batch_size / median(seconds), 3),
                "peak_mib": round(timing[mode]["peak_mib"], 1),
                "vs_encode": round(paired_ratio(timing["encode"]["seconds"], seconds), 3),
                "runs": len(seconds),
            }
        )
    return {
        "preset": label,
        "dit": preset.dit,
        "vae": preset.vae,
        "control_blocks": preset.control_blocks,
        "resolution": resolution,
        "batch": batch_size,
        "parameters": params,
        "rows": rows,
        "cache_speedup": round(paired_ratio(timing["encode"]["seconds"], timing["cache"]["seconds"]), 3),
        "cache_speedup_of_medians": round(median(timing["encode"]["seconds"]) / median(timing["cache"]["seconds"]), 3),
        "unet_over_cache": round(paired_ratio(timing["cache"]["seconds"], timing["unet"]["seconds"]), 3),
        "bf16_speedup_of_cache": (
            round(paired_ratio(timing["cache"]["seconds"], timing["cache_bf16"]["seconds"]), 3)
            if "cache_bf16" in timing
            else None
        ),
        "cache_hits_in_timed_steps": hits,
        "seg_loss_weight": seg_loss_weight,
        "timesteps_below_seg_max": f"{round(batch_size * seg_max / 1000)} of {batch_size}",
    }


def run(
    device: torch.device,
    presets: list[str],
    resolution: int = 256,
    batch_size: int = 2,
    repeats: int = 3,
    dtype: torch.dtype | None = None,
    unet_channels: list[int] | None = None,
    diff_only_presets: tuple[str, ...] = (),
    bf16_row: bool = False,
) -> dict[str, Any]:
    """Every preset's table; ``diff_only_presets`` are measured again with L_diff only (seg_loss_weight 0)."""
    results = [
        run_preset(PRESETS[p], device, resolution, batch_size, repeats, dtype, unet_channels, bf16_row=bf16_row)
        for p in presets
    ]
    extra = [
        run_preset(PRESETS[p], device, resolution, batch_size, repeats, dtype, unet_channels, seg_loss_weight=0.0)
        for p in diff_only_presets
    ]
    return {
        "presets": results,
        "diff_only": extra,
        "memory": memory_method(device),
        "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
    }
