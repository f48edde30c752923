"""The MedDelinea Lightning task: builds the network, freezes the backbones and trains the control branch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from delinea.labels import NUM_CLASSES
from delinea.models import MedDelinea, build_dit, build_vae, load_dit, load_vae
from delinea.models.dit import DIT_PRESETS
from delinea.models.meddelinea import autocast_to
from delinea.models.meddelinea import inference_dtype as resolve_inference_dtype
from delinea.models.sampling import make_sampler
from delinea.models.vae import VAE_SIZES, MaskVAE
from delinea.tasks.base import SegmentationTask, bce_dice_loss, moving_average
from delinea.tasks.latent_cache import LatentCache


class MedDelineaTask(SegmentationTask):
    """Train and run MedDelinea.

    Only the Control DiT (with its zero conv and zero Linears) and the decoder's class head train; the base DiT
    and the VAE are frozen (``requires_grad=False``) and stay in eval mode whatever Lightning does.

    Args:
        dit: a DiT preset (``DiT-XL/2``, ``DiT-B/4``, ``DiT-tiny/2``, ... randomly initialised) or a local path to
            a diffusers folder (``facebook/DiT-XL-2-256`` or its ``transformer/``) or an original DiT ``.pt``.
        vae: a VAE preset (``sd``, ``small``, ``tiny``) or a local diffusers ``AutoencoderKL`` folder.
        image_size: slice size the presets' positional embedding is laid out for (other sizes interpolate).
        control_blocks: K, base blocks copied into the Control DiT (paper: 15).
        class_label: DiT class label given to every sample; None is the DiT's null class (1000 for DiT-XL/2).
        lr: AdamW learning rate (paper: 2e-5).
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine`` or ``linear`` decay to zero over the run, or ``constant``.
        warmup_steps: linear warm-up steps.
        seg_loss_weight: weight of L_seg (BCE + Dice of decoded logits); 0 trains with L_diff only.
        seg_max_timestep: L_seg is computed only for t below this. Tweedie divides by √ᾱ_t (ᾱ_999 ≈ 4e-5, a
            157x amplification of ε̂ errors), so near t = 999 the decoded mask is noise and its loss only adds
            variance. Up to t ≈ 800 it is what teaches the control branch to read the image: the noisy mask
            latent alone no longer shows the layout there. In 200 s control runs of the demo model (held-out CT
            slab, DDIM 10 steps, mDSC with the image / with it zeroed): a limit of 500 gave 0.11 / 0.08, 800
            gave 0.30 and 0.22 (two seeds) / 0.10-0.13, 1000 gave 0.22 / 0.06, and 1000 with L_seg weighted by
            √ᾱ_t 0.12 / 0.07.
        timestep_bias: training timesteps are drawn with density ∝ t^bias on [0, 1000): 0 is the paper's uniform
            draw; larger values train large t, where the image must decide the layout, more often (and skip
            more decoder passes). In the runs above with a limit of 800: bias 1 gave 0.34 and 0.34 (two seeds),
            2 gave 0.36, 3 gave 0.34 (image zeroed: 0.12-0.15); with a limit of 900, bias 2 gave 0.31 / 0.04.
            Those runs scored the demo's held-out slab. On a validation slab cut from the training slices (z 76-85,
            31 slices left to train on) the new settings gave 0.13-0.15 against 0.11 for the old ones.
        train_head: train the class head (False: only the noise predictor trains, a paper ablation).
        sampler: sampler used by validation, test and predict.
        sampling_steps: sampler steps.
        ensemble: samples per slice at test/predict time (probabilities averaged, entropy as uncertainty).
        init_from: a MedDelinea checkpoint whose control branch and head initialise this one (fine-tuning).
        save_frozen_weights: keep the frozen backbones in checkpoints. Backbones built from presets (random
            weights that cannot be loaded elsewhere) are always kept.
        latent_cache: folder for cached VAE latents of unaugmented slices (the VAE encoder is frozen).
        zero_image: replace the image latent by zeros (an ablation proving the model reads the image).
        ema_decay: keep an exponential moving average of the trainable weights (timm's ModelEmaV3, as DiT
            trains with one) and evaluate, test and predict with it; 0 turns it off.
        inference_dtype: precision of sampling in validation, test and predict: ``auto`` (bf16 autocast where the
            hardware has native bf16, a CUDA GPU or a CPU with AVX512-BF16/AMX; else float32), ``bfloat16`` or
            ``float32``. The sampler state and the probabilities stay float32 (benchmarks/fastpaths.py).
        window_overlap: overlap of neighbouring inference windows.
        val_metrics: segment the validation cases at every validation and log ``val/mDSC``.
    """

    def __init__(
        self,
        dit: str = "DiT-XL/2",
        vae: str = "sd",
        image_size: int = 256,
        control_blocks: int = 15,
        class_label: int | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int = 0,
        seg_loss_weight: float = 1.0,
        seg_max_timestep: int = 800,
        timestep_bias: float = 0.0,
        train_head: bool = True,
        sampler: str = "euler_ancestral",
        sampling_steps: int = 20,
        ensemble: int = 1,
        init_from: str | None = None,
        save_frozen_weights: bool = False,
        latent_cache: str | None = None,
        zero_image: bool = False,
        ema_decay: float = 0.0,
        inference_dtype: Literal["auto", "float32", "bfloat16"] = "auto",
        window_overlap: float = 0.5,
        val_metrics: bool = False,
    ) -> None:
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay {ema_decay} must be in [0, 1)")
        make_sampler(sampler)  # fail early on an unknown sampler name
        resolve_inference_dtype(inference_dtype, "cpu")  # and on an unknown inference dtype
        if not 0 < seg_max_timestep <= 1000:
            raise ValueError(f"seg_max_timestep {seg_max_timestep} must be in (0, 1000]")
        if not 0 <= timestep_bias <= 10:
            raise ValueError(f"timestep_bias {timestep_bias} must be in [0, 10] (0: uniform timesteps)")
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                         window_overlap=window_overlap, val_metrics=val_metrics)

    # -- building ------------------------------------------------------------------------------------------

    def configure_models(self) -> None:
        """Build (or load) the backbones, the control branch and the head; freeze what must not train."""
        if hasattr(self, "model"):  # Lightning calls this hook again at fit start
            return
        hp = self.hparams
        vae = build_vae(hp.vae) if hp.vae in VAE_SIZES else load_vae(_existing(hp.vae, "vae"))
        mask_vae = MaskVAE(vae, NUM_CLASSES)
        latent_size = hp.image_size // mask_vae.downsampling
        if hp.dit in DIT_PRESETS:
            dit = build_dit(hp.dit, sample_size=latent_size, in_channels=mask_vae.latent_channels)
        else:
            dit = load_dit(_existing(hp.dit, "dit"))
        self.model = MedDelinea(dit, mask_vae, control_blocks=hp.control_blocks, class_label=hp.class_label)
        for module in self.model.frozen_modules():
            module.requires_grad_(False)
        self.model.vae.head.requires_grad_(hp.train_head)
        self.frozen_from_files = hp.dit not in DIT_PRESETS and hp.vae not in VAE_SIZES
        self.latent_cache = LatentCache(hp.latent_cache, self.vae_fingerprint()) if hp.latent_cache else None
        # The trainable parts under one module for the EMA; not registered, so state_dict keys stay unique.
        object.__setattr__(self, "trainable", nn.ModuleDict({"control": self.model.control,
                                                             "head": self.model.vae.head}))
        self.ema = moving_average(self.trainable, hp.ema_decay) if hp.ema_decay else None

    @property
    def size_multiple(self) -> int:
        return self.model.size_multiple

    def load_parent(self, checkpoint: dict[str, Any], path: str) -> None:
        """Fine-tuning: start the control branch and head from ``init_from``'s (a MedDelinea checkpoint).

        Done when fitting starts rather than at construction, so that loading this task's own checkpoint later
        (test, predict) neither needs the ``init_from`` file nor reads it for weights that are replaced anyway.
        """
        state = checkpoint.get("state_dict", checkpoint)
        wanted = {k: v for k, v in state.items() if k.startswith(("model.control.", "model.vae.head."))}
        if not wanted:
            raise ValueError(f"init_from {path} holds no MedDelinea control branch (no 'model.control.*' keys)")
        own = self.state_dict()
        wrong = [k for k, v in wanted.items() if k not in own or own[k].shape != v.shape]
        wrong += sorted(k for k in own if k.startswith(("model.control.", "model.vae.head.")) and k not in wanted)
        if wrong:
            raise ValueError(f"init_from {path} does not fit this model (e.g. {wrong[:3]}): check dit, vae and "
                             f"control_blocks against the checkpoint's hyperparameters")
        self.load_state_dict(wanted, strict=False)
        if self.ema is not None:  # the average starts from the loaded weights
            self.ema = moving_average(self.trainable, self.hparams.ema_decay)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.trainable, step=self.global_step)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Evaluate with the EMA weights, then put the trained weights back."""
        if self.ema is None:
            yield
            return
        trained = {k: v.clone() for k, v in self.trainable.state_dict().items()}
        self.trainable.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.trainable.load_state_dict(trained)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with self.ema_weights():
            super().validation_step(batch, batch_idx)

    def vae_fingerprint(self) -> str:
        """A hash of the frozen encoder weights: cached latents of another VAE are never read."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.vae.vae.encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def train(self, mode: bool = True) -> MedDelineaTask:
        super().train(mode)
        self.model.train(mode)  # re-applies eval() to the frozen parts
        return self

    # -- losses --------------------------------------------------------------------------------------------

    def latents(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and mask latents of a batch, from the latent cache where possible."""
        image, mask = batch["image"], batch["mask"]
        if self.latent_cache is None:
            with torch.no_grad():
                return self.model.vae.encode(image), self.model.vae.encode_mask(mask)
        image_latent, mask_latent = self.latent_cache.get_or_compute(
            batch["cache_key"], lambda idx: (self.model.vae.encode(image[idx]), self.model.vae.encode_mask(mask[idx]))
        )
        return image_latent.to(image.device), mask_latent.to(image.device)  # all-hit batches come from disk

    def losses(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """L_diff, L_seg and their weighted sum for one batch."""
        image, mask, labelled = batch["image"], batch["mask"], batch["labelled"]
        self.model.check_inputs(image, mask)
        image_latent, mask_latent = self.latents(batch)
        if self.hparams.zero_image:
            image_latent = torch.zeros_like(image_latent)
        n = image.shape[0]
        timestep = training_timesteps(n, self.hparams.get("timestep_bias", 0.0), self.device, generator)
        noise = torch.randn(mask_latent.shape, device=self.device, generator=generator, dtype=mask_latent.dtype)
        noisy = self.model.add_noise(mask_latent, noise, timestep)
        noise_pred = self.model.predict_noise(noisy, timestep, image_latent)
        loss_diff = F.mse_loss(noise_pred.float(), noise.float())
        loss_seg = self.segmentation_loss(noisy, noise_pred, timestep, mask, labelled)
        return {"loss": loss_diff + self.hparams.seg_loss_weight * loss_seg, "loss_diff": loss_diff,
                "loss_seg": loss_seg}

    def segmentation_loss(self, noisy: torch.Tensor, noise_pred: torch.Tensor, timestep: torch.Tensor,
                          mask: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """BCE + Dice of the decoded Tweedie estimate, over labelled classes, for samples with t < max."""
        keep = timestep < self.hparams.seg_max_timestep
        if self.hparams.seg_loss_weight == 0 or not keep.any():
            # Zero that still touches the head, so DDP sees a gradient for every trainable parameter.
            return sum(p.sum() * 0.0 for p in self.model.vae.head.parameters())
        latent0 = self.model.tweedie(noisy[keep], noise_pred[keep], timestep[keep])
        logits = self.model.vae.decode_logits(latent0).float()  # (n, C, H, W)
        return bce_dice_loss(logits, mask[keep], labelled[keep])

    # -- steps ---------------------------------------------------------------------------------------------

    def validation_loss(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        # Fixed noise and timesteps per batch, so validation losses of different epochs compare.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        return self.losses(batch, generator=generator)

    @torch.no_grad()
    def predict_probabilities(self, image: torch.Tensor, seeds: list[int] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (N, C, h, w) and uncertainty (N, h, w) of windows, by sampling; window ``i``'s noise
        (and its ensemble's) comes from ``seeds[i]`` (default: its index)."""
        with self.ema_weights():
            return self._sample(image, seeds)

    def _sample(self, image: torch.Tensor, seeds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = resolve_inference_dtype(self.hparams.get("inference_dtype", "auto"), image.device)
        with autocast_to(image.device, dtype):
            image_latent = self.model.vae.encode(image)
        if self.hparams.zero_image:
            image_latent = torch.zeros_like(image_latent)
        seeds = list(range(len(image))) if seeds is None else seeds
        ensemble = self.hparams.ensemble
        generators = [torch.Generator(self.device).manual_seed(seed * ensemble + e) for seed in seeds
                      for e in range(ensemble)]  # fmt: skip
        return self.model.sample(image, scheduler=self.hparams.sampler, steps=self.hparams.sampling_steps,
                                 ensemble=ensemble, generator=generators, image_latent=image_latent, dtype=dtype)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def frozen_keys(self) -> set[str]:
        prefixes = ("model.dit.", "model.vae.vae.", "model.vae.rgb_out.")
        return {k for k in self.state_dict() if k.startswith(prefixes)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave out frozen backbone weights that load from their files anyway, with a fingerprint to check."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["delinea_frozen_fingerprint"] = self.frozen_fingerprint()
        if self.frozen_from_files and not self.hparams.save_frozen_weights:
            for key in self.frozen_keys():
                checkpoint["state_dict"].pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill frozen weights left out of the checkpoint from the backbones just loaded, after checking them."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        missing = self.frozen_keys() - set(state)
        if not missing:
            return
        expected = checkpoint.get("delinea_frozen_fingerprint")
        if expected is not None and expected != self.frozen_fingerprint():
            raise ValueError("the checkpoint was trained on other frozen backbones than the ones loaded from "
                             f"dit={self.hparams.dit!r} and vae={self.hparams.vae!r}")
        own = self.state_dict()
        state.update({k: own[k] for k in missing})

    def frozen_fingerprint(self) -> str:
        digest = hashlib.sha256()
        own = self.state_dict()
        for key in sorted(self.frozen_keys()):
            # Every byte, not a float sum: a sum depends on the thread count and the device.
            digest.update(key.encode())
            digest.update(own[key].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def training_timesteps(n: int, bias: float, device: torch.device,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` integer timesteps in [0, 1000) with density ∝ t^bias (bias 0: uniform, as DiT trains)."""
    if bias == 0:
        return torch.randint(0, 1000, (n,), device=device, generator=generator)
    u = torch.rand(n, device=device, generator=generator)
    return (u ** (1 / (bias + 1)) * 1000).long().clamp(max=999)  # inverse CDF of t^bias


def _existing(path: str, what: str) -> Path:
    if not Path(path).exists():
        raise FileNotFoundError(f"{what}={path!r} is neither a preset nor an existing path")
    return Path(path)

