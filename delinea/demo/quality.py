"""Measure the demo's shipped backbones and write ``weights/quality.json``.

    python -m delinea.demo.quality [--out delinea/demo/weights/quality.json]

Codec ceiling (held-out CT slab, all MR slices, CT training slices), image reconstruction error, the base DiT's
ε-MSE, its unconditional samples against the training masks and its one-step Tweedie Dice by t; about 30 s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from delinea.demo.protocol import (
    CT_HELD_OUT,
    CT_ORGANS,
    SAMPLE,
    WEIGHTS,
    codec_ceiling,
    denoising_dice,
    held_out_ct,
    load_slices,
    sample_masks,
    sample_statistics,
)
from delinea.labels import NUM_CLASSES
from delinea.models.diffusion import NoiseSchedule, null_class
from delinea.models.dit import load_dit
from delinea.models.vae import MaskVAE, load_vae


@torch.no_grad()
def measure(weights: Path = WEIGHTS) -> dict[str, Any]:
    """Every figure of ``quality.json`` for the backbones in ``weights`` (``vae/`` and, if present, ``dit/``)."""
    vae = MaskVAE(load_vae(weights / "vae"), NUM_CLASSES).eval()
    slab_images, slab = held_out_ct()
    train_images, train, train_z = load_slices(SAMPLE, "ct", "ct", CT_ORGANS, CT_HELD_OUT, only_foreground=True)
    mr_images, mr, _ = load_slices(SAMPLE, "mr", "mr")

    def image_error(images: torch.Tensor) -> dict[str, float]:
        recon = torch.cat(
            [vae.decode_rgb(vae.encode(images[i : i + 16])).mean(1, keepdim=True) for i in range(0, len(images), 16)]
        ).clamp(-1, 1)
        mse = float(((recon - images) ** 2).mean())
        return {"l1": float((recon - images).abs().mean()), "psnr_db": 10 * float(torch.log10(torch.tensor(4 / mse)))}

    result: dict[str, Any] = {
        "protocol": {
            "windows": "128 px at 3 mm, centred on each slice's body box",
            "ct_held_out_slab": list(CT_HELD_OUT),
            "ct_train_slices": train_z,
            "mr_slices": "all 20 (never trained on)",
        },
        "codec_ceiling": {
            "ct_held_out_slab": codec_ceiling(vae, slab),
            "mr_all": codec_ceiling(vae, mr),
            "ct_train": codec_ceiling(vae, train),
        },
        "image_reconstruction": {
            "ct_held_out_slab": image_error(slab_images),
            "mr_all": image_error(mr_images),
            "ct_train": image_error(train_images),
        },
        "latent_scaling_factor": vae.scaling_factor,
    }
    if (weights / "dit" / "config.json").is_file():
        dit = load_dit(weights / "dit").eval()
        schedule = NoiseSchedule()
        generator = torch.Generator().manual_seed(0)
        losses = {}
        for name, masks in (("ct_train", train), ("ct_held_out_slab", slab), ("mr_all", mr)):
            latent = vae.encode_mask(masks).repeat(8, 1, 1, 1)
            t = schedule.timesteps(len(latent), generator=generator)
            noise = torch.randn(latent.shape, generator=generator)
            labels = torch.full((len(t),), null_class(dit))
            pred = dit(schedule.add_noise(latent, noise, t), timestep=t, class_labels=labels).sample
            losses[name] = float(((pred[:, : latent.shape[1]] - noise) ** 2).mean())
        rgb, masks = sample_masks(dit, vae, count=32, steps=20, seed=0)
        stats = sample_statistics(rgb, masks, train)
        reference = torch.cat([vae.decode_rgb(vae.encode_mask(train[i : i + 16])) for i in range(0, len(train), 16)])
        stats["reference_palette_pixel_fraction"] = sample_statistics(reference, train, train)["palette_pixel_fraction"]
        stats["sampler"] = "DDIM eta=0, 20 steps, 32 samples, seed 0"
        tweedie = {
            name: denoising_dice(dit, vae, masks)
            for name, masks in (("ct_train", train), ("ct_held_out_slab", slab), ("mr_all", mr))
        }
        result["dit"] = {"eps_mse_8_draws": losses, "tweedie_one_step_mDSC_by_t": tweedie, "samples": stats}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m delinea.demo.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="folder with vae/ and dit/")
    parser.add_argument("--out", type=Path, default=WEIGHTS / "quality.json")
    args = parser.parse_args(argv)
    result = measure(args.weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
