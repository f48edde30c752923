"""MedDelinea: a Control DiT steering a frozen DiT in the latent space of a frozen VAE (DESIGN.md section 1)."""

from __future__ import annotations

import contextlib
import inspect

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from delinea.labels import NUM_CLASSES
from delinea.models import dit as dit_ops
from delinea.models.control import ControlDiT
from delinea.models.sampling import make_sampler, training_scheduler
from delinea.models.vae import MaskVAE


class MedDelinea(nn.Module):
    """The whole network: frozen base DiT and VAE, trainable Control DiT (with zero conv) and class head.

    Args:
        dit: the base DiT (frozen).
        vae: the autoencoder with its class head.
        control_blocks: K, how many base blocks the Control DiT copies (the paper uses 15 of 28).
        class_label: the DiT class label every sample is given; None is the DiT's null (unconditional) class,
            the last row of its label table (1000 for the released DiTs).
    """

    def __init__(self, dit: DiTTransformer2DModel, vae: MaskVAE, control_blocks: int = 15,
                 class_label: int | None = None) -> None:
        super().__init__()
        if dit.config.in_channels != vae.latent_channels:
            raise ValueError(f"the DiT takes {dit.config.in_channels} latent channels but the VAE makes "
                             f"{vae.latent_channels}")
        rows = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        class_label = rows - 1 if class_label is None else class_label
        if not 0 <= class_label < rows:
            raise ValueError(f"class_label {class_label} is outside the DiT's label table [0, {rows - 1}]")
        self.dit = dit
        self.vae = vae
        self.control = ControlDiT(dit, control_blocks)
        self.class_label = class_label
        self.latent_channels = vae.latent_channels
        self.noise_schedule = training_scheduler()
        self.register_buffer("alphas_cumprod", self.noise_schedule.alphas_cumprod.clone(), persistent=False)
        self.train()  # a new module is in train mode: put the frozen parts in eval from the start

    # -- structure -----------------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE downsampling x patch size)."""
        return self.vae.downsampling * self.dit.patch_size

    def frozen_modules(self) -> list[nn.Module]:
        """The pretrained parts that never train: the base DiT and the VAE (encoder, decoder, RGB output)."""
        return [self.dit, self.vae.vae, self.vae.rgb_out]

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
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image size {height}x{width} is not divisible by {self.size_multiple} "
                             f"(VAE factor {self.vae.downsampling} x patch {self.dit.patch_size})")
        if mask is not None and (mask.ndim != 3 or mask.shape != (image.shape[0], height, width)):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}: "
                             f"expected ({image.shape[0]}, {height}, {width})")

    # -- the network ---------------------------------------------------------------------------------------

    def _labels(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.class_label, dtype=torch.long, device=device)

    def predict_noise(self, noisy_mask_latent: torch.Tensor, timestep: torch.Tensor,
                      image_latent: torch.Tensor) -> torch.Tensor:
        """ε̂ of the steered DiT: (N, C, h, w) -> (N, C, h, w), the first C output channels."""
        labels = self._labels(noisy_mask_latent.shape[0], noisy_mask_latent.device)
        timestep = timestep.expand(noisy_mask_latent.shape[0]) if timestep.ndim == 0 else timestep
        residuals = self.control(noisy_mask_latent, image_latent, timestep, labels)  # K x (N, T, D)
        out = dit_ops.forward(self.dit, noisy_mask_latent, timestep, labels,
                              residual=lambda i, h: residuals[i] if i < len(residuals) else None)
        return out[:, : self.latent_channels]

    def base_noise(self, noisy_mask_latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """ε̂ of the base DiT alone, without control."""
        labels = self._labels(noisy_mask_latent.shape[0], noisy_mask_latent.device)
        timestep = timestep.expand(noisy_mask_latent.shape[0]) if timestep.ndim == 0 else timestep
        return dit_ops.forward(self.dit, noisy_mask_latent, timestep, labels)[:, : self.latent_channels]

    def add_noise(self, latent: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Z_t = √ᾱ_t Z_0 + √(1-ᾱ_t) ε."""
        alpha = self.alphas_cumprod[timestep].view(-1, 1, 1, 1).to(latent.dtype)
        return alpha.sqrt() * latent + (1 - alpha).sqrt() * noise

    def tweedie(self, noisy_latent: torch.Tensor, noise_pred: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Ẑ_0 = (Z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t."""
        alpha = self.alphas_cumprod[timestep].view(-1, 1, 1, 1).to(noisy_latent.dtype)
        return (noisy_latent - (1 - alpha).sqrt() * noise_pred) / alpha.sqrt()

    # -- inference -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, image: torch.Tensor, scheduler: str = "euler_ancestral", steps: int = 20, ensemble: int = 1,
               generator: torch.Generator | list[torch.Generator] | None = None,
               image_latent: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment images by sampling mask latents from noise, conditioned on the image.

        Args:
            image: (N, 1 or 3, H, W) in [-1, 1].
            scheduler: a name from :data:`delinea.models.sampling.SCHEDULERS`.
            steps: sampler steps.
            ensemble: independent samples per image; their softmax probabilities are averaged.
            generator: random source for the initial noise and ancestral steps; or one per sample (N x ensemble,
                image-major), so that each sample's noise does not depend on what else is in the batch.
            image_latent: the image's latent when already known (skips the encoder).
            dtype: run the VAE and the denoiser under autocast to this dtype (``torch.bfloat16``; see
                :func:`inference_dtype`); the sampler's state, the scheduler arithmetic and the probabilities
                stay float32. ``torch.float32`` turns autocast off; None keeps the caller's autocast state.

        Returns:
            ``(probabilities, uncertainty)``: (N, classes, H, W) summing to 1 over classes, and (N, H, W) the
            predictive entropy of the ensemble mean divided by log(classes), in [0, 1].
        """
        self.check_inputs(image)
        if steps < 1 or ensemble < 1:
            raise ValueError(f"steps ({steps}) and ensemble ({ensemble}) must be at least 1")
        sampler = make_sampler(scheduler)
        with autocast_to(image.device, dtype):
            z_o = self.vae.encode(image) if image_latent is None else image_latent
        if dtype is not None:  # autocast here: the latents the sampler steps stay float32
            z_o = z_o.float()
        z_o = z_o.repeat_interleave(ensemble, dim=0)  # (N*E, C, h, w)
        sampler.set_timesteps(steps, device=z_o.device)
        # Only the ancestral samplers draw noise while stepping; the others take no generator.
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
        if isinstance(generator, list):
            if len(generator) != len(z_o):
                raise ValueError(f"{len(generator)} generators for {len(z_o)} samples (images x ensemble)")
            z = torch.cat([torch.randn((1, *z_o.shape[1:]), generator=g, device=z_o.device, dtype=z_o.dtype)
                           for g in generator])
        else:
            z = torch.randn(z_o.shape, generator=generator, device=z_o.device, dtype=z_o.dtype)
        z = z * sampler.init_noise_sigma
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(z, t)
            with autocast_to(image.device, dtype):
                noise = self.predict_noise(model_input, t.to(z_o.device), z_o)
            z = sampler.step(noise.to(z.dtype), t, z, **step_kwargs).prev_sample
        with autocast_to(image.device, dtype):
            logits = self.vae.decode_logits(z)
        probabilities = logits.float().softmax(1)  # (N*E, classes, H, W)
        probabilities = probabilities.unflatten(0, (image.shape[0], ensemble)).mean(1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
        return probabilities, entropy / torch.log(torch.tensor(float(probabilities.shape[1])))


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")


def inference_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype :meth:`MedDelinea.sample` runs with: ``torch.bfloat16``, ``torch.float32`` (autocast
    off, whatever the caller set) or None (the caller's autocast state, e.g. Lightning's precision).

    ``auto`` is bf16 where the hardware computes it natively: a CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX. On such a CPU (2-core AMD EPYC, ``make bench``, benchmarks/results/latest.md) bf16
    autocast ran the DiT-B/2 denoiser 2.2x, the SD-size VAE decoder 1.9x and end-to-end sampling of the demo
    model 1.3-1.8x faster than float32, with 99% of pixels given the same label and the same slab Dice; on
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


__all__ = ["INFERENCE_DTYPES", "NUM_CLASSES", "MedDelinea", "autocast_to", "count_parameters", "inference_dtype",
           "native_bf16"]
