"""Pretrain and measure the CPU demo's frozen backbones (delinea/weights/demo).

    # 1. the VAE (writes delinea/weights/demo/vae), then 2. the base DiT on its latents (delinea/weights/demo/dit)
    .venv/bin/python scripts/pretrain_demo_backbones.py fit --config configs/demo/vae.yaml
    .venv/bin/python scripts/pretrain_demo_backbones.py fit --config configs/demo/dit.yaml
    # 3. measure the shipped weights: codec ceiling (held-out CT slab, all MR slices), DiT loss and samples
    .venv/bin/python scripts/pretrain_demo_backbones.py quality --out delinea/weights/demo/quality.json

``fit`` is plain LightningCLI over any LightningModule / LightningDataModule (the configs name
``delinea.tasks.backbones`` classes), run on 2 threads, printing the losses every ``DELINEA_PRINT_EVERY`` steps.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("DELINEA_THREADS", "2")))


def fit(argv: list[str]) -> None:
    from lightning.pytorch import Callback, LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class PrintLosses(Callback):
        """One line per ``every`` steps on stdout (for a log file), and the validation metrics."""

        def __init__(self, every: int) -> None:
            self.every, self.start = every, time.time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step % self.every == 0:
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
                text = " ".join(f"{k.removeprefix('train/')}={v:.4f}" for k, v in sorted(metrics.items()))
                print(f"step {trainer.global_step} {time.time() - self.start:.0f}s {text}", flush=True)

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            text = " ".join(f"{k.removeprefix('val/')}={v:.4f}" for k, v in sorted(metrics.items()))
            print(f"val step {trainer.global_step} {time.time() - self.start:.0f}s {text}", flush=True)

        def on_train_end(self, trainer, module) -> None:  # noqa: ANN001
            print(f"train end step {trainer.global_step} {time.time() - self.start:.0f}s", flush=True)

    every = int(os.environ.get("DELINEA_PRINT_EVERY", "10"))
    LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 trainer_defaults={"callbacks": [PrintLosses(every)]}, args=argv)


def quality(out: str, weights: str = "delinea/weights/demo", root: str = "delinea/sample") -> dict:
    from delinea.models.dit import load_dit
    from delinea.models.vae import MaskVAE, load_vae
    from delinea.tasks.backbones import (CT_HELD_OUT, CT_ORGAN_SLICES, codec_ceiling, denoising_dice, held_out_ct,
                                         load_slices,
                                         sample_masks, sample_statistics)
    from delinea.labels import NUM_CLASSES
    from delinea.models.sampling import training_scheduler

    vae = MaskVAE(load_vae(Path(weights) / "vae"), NUM_CLASSES).eval()
    slab_images, slab = held_out_ct(root)
    train_images, train, train_z = load_slices(root, "ct", "ct", CT_ORGAN_SLICES, CT_HELD_OUT, only_foreground=True)
    mr_images, mr, _ = load_slices(root, "mr", "mr")

    @torch.no_grad()
    def image_error(images: torch.Tensor) -> dict:
        recon = torch.cat([vae.decode_rgb(vae.encode(images[i:i + 16])).mean(1, keepdim=True)
                           for i in range(0, len(images), 16)]).clamp(-1, 1)
        mse = float(((recon - images) ** 2).mean())
        # PSNR with the [-1, 1] range (peak-to-peak 2)
        return {"l1": float((recon - images).abs().mean()), "psnr_db": 10 * float(torch.log10(torch.tensor(4 / mse)))}

    result: dict = {
        "protocol": {"resolution": 128, "ct_held_out_slab": list(CT_HELD_OUT), "ct_train_slices": train_z,
                     "mr_slices": "all 20 (never trained on)"},
        "codec_ceiling": {"ct_held_out_slab": codec_ceiling(vae, slab), "mr_all": codec_ceiling(vae, mr),
                          "ct_train": codec_ceiling(vae, train)},
        "image_reconstruction": {"ct_held_out_slab": image_error(slab_images), "mr_all": image_error(mr_images),
                                 "ct_train": image_error(train_images)},
    }
    dit_dir = Path(weights) / "dit"
    if (dit_dir / "config.json").is_file():
        dit = load_dit(dit_dir).eval()
        schedule = training_scheduler()
        generator = torch.Generator().manual_seed(0)
        losses = {}
        with torch.no_grad():
            for name, masks in (("ct_train", train), ("ct_held_out_slab", slab), ("mr_all", mr)):
                latent = vae.encode_mask(masks).repeat(8, 1, 1, 1)
                t = torch.randint(0, 1000, (len(latent),), generator=generator)
                noise = torch.randn(latent.shape, generator=generator)
                noisy = schedule.add_noise(latent, noise, t)
                rows = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
                pred = dit(noisy, timestep=t, class_labels=torch.full((len(t),), rows - 1)).sample[:, : latent.shape[1]]
                losses[name] = float(((pred - noise) ** 2).mean())
        rgb, masks = sample_masks(dit, vae, count=32, steps=20, seed=0)
        stats = sample_statistics(rgb, masks, train)
        with torch.no_grad():
            reference_rgb = torch.cat([vae.decode_rgb(vae.encode_mask(train[i:i + 16])) for i in range(0, len(train), 16)])
        stats["reference_palette_pixel_fraction"] = sample_statistics(reference_rgb, train, train)["palette_pixel_fraction"]
        stats["sampler"] = "DDIM eta=0, 20 steps, 32 samples, seed 0"
        tweedie = {name: denoising_dice(dit, vae, masks)
                   for name, masks in (("ct_train", train), ("ct_held_out_slab", slab), ("mr_all", mr))}
        result["dit"] = {"eps_mse_8_draws": losses, "tweedie_one_step_mDSC_by_t": tweedie, "samples": stats}
    result["latent_scaling_factor"] = vae.scaling_factor
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "quality":
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("command")
        parser.add_argument("--out", default="delinea/weights/demo/quality.json")
        parser.add_argument("--weights", default="delinea/weights/demo")
        parser.add_argument("--root", default="delinea/sample")
        args = parser.parse_args()
        quality(args.out, args.weights, args.root)
    else:
        fit(sys.argv[1:])
