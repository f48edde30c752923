"""The diffusion maths in one place: DiT's noise schedule, noising, Tweedie's estimate, training timesteps, the
null class, and the sampling loop over diffusers' samplers. Training (the MedDelinea and DiT pretraining tasks)
and inference (:meth:`delinea.models.meddelinea.MedDelinea.sample`) call the same code.

    schedule = NoiseSchedule()
    z_t = schedule.add_noise(z_0, eps, t)            # z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps
    z_0_hat = schedule.tweedie(z_t, eps_hat, t)      # (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
    z_0 = sample_latents(denoise, shape, "ddim", steps=10)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from delinea.errors import OptionError

# DiT's training schedule: linear betas 1e-4 -> 0.02 over 1000 steps, epsilon prediction.
DIT_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "lms": LMSDiscreteScheduler,  # needs scipy
}
ALIASES = {
    "dpmsolver": "dpmsolver++",
    "dpm_solver++": "dpmsolver++",
    "dpm++": "dpmsolver++",
    "euler_a": "euler_ancestral",
}


def make_sampler(name: str) -> SchedulerMixin:
    """A diffusers sampler for the DiT schedule by name: one of :data:`SCHEDULERS` (or an alias)."""
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    extra: dict = {"clip_sample": False} if key == "ddim" else {}
    if key == "dpmsolver++":
        extra = {"algorithm_type": "dpmsolver++"}
    return SCHEDULERS[key](**DIT_SCHEDULE, **extra)


def _steps_work(sampler: SchedulerMixin, steps: int) -> bool:
    try:
        sampler.set_timesteps(steps)
    except ValueError:  # DDIM refuses more steps than training timesteps
        return False
    timesteps = sampler.timesteps.tolist()
    return len(set(timesteps)) == len(timesteps)


def check_sampling_steps(scheduler: str, steps: int) -> None:
    """Refuse a step count a sampler cannot take: below 1, or one for which diffusers repeats a timestep
    (``dpmsolver++`` and ``unipc`` at 1000 steps), which gives NaN latents without a word.

    Raises:
        OptionError: naming the sampler, the count and the largest count it takes.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise OptionError(f"sampling_steps must be a positive integer, got {steps!r}")
    sampler = make_sampler(scheduler)
    if _steps_work(sampler, steps):
        return
    timesteps = int(sampler.config.num_train_timesteps)
    most = min(steps, timesteps)
    while most > 1 and not _steps_work(sampler, most):
        most -= 1
    raise OptionError(
        f"sampling_steps {steps} is more than the {scheduler} sampler can take over DiT's {timesteps} timesteps "
        f"(diffusers would repeat a timestep, which gives NaN, or refuse): choose at most {most}"
    )


class NoiseSchedule(nn.Module):
    """DiT's forward process (diffusers' ``DDPMScheduler`` with :data:`DIT_SCHEDULE`) as a module, so that ``ᾱ``
    follows the model to its device. At large t, √ᾱ_t is tiny (ᾱ_999 ≈ 4e-5): Tweedie's estimate amplifies errors
    of ε̂ by up to 1/√ᾱ_t ≈ 157."""

    alphas_cumprod: torch.Tensor  # (T,), a buffer

    def __init__(self) -> None:
        super().__init__()
        alphas = DDPMScheduler(**DIT_SCHEDULE, clip_sample=False).alphas_cumprod.clone()
        self.register_buffer("alphas_cumprod", alphas, persistent=False)

    @property
    def num_timesteps(self) -> int:
        """Training timesteps (1000)."""
        return len(self.alphas_cumprod)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def add_noise(self, latent: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Z_t = √ᾱ_t Z_0 + √(1 − ᾱ_t) ε."""
        alpha = self._alpha(t, latent)
        return alpha.sqrt() * latent + (1 - alpha).sqrt() * noise

    def tweedie(self, noisy: torch.Tensor, noise_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Ẑ_0 = (Z_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t."""
        alpha = self._alpha(t, noisy)
        return (noisy - (1 - alpha).sqrt() * noise_pred) / alpha.sqrt()

    def timesteps(
        self,
        n: int,
        bias: float = 0.0,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` integer training timesteps with density ∝ t^bias (bias 0: uniform, as DiT trains)."""
        total = self.num_timesteps
        if bias == 0:
            return torch.randint(0, total, (n,), device=device, generator=generator)
        u = torch.rand(n, device=device, generator=generator)
        return (u ** (1 / (bias + 1)) * total).long().clamp(max=total - 1)  # inverse CDF of t^bias


def null_class(dit: DiTTransformer2DModel) -> int:
    """A DiT's null (unconditional) class: the last row of its label table (1000 for the released DiTs)."""
    return int(dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings) - 1


@torch.no_grad()
def sample_latents(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    scheduler: str = "euler_ancestral",
    steps: int = 20,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The reverse process: latents of ``shape`` from Gaussian noise by ``steps`` of a diffusers sampler.

    Args:
        denoise: ``(z, t) -> ε̂``; called with the sampler's scaled input and a 0-d timestep.
        shape: (N, C, h, w) of the latents.
        scheduler: a name from :data:`SCHEDULERS`.
        steps: sampler steps.
        generator: random source of the initial noise and of ancestral steps, or one per sample (length N), so
            that a sample's noise does not depend on what else is in the batch.
        device: where the latents live.

    Returns:
        Float32 latents (N, C, h, w); the sampler's state and arithmetic stay float32 whatever ``denoise`` computes in.
    """
    sampler = make_sampler(scheduler)
    if not (isinstance(steps, int) and steps >= 1 and _steps_work(sampler, steps)):
        check_sampling_steps(scheduler, steps)  # raises, naming the largest count the sampler takes
    sampler.set_timesteps(steps, device=device)
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} samples")
        z = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device) for g in generator])
    else:
        z = torch.randn(shape, generator=generator, device=device)
    z = z * sampler.init_noise_sigma
    # Only the ancestral samplers draw noise while stepping; the others take no generator.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
    for t in sampler.timesteps:
        noise = denoise(sampler.scale_model_input(z, t), t.to(device))
        z = sampler.step(noise.to(z.dtype), t, z, **step_kwargs).prev_sample
    return z


__all__ = [
    "DIT_SCHEDULE",
    "SCHEDULERS",
    "NoiseSchedule",
    "check_sampling_steps",
    "make_sampler",
    "null_class",
    "sample_latents",
]
