"""MedDelinea: a Control DiT steering a frozen DiT in the latent space of a frozen VAE (docs/design.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import DiTTransformer2DModel
from torch import nn

from delinea.labels import NUM_CLASSES
from delinea.models import dit as dit_ops
from delinea.models.control import ControlDiT
from delinea.models.diffusion import NoiseSchedule, null_class, sample_latents
from delinea.models.vae import MaskVAE

#: The parts whose activations :meth:`MedDelinea.set_activation_checkpointing` can recompute in the backward pass:
#: the Control DiT's blocks, the frozen base DiT's blocks (kept for the backward pass to the residuals) and the
#: VAE decoder's mid and up blocks of L_seg.
CHECKPOINT_PARTS = ("control", "base", "decoder")


class MedDelinea(nn.Module):
    """The whole network: frozen base DiT and VAE, trainable Control DiT (with zero conv) and class head.

    Args:
        dit: the base DiT (frozen).
        vae: the autoencoder with its class head.
        control_blocks: K, how many base blocks the Control DiT copies (the paper uses 15 of 28).
        class_label: the DiT class label every sample is given; None is the DiT's null (unconditional) class,
            the last row of its label table (1000 for the released DiTs).
        activation_checkpointing: parts of :data:`CHECKPOINT_PARTS` whose activations are recomputed in the
            backward pass (``torch.utils.checkpoint``, non-reentrant, one transformer or decoder block at a time)
            instead of kept: less memory for about one more forward pass of those parts. Gradients are the same.
    """

    def __init__(
        self,
        dit: DiTTransformer2DModel,
        vae: MaskVAE,
        control_blocks: int = 15,
        class_label: int | None = None,
        activation_checkpointing: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if dit.config.in_channels != vae.latent_channels:
            raise ValueError(
                f"the DiT takes {dit.config.in_channels} latent channels but the VAE makes {vae.latent_channels}"
            )
        null = null_class(dit)
        class_label = null if class_label is None else class_label
        if not 0 <= class_label <= null:
            raise ValueError(f"class_label {class_label} is outside the DiT's label table [0, {null}]")
        self.dit = dit
        self.vae = vae
        self.control = ControlDiT(dit, control_blocks)
        self.class_label = class_label
        self.latent_channels = vae.latent_channels
        self.schedule = NoiseSchedule()
        self.set_activation_checkpointing(activation_checkpointing)
        self.train()  # a new module is in train mode: put the frozen parts in eval from the start

    # -- structure -----------------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE downsampling x patch size)."""
        return self.vae.downsampling * self.dit.patch_size

    def frozen_modules(self) -> list[nn.Module]:
        """The pretrained parts that never train: the base DiT and the VAE (encoder, decoder, RGB output)."""
        return [self.dit, self.vae.vae, self.vae.rgb_out]

    def set_activation_checkpointing(self, parts: Iterable[str]) -> None:
        """Recompute the activations of these parts (of :data:`CHECKPOINT_PARTS`) in the backward pass."""
        parts = frozenset(parts)
        unknown = sorted(parts - set(CHECKPOINT_PARTS))
        if unknown:
            raise ValueError(f"activation_checkpointing parts {unknown} unknown; expected some of {CHECKPOINT_PARTS}")
        self.checkpointing = parts
        decoder = self.vae.vae.decoder  # diffusers checkpoints its mid block and each up block when asked
        decoder.gradient_checkpointing = "decoder" in parts
        decoder._gradient_checkpointing_func = _checkpoint_call

    def train(self, mode: bool = True) -> MedDelinea:
        """Switch modes, but keep frozen parts in eval: the DiT's label embedder drops labels in train mode."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def check_inputs(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Raise a ValueError naming the offending shape when inputs do not fit the network."""
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"image must be (N, 1 or 3, H, W), got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        if height < self.size_multiple or width < self.size_multiple:
            raise ValueError(
                f"image size {height}x{width} (shape {tuple(image.shape)}) is smaller than {self.size_multiple} "
                f"(VAE factor {self.vae.downsampling} x patch {self.dit.patch_size}), the smallest side it takes"
            )
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"image size {height}x{width} is not divisible by {self.size_multiple} "
                f"(VAE factor {self.vae.downsampling} x patch {self.dit.patch_size})"
            )
        if mask is not None and (mask.ndim != 3 or mask.shape != (image.shape[0], height, width)):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}: "
                f"expected ({image.shape[0]}, {height}, {width})"
            )

    # -- the network ---------------------------------------------------------------------------------------

    def _labels(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.class_label, dtype=torch.long, device=device)

    def predict_noise(
        self, noisy_mask_latent: torch.Tensor, timestep: torch.Tensor, image_latent: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ of the steered DiT: (N, C, h, w) -> (N, C, h, w), the first C output channels."""
        dit_ops.check_latent(self.dit, noisy_mask_latent)
        if image_latent.shape != noisy_mask_latent.shape:
            raise ValueError(
                f"image latent {tuple(image_latent.shape)} and mask latent {tuple(noisy_mask_latent.shape)} differ"
            )
        labels = self._labels(noisy_mask_latent.shape[0], noisy_mask_latent.device)
        timestep = timestep.expand(noisy_mask_latent.shape[0]) if timestep.ndim == 0 else timestep
        residuals = self.control(
            noisy_mask_latent, image_latent, timestep, labels, checkpoint="control" in self.checkpointing
        )  # K x (N, T, D)
        out = dit_ops.forward(
            self.dit,
            noisy_mask_latent,
            timestep,
            labels,
            residual=lambda i, h: residuals[i] if i < len(residuals) else None,
            checkpoint="base" in self.checkpointing,
        )
        return out[:, : self.latent_channels]

    # -- inference -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        scheduler: str = "euler_ancestral",
        steps: int = 20,
        ensemble: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        zero_image: bool = False,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment images by sampling mask latents from noise, conditioned on the image.

        Args:
            image: (N, 1 or 3, H, W) in [-1, 1].
            scheduler: a name from :data:`delinea.models.diffusion.SCHEDULERS`.
            steps: sampler steps.
            ensemble: independent samples per image; their softmax probabilities are averaged.
            generator: random source for the initial noise and ancestral steps; or one per sample (N x ensemble,
                image-major), so that each sample's noise does not depend on what else is in the batch.
            zero_image: replace the image latent by zeros (the ablation proving the model reads the image).
            dtype: run the VAE and the denoiser under autocast to this dtype (``torch.bfloat16``; see
                :func:`inference_dtype`); the sampler's state, the scheduler arithmetic and the probabilities
                stay float32. ``torch.float32`` turns autocast off; None keeps the caller's autocast state.

        Returns:
            ``(probabilities, uncertainty)``: (N, classes, H, W) summing to 1 over classes, and (N, H, W) the
            predictive entropy of the ensemble mean divided by log(classes), in [0, 1].
        """
        self.check_inputs(image)
        if ensemble < 1:
            raise ValueError(f"ensemble ({ensemble}) must be at least 1")
        with autocast_to(image.device, dtype):
            z_o = self.vae.encode(image).float()
        if zero_image:
            z_o = torch.zeros_like(z_o)
        z_o = z_o.repeat_interleave(ensemble, dim=0)  # (N*E, C, h, w)

        def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast_to(image.device, dtype):
                return self.predict_noise(z, t, z_o)

        z = sample_latents(denoise, z_o.shape, scheduler, steps, generator, z_o.device)
        with autocast_to(image.device, dtype):
            logits = self.vae.decode_logits(z)
        probabilities = logits.float().softmax(1)  # (N*E, classes, H, W)
        probabilities = probabilities.unflatten(0, (image.shape[0], ensemble)).mean(1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
        return probabilities, entropy / torch.log(torch.tensor(float(probabilities.shape[1])))


def _checkpoint_call(module: nn.Module, *args: Any) -> Any:
    """diffusers' block checkpointing hook, non-reentrant (as PyTorch recommends; the reentrant form needs an input
    that requires gradients)."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")


def inference_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype :meth:`MedDelinea.sample` runs with: ``torch.bfloat16``, ``torch.float32`` (autocast
    off, whatever the caller set) or None (the caller's autocast state, e.g. Lightning's precision).

    ``auto`` is bf16 where the hardware computes it natively: a CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX (where ``make bench`` measured it faster at the same Dice; see benchmarks/README.md); on
    CPUs without bf16 instructions it is emulated and slower, so ``auto`` leaves the precision alone there.
    """
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"inference_dtype {name!r} must be one of {', '.join(INFERENCE_DTYPES)}")
    device = torch.device(device)
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None


def native_bf16(device: torch.device | str) -> bool:
    """Whether the device computes bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_to(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on the device's type; float32 turns autocast off; None leaves the caller's state."""
    if dtype is None:
        return contextlib.nullcontext()
    enabled = dtype != torch.float32
    return torch.autocast(torch.device(device).type, dtype=dtype if enabled else None, enabled=enabled)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CHECKPOINT_PARTS",
    "INFERENCE_DTYPES",
    "NUM_CLASSES",
    "MedDelinea",
    "autocast_to",
    "count_parameters",
    "inference_dtype",
    "native_bf16",
]
