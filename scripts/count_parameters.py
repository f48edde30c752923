"""Print parameter counts (total, trainable) of MedDelinea for the DiT presets, as a markdown table.

Built on the meta device: no memory is allocated, so DiT-XL/2 with the SD VAE counts in seconds.
    python scripts/count_parameters.py
"""

from __future__ import annotations

import torch

from delinea.models import MaskVAE, MedDelinea, build_dit, build_vae, count_parameters


def counts(preset: str, vae: str, control_blocks: int, image_size: int = 256) -> tuple[int, int, int, int]:
    with torch.device("meta"):
        mask_vae = MaskVAE(build_vae(vae))
        dit = build_dit(preset, sample_size=image_size // mask_vae.downsampling)
        model = MedDelinea(dit, mask_vae, control_blocks=control_blocks)
    for module in model.frozen_modules():
        module.requires_grad_(False)
    return (
        count_parameters(model),
        count_parameters(model, trainable_only=True),
        count_parameters(model.dit),
        count_parameters(model.vae),
    )


def main() -> None:
    print("| configuration | K | total | trainable | base DiT | VAE + head |")
    print("|---|---|---|---|---|---|")
    rows = [("DiT-XL/2 + SD VAE (paper default)", "DiT-XL/2", "sd", 15)]
    for size, depth in (("S", 12), ("B", 12), ("L", 24), ("XL", 28)):
        for patch in (2, 4, 8):
            # K scaled like the paper's 15 of 28 blocks
            rows.append((f"DiT-{size}/{patch} + SD VAE", f"DiT-{size}/{patch}", "sd", round(depth * 15 / 28)))
    rows.append(("DiT-tiny/2 + tiny VAE (tests)", "DiT-tiny/2", "tiny", 2))
    for name, preset, vae, k in rows:
        total, trainable, dit, vae_count = counts(preset, vae, k)
        print(
            f"| {name} | {k} | {total / 1e6:.1f} M | {trainable / 1e6:.1f} M | {dit / 1e6:.1f} M | "
            f"{vae_count / 1e6:.1f} M |"
        )


if __name__ == "__main__":
    main()
