"""Noise schedule and samplers: the DiT training schedule and five diffusers schedulers chosen by name."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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


def training_scheduler() -> DDPMScheduler:
    """The forward (noising) process the model is trained with."""
    return DDPMScheduler(**DIT_SCHEDULE, clip_sample=False)


def make_sampler(name: str) -> SchedulerMixin:
    """A sampler for the DiT schedule by name: one of :data:`SCHEDULERS`."""
    key = name.lower().replace("-", "_")
    key = {"dpmsolver": "dpmsolver++", "dpm_solver++": "dpmsolver++", "dpm++": "dpmsolver++",
           "euler_a": "euler_ancestral"}.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    extra = {"clip_sample": False} if key == "ddim" else {}
    if key == "dpmsolver++":
        extra = {"algorithm_type": "dpmsolver++"}
    return SCHEDULERS[key](**DIT_SCHEDULE, **extra)
