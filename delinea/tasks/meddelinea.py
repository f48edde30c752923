"""The MedDelinea Lightning task: builds the network, freezes the backbones and trains the control branch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from delinea.datamodules.batches import EvalBatch, WindowBatch
from delinea.errors import OptionError
from delinea.labels import NUM_CLASSES
from delinea.models import MedDelinea, build_dit, build_vae, load_dit, load_vae
from delinea.models.diffusion import check_sampling_steps
from delinea.models.dit import DIT_PRESETS
from delinea.models.losses import bce_dice_loss
from delinea.models.meddelinea import CHECKPOINT_PARTS
from delinea.models.meddelinea import inference_dtype as resolve_inference_dtype
from delinea.models.memory import MemoryPlan, device_memory
from delinea.models.memory import estimate as estimate_memory
from delinea.models.vae import VAE_SIZES, MaskVAE
from delinea.tasks.base import SegmentationTask
from delinea.tasks.latent_cache import LatentCache
from delinea.tasks.optim import moving_average


class MedDelineaTask(SegmentationTask):
    """Train and run MedDelinea.

    Only the Control DiT (with its zero conv and zero Linears) and the decoder's class head train; the base DiT
    and the VAE are frozen (``requires_grad=False``) and stay in eval mode whatever Lightning does.

    Args:
        dit: a DiT preset (``DiT-XL/2``, ``DiT-B/4``, ``DiT-tiny/2``, ... randomly initialised) or a local path to
            a diffusers folder (``facebook/DiT-XL-2-256`` or its ``transformer/``) or an original DiT ``.pt`` (a
            released state dict, or a ``train.py`` checkpoint, whose EMA weights are taken).
        dit_num_heads: attention heads of an original DiT ``.pt`` (its tensors do not carry them): None reads them
            from a ``train.py`` checkpoint's ``args`` or from the preset of the same depth and hidden size, and
            refuses a shape that matches no preset.
        vae: a VAE preset (``sd``, ``small``, ``tiny``) or a local diffusers ``AutoencoderKL`` folder.
        image_size: slice size the presets' positional embedding is laid out for (other sizes interpolate).
        control_blocks: K, base blocks copied into the Control DiT (paper: 15).
        class_label: DiT class label given to every sample; None is the DiT's null class (1000 for DiT-XL/2).
        seg_loss_weight: weight of L_seg (BCE + Dice of decoded logits); 0 trains with L_diff only.
        seg_max_timestep: L_seg is computed only for t below this. Tweedie divides by √ᾱ_t (ᾱ_999 ≈ 4e-5, a
            157x amplification of ε̂ errors), so near t = 999 the decoded mask is noise and its loss only adds
            variance; up to t ≈ 800 it is what teaches the control branch to read the image, since the noisy
            mask latent alone no longer shows the layout there (docs/experiments.md).
        timestep_bias: training timesteps are drawn with density ∝ t^bias on [0, 1000): 0 is the paper's uniform
            draw; larger values train large t, where the image must decide the layout, more often (and skip
            more decoder passes).
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
        activation_checkpointing: recompute activations in the backward pass instead of keeping them (same
            gradients, less memory, about a third more training time): True for every part, or a list of
            ``control`` (the Control DiT's blocks), ``base`` (the frozen DiT's blocks, whose activations the
            backward pass to the residuals needs) and ``decoder`` (the VAE decoder of L_seg). The memory plan
            printed at fit start shows what each part costs (:mod:`delinea.models.memory`).
        inference_dtype: precision of sampling in validation, test and predict: ``auto`` (bf16 autocast where the
            hardware has native bf16, a CUDA GPU or a CPU with AVX512-BF16/AMX; else float32), ``bfloat16`` or
            ``float32``. The sampler state and the probabilities stay float32 (benchmarks/fastpaths.py).
        **kwargs: the optimiser (``lr``, paper: 2e-5; ``weight_decay``, ``lr_schedule``, ``warmup_steps``) and
            inference windows (``window_overlap``, ``val_metrics``): see :class:`~delinea.tasks.base.SegmentationTask`.
    """

    def __init__(
        self,
        dit: str = "DiT-XL/2",
        dit_num_heads: int | None = None,
        vae: str = "sd",
        image_size: int = 256,
        control_blocks: int = 15,
        class_label: int | None = None,
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
        activation_checkpointing: bool | list[Literal["control", "base", "decoder"]] = False,
        **kwargs: Any,
    ) -> None:
        checkpoint_parts(activation_checkpointing)  # fail early on an unknown part
        if not 0 <= ema_decay < 1:
            raise OptionError(f"ema_decay {ema_decay} must be in [0, 1)")
        check_sampling_steps(sampler, sampling_steps)  # fail early on an unknown sampler or a count it cannot take
        if not isinstance(ensemble, int) or ensemble < 1:
            raise OptionError(f"ensemble must be a positive integer (samples per slice), got {ensemble!r}")
        resolve_inference_dtype(inference_dtype, "cpu")  # and on an unknown inference dtype
        if not 0 < seg_max_timestep <= 1000:
            raise OptionError(f"seg_max_timestep {seg_max_timestep} must be in (0, 1000]")
        if not 0 <= timestep_bias <= 10:
            raise OptionError(f"timestep_bias {timestep_bias} must be in [0, 10] (0: uniform timesteps)")
        super().__init__(**kwargs)

    # -- building ------------------------------------------------------------------------------------------

    def configure_models(self) -> None:
        """Build (or load) the backbones, the control branch and the head; freeze what must not train."""
        hp = self.hparams
        vae = build_vae(hp.vae) if hp.vae in VAE_SIZES else load_vae(_existing(hp.vae, "vae"))
        mask_vae = MaskVAE(vae, NUM_CLASSES)
        latent_size = hp.image_size // mask_vae.downsampling
        if hp.dit in DIT_PRESETS:
            multiple = mask_vae.downsampling * int(hp.dit.rsplit("/", 1)[1])
            if not isinstance(hp.image_size, int) or hp.image_size < multiple or hp.image_size % multiple:
                raise OptionError(
                    f"image_size {hp.image_size!r} must be a positive multiple of {multiple} (the VAE's downsampling "
                    f"{mask_vae.downsampling} x the patch size of {hp.dit}); e.g. "
                    f"{max(1, round(hp.image_size / multiple)) * multiple}"
                )
            dit = build_dit(hp.dit, sample_size=latent_size, in_channels=mask_vae.latent_channels)
        else:
            dit = load_dit(_existing(hp.dit, "dit"), num_heads=hp.get("dit_num_heads"))
        self.model = MedDelinea(
            dit,
            mask_vae,
            control_blocks=hp.control_blocks,
            class_label=hp.class_label,
            activation_checkpointing=checkpoint_parts(hp.get("activation_checkpointing", False)),
        )
        for module in self.model.frozen_modules():
            module.requires_grad_(False)
        self.model.vae.head.requires_grad_(hp.train_head)
        self.frozen_from_files = hp.dit not in DIT_PRESETS and hp.vae not in VAE_SIZES
        self.latent_cache = LatentCache(hp.latent_cache, self.vae_fingerprint()) if hp.latent_cache else None
        # The trainable parts under one module for the EMA; not registered, so state_dict keys stay unique.
        object.__setattr__(
            self, "trainable", nn.ModuleDict({"control": self.model.control, "head": self.model.vae.head})
        )
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
            raise OptionError(f"init_from {path} holds no MedDelinea control branch (no 'model.control.*' keys)")
        own = self.state_dict()
        wrong = [k for k, v in wanted.items() if k not in own or own[k].shape != v.shape]
        wrong += sorted(k for k in own if k.startswith(("model.control.", "model.vae.head.")) and k not in wanted)
        if wrong:
            raise OptionError(
                f"init_from {path} does not fit this model (e.g. {wrong[:3]}): check dit, vae and "
                f"control_blocks against the checkpoint's hyperparameters"
            )
        self.load_state_dict(wanted, strict=False)
        if self.ema is not None:  # the average starts from the loaded weights
            self.ema = moving_average(self.trainable, self.hparams.ema_decay)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.report_memory_plan()

    def memory_plans(self) -> list[MemoryPlan]:
        """Estimated peak memory of a training micro-batch at each training window (delinea.models.memory)."""
        trainer = self.trainer
        data = self._data()
        windows = list(self.plan.window) if self.plan is not None else [self.hparams.image_size]
        micro = data.micro_batch_size if data is not None else None
        batch = data.batch_size if data is not None else 1
        plans = []
        for window in windows:
            size = micro.get(window, batch) if isinstance(micro, dict) else (micro or batch)
            plans.append(
                estimate_memory(
                    self.model,
                    window,
                    int(size),
                    str(trainer.precision),
                    self.model.checkpointing,
                    ddp=trainer.world_size > 1,
                )
            )
        return plans

    def report_memory_plan(self) -> None:
        """Print the memory plan (rank zero) and warn when a micro-batch would not fit the device."""
        available = device_memory(self.device)
        try:
            plans = self.memory_plans()
        except KeyError as error:  # no measured table for this precision
            self.print(f"delinea: no memory plan: {error}")
            return
        for plan in plans:
            self.print(f"delinea: {plan.describe(available)}")
            if available is not None and plan.peak > available:
                rank_zero_warn(
                    f"delinea: a {plan.resolution}² micro-batch of {plan.micro_batch} needs about "
                    f"{plan.peak / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB this device has: lower "
                    "data.micro_batch_size for that size (raising trainer.accumulate_grad_batches to keep the step), "
                    "or set model.activation_checkpointing"
                )

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

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
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

    def latents(self, batch: WindowBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and mask latents of a batch, from the latent cache where possible."""
        image, mask = batch["image"], batch["mask"]
        if self.latent_cache is None:
            with torch.no_grad():
                return self.model.vae.encode(image), self.model.vae.encode_mask(mask)
        image_latent, mask_latent = self.latent_cache.get_or_compute(
            batch["cache_key"], lambda idx: (self.model.vae.encode(image[idx]), self.model.vae.encode_mask(mask[idx]))
        )
        return image_latent.to(image.device), mask_latent.to(image.device)  # all-hit batches come from disk

    def losses(self, batch: WindowBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The paper's losses for one batch: L_diff, L_seg and their weighted sum.

        With Z_o and Z_m0 the frozen VAE's image and mask latents, t a training timestep and ε Gaussian noise::

            Z_mt = √ᾱ_t Z_m0 + √(1 − ᾱ_t) ε              ε̂ = steered DiT(Z_mt, t | Z_o)
            L_diff = |ε̂ − ε|²                            Ẑ_m0 = (Z_mt − √(1 − ᾱ_t) ε̂) / √ᾱ_t   (Tweedie)
            L_seg = BCE + Dice(head(VAE decoder(Ẑ_m0)), mask)   for t < seg_max_timestep
        """
        mask, labelled = batch["mask"], batch["labelled"]
        self.model.check_inputs(batch["image"], mask)
        schedule = self.model.schedule
        z_o, z_m0 = self.latents(batch)
        if self.hparams.zero_image:
            z_o = torch.zeros_like(z_o)
        t = schedule.timesteps(len(mask), self.hparams.get("timestep_bias", 0.0), self.device, generator)
        eps = torch.randn(z_m0.shape, device=self.device, generator=generator, dtype=z_m0.dtype)
        z_mt = schedule.add_noise(z_m0, eps, t)
        eps_hat = self.model.predict_noise(z_mt, t, z_o)
        loss_diff = F.mse_loss(eps_hat.float(), eps.float())
        keep = t < self.hparams.seg_max_timestep  # Tweedie divides by √ᾱ_t: near t = 999 its estimate is noise
        if self.hparams.seg_loss_weight == 0 or not keep.any():
            # Zero that still touches the head, so DDP sees a gradient for every trainable parameter.
            loss_seg = sum(p.sum() * 0.0 for p in self.model.vae.head.parameters())
        else:
            z_m0_hat = schedule.tweedie(z_mt[keep], eps_hat[keep], t[keep])
            logits = self.model.vae.decode_logits(z_m0_hat).float()  # (n, C, H, W)
            loss_seg = bce_dice_loss(logits, mask[keep], labelled[keep])
        return {
            "loss": loss_diff + self.hparams.seg_loss_weight * loss_seg,
            "loss_diff": loss_diff,
            "loss_seg": loss_seg,
        }

    # -- steps ---------------------------------------------------------------------------------------------

    def validation_loss(self, batch: WindowBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        # Fixed noise and timesteps per batch, so validation losses of different epochs compare.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        return self.losses(batch, generator=generator)

    @torch.no_grad()
    def predict_probabilities(
        self, image: torch.Tensor, seeds: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (N, C, h, w) and uncertainty (N, h, w) of windows, by sampling; window ``i``'s noise
        (and its ensemble's) comes from ``seeds[i]`` (default: its index)."""
        with self.ema_weights():
            return self._sample(image, seeds)

    def _sample(self, image: torch.Tensor, seeds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = resolve_inference_dtype(self.hparams.get("inference_dtype", "auto"), image.device)
        seeds = list(range(len(image))) if seeds is None else seeds
        ensemble = self.hparams.ensemble
        generators = [torch.Generator(self.device).manual_seed(seed * ensemble + e) for seed in seeds
                      for e in range(ensemble)]  # fmt: skip
        return self.model.sample(
            image,
            scheduler=self.hparams.sampler,
            steps=self.hparams.sampling_steps,
            ensemble=ensemble,
            generator=generators,
            zero_image=self.hparams.zero_image,
            dtype=dtype,
        )

    # -- checkpoints ---------------------------------------------------------------------------------------

    def frozen_keys(self) -> set[str]:
        """The frozen backbones' keys (the base DiT, the VAE and its RGB output layer)."""
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
            raise OptionError(
                "the checkpoint was trained on other frozen backbones than the ones loaded from "
                f"dit={self.hparams.dit!r} and vae={self.hparams.vae!r}"
            )
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


def checkpoint_parts(option: bool | Sequence[str]) -> tuple[str, ...]:
    """The parts an ``activation_checkpointing`` option names: True is all of them, False none.

    Raises:
        OptionError: an unknown part, named with the ones there are.
    """
    if isinstance(option, bool):
        return CHECKPOINT_PARTS if option else ()
    unknown = [part for part in option if part not in CHECKPOINT_PARTS]
    if unknown:
        raise OptionError(
            f"activation_checkpointing {unknown} unknown: give true, false or a list of {', '.join(CHECKPOINT_PARTS)}"
        )
    return tuple(option)


def _existing(path: str, what: str) -> Path:
    if not Path(path).exists():
        raise FileNotFoundError(f"{what}={path!r} is neither a preset nor an existing path")
    return Path(path)
