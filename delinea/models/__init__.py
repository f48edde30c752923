"""Plain ``nn.Module`` networks; nothing here imports Lightning."""

from delinea.models.control import ControlDiT
from delinea.models.diffusion import SCHEDULERS, NoiseSchedule, make_sampler, null_class, sample_latents
from delinea.models.dit import DIT_PRESETS, build_dit, convert_original_dit, load_dit, save_dit
from delinea.models.meddelinea import MedDelinea, count_parameters
from delinea.models.vae import VAE_SIZES, MaskVAE, build_vae, load_vae, save_vae

__all__ = [
    "DIT_PRESETS",
    "SCHEDULERS",
    "VAE_SIZES",
    "ControlDiT",
    "MaskVAE",
    "MedDelinea",
    "NoiseSchedule",
    "build_dit",
    "build_vae",
    "convert_original_dit",
    "count_parameters",
    "load_dit",
    "load_vae",
    "make_sampler",
    "null_class",
    "sample_latents",
    "save_dit",
    "save_vae",
]
