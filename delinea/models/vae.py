"""The frozen VAE with a trainable class-logit head in place of its RGB output layer.

Masks travel through the VAE as palette RGB images (:data:`delinea.labels.PALETTE`). The decoder's last conv
(features -> RGB) is kept frozen as ``rgb_out``; a new conv ``head`` (features -> one logit per class) is
initialised from it so that at initialisation its argmax is nearest-palette decoding of the RGB output:
``logit_c = 2 p_c . rgb - |p_c|^2 = -|rgb - p_c|^2 + |rgb|^2`` is linear in rgb.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from delinea.labels import PALETTE, mask_to_rgb
from delinea.models.weights import is_weight_file, load_weights, read_weights
from delinea.outputs import atomic_files

# AutoencoderKL sizes: (block_out_channels, layers_per_block, norm_num_groups). ``sd`` is the Stable Diffusion
# VAE (f=8) that sd-vae-ft-ema uses; ``tiny`` (f=2) is for tests.
VAE_SIZES: dict[str, tuple[tuple[int, ...], int, int]] = {
    "tiny": ((8, 16), 1, 4),
    "small": ((32, 64, 64), 1, 16),
    "sd": ((128, 256, 512, 512), 2, 32),
}


def build_vae(preset: str = "sd", latent_channels: int = 4, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A randomly initialised diffusers ``AutoencoderKL`` from a preset name."""
    if preset not in VAE_SIZES:
        raise ValueError(f"unknown VAE preset {preset!r}; expected one of {', '.join(VAE_SIZES)}")
    channels, layers, groups = VAE_SIZES[preset]
    return vae_from_sizes(channels, layers, groups, latent_channels, scaling_factor)


def vae_from_sizes(
    channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` of plain down/up encoder blocks; f = 2 ** (len(channels) - 1)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
    )


def load_vae(path: str | Path) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from a local diffusers folder (e.g. ``sd-vae-ft-ema``, or a repo's ``vae/``)."""
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no VAE at {path}: expected a diffusers AutoencoderKL folder with config.json")
    vae = AutoencoderKL.from_config(json.loads(config_file.read_text()))
    load_weights(vae, read_weights(folder), source=str(folder))
    return vae


def save_vae(vae: AutoencoderKL, folder: str | Path, max_shard_size: str = "4MB") -> None:
    """Write a VAE as a diffusers folder (config.json + safetensors shards) that :func:`load_vae` reads."""
    with atomic_files(folder, stale=is_weight_file) as staging:
        vae.save_pretrained(str(staging), safe_serialization=True, max_shard_size=max_shard_size)


class MaskVAE(nn.Module):
    """A frozen ``AutoencoderKL`` that encodes images and palette masks and decodes latents to class logits.

    Args:
        vae: the autoencoder; its decoder's ``conv_out`` becomes ``rgb_out`` and a class head is added.
        num_classes: logits per pixel (the palette's first ``num_classes`` colours).
    """

    def __init__(self, vae: AutoencoderKL, num_classes: int = len(PALETTE)) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        self.rgb_out = vae.decoder.conv_out
        vae.decoder.conv_out = nn.Identity()  # the decoder now returns features; rgb_out and head read them
        self.head = nn.Conv2d(
            self.rgb_out.in_channels, num_classes, self.rgb_out.kernel_size, padding=self.rgb_out.padding
        )
        self.reset_head()

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def reset_head(self) -> None:
        """Initialise the head so its argmax equals nearest-palette decoding of ``rgb_out``."""
        palette = PALETTE[: self.head.out_channels].to(self.rgb_out.weight)  # (C, 3)
        self.head.weight.copy_(2 * torch.einsum("ck,kihw->cihw", palette, self.rgb_out.weight))
        assert self.head.bias is not None and self.rgb_out.bias is not None  # both convs are built with a bias
        self.head.bias.copy_(2 * palette @ self.rgb_out.bias - (palette**2).sum(1))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latent mean of images in [-1, 1]: (N, 1 or 3, H, W) -> (N, C, H/f, W/f).

        The distribution's mean, not a sample: the frozen encoder then gives one latent per slice, which the
        latent cache can store.
        """
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Latent of an integer mask (N, H, W) through its palette image."""
        return self.encode(mask_to_rgb(mask).to(self.rgb_out.weight.dtype))

    def features(self, latent: torch.Tensor) -> torch.Tensor:
        """Decoder features before the output layer: (N, C, h, w) -> (N, F, H, W)."""
        return self.vae.decode(latent / self.scaling_factor).sample

    def decode_logits(self, latent: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes, H, W) of a latent."""
        return self.head(self.features(latent))

    def decode_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """The pretrained decoder's RGB output (N, 3, H, W), as the unmodified VAE would give it."""
        return self.rgb_out(self.features(latent))
