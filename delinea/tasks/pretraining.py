"""Pretraining the frozen backbones MedDelinea needs: a mask-aware VAE, then an unconditional base DiT on its latents.

MedDelinea steers a pretrained, frozen DiT in the latent space of a pretrained, frozen VAE (the paper: the Stable
Diffusion VAE and DiT-XL/2). These tasks train such a pair on any delinea datamodule, for a new label space or a
machine too small for the paper's: the CPU demo's backbones (``delinea/demo/weights``) come from them. They read the
datamodules' batches (windows on the plan, the project's augmentation with ``augment=True``) and write diffusers
folders that ``MedDelineaTask(vae=..., dit=...)`` loads.

* :class:`VAEPretrainTask` trains an ``AutoencoderKL`` on image windows *and* palette-RGB mask windows with one
  network, as the SD VAE encodes both. Masks must survive the codec, so the decoded mask image gets a
  classification loss on its nearest-palette logits ``-|rgb - p_c|^2 / tau`` (cross-entropy, and soft Dice, which
  weighs small organs like large ones), besides L1/MSE reconstruction and a small KL. A share of the masks can be
  replaced by random ellipses (``synthetic``), shapes and colour neighbours a small dataset does not show.
* :class:`DiTPretrainTask` trains the base DiT with ε-prediction MSE on the frozen VAE's mask latents (latent mean x
  scaling factor), null class label, DiT's schedule (:mod:`delinea.models.diffusion`), uniform t.

Run them with ``delinea-pretrain fit --config ...`` (:func:`delinea.main.pretrain`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from lightning.pytorch import LightningModule

from delinea.datamodules.batches import EvalBatch, TrainBatch, WindowBatch
from delinea.errors import OptionError
from delinea.evaluation import dice_from_counts, mean_dice, overlap_counts
from delinea.geometry import IMAGE_FILL, crop_window
from delinea.labels import NUM_CLASSES, PALETTE, mask_to_rgb, rgb_to_mask
from delinea.models.diffusion import NoiseSchedule, null_class
from delinea.models.dit import DIT_PRESETS, build_dit, check_square, save_dit
from delinea.models.vae import MaskVAE, load_vae, save_vae, vae_from_sizes
from delinea.models.weights import load_weights, read_weights
from delinea.tasks.optim import adamw_with_schedule, check_finite, check_schedule, moving_average
from delinea.tasks.seeding import SeededSteps


def pad_to_multiple(image: torch.Tensor, mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad images (N, C, H, W) with background and masks (N, H, W) with 0 to sides divisible by ``multiple``."""
    height, width = mask.shape[-2:]
    pad = (0, (-width) % multiple, 0, (-height) % multiple)
    return F.pad(image, pad, value=IMAGE_FILL), F.pad(mask, pad, value=0)


def synthetic_mask(
    size: int, generator: torch.Generator | None = None, shapes: tuple[int, int] = (2, 9)
) -> torch.Tensor:
    """A random mask (R, R) of overlapping rotated ellipses of random organ ids, from a few pixels to half the
    window across; later ellipses win."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand((), generator=generator)

    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")  # fmt: skip
    mask = torch.zeros(size, size, dtype=torch.long)
    for _ in range(int(torch.randint(shapes[0], shapes[1] + 1, (), generator=generator))):
        cy, cx = uniform(0.1, 0.9) * size, uniform(0.1, 0.9) * size
        radius = size * torch.exp(uniform(math.log(0.015), math.log(0.25)))
        ay, ax = radius * uniform(0.5, 1.5), radius * uniform(0.5, 1.5)
        angle = uniform(0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * torch.cos(angle) + dy * torch.sin(angle)
        v = -dx * torch.sin(angle) + dy * torch.cos(angle)
        mask[(u / ax) ** 2 + (v / ay) ** 2 <= 1] = int(torch.randint(1, NUM_CLASSES, (), generator=generator))
    return mask


def palette_logits(rgb: torch.Tensor, tau: float) -> torch.Tensor:
    """Class logits ``-|rgb - p_c|^2 / tau`` of an RGB image (N, 3, H, W): (N, C, H, W); argmax = nearest palette."""
    palette = PALETTE.to(rgb.device, rgb.dtype)
    return -((rgb.unsqueeze(1) - palette[None, :, :, None, None]) ** 2).sum(2) / tau


class BackbonePretrainTask(SeededSteps, LightningModule):
    """What both pretraining tasks share: AdamW with warm-up and a step-or-time decay, per-batch seeded randomness
    (exact resumes), export after training.

    With ``anneal_seconds`` the decay runs over that many seconds of training (or the steps, whichever ends
    first), as :func:`~delinea.tasks.base.adamw_with_schedule` describes.
    """

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_schedule(self, anneal_seconds=self.hparams.get("anneal_seconds"))

    def on_fit_start(self) -> None:
        self.start_seeds(resuming=self.trainer.ckpt_path is not None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.save_seed(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_seed(checkpoint)

    def _check_export_dir(self) -> None:
        folder = self.hparams.export_dir
        if folder and Path(folder).exists() and any(Path(folder).iterdir()) and not self.hparams.overwrite:
            raise OptionError(f"export_dir {folder} exists and is not empty; pass overwrite=True to replace it")

    def on_train_end(self) -> None:
        if self.hparams.export_dir and (self._trainer is None or self.trainer.is_global_zero):
            self.export(self.hparams.export_dir)

    def export(self, folder: str | Path) -> Path:
        """Write the trained backbone as a diffusers folder."""
        raise NotImplementedError


class VAEPretrainTask(BackbonePretrainTask):
    """Train an ``AutoencoderKL`` on image windows and palette-RGB mask windows with a mask-aware loss.

    Each batch (``image`` (B, 1, H, W), ``mask`` (B, H, W)) goes through the autoencoder as 2B RGB images: the grey
    image repeated to three channels (as :meth:`MaskVAE.encode` feeds it) and the palette image of the mask. Loss::

        image_weight * (L1 + MSE)(image)  +  mask_weight * MSE(mask rgb)
        + ce_weight * CE(-|rgb_hat - p_c|^2 / tau)  +  dice_weight * (1 - soft Dice over the organs)
        + kl_weight * KL (per latent element)

    The posterior is sampled in training, so the decoder learns to tolerate latent noise (the DiT's samples are
    never exact). Validation logs the codec Dice (``val/codec_mDSC``): masks encoded, decoded and read by nearest
    palette colour, pooled over the validation slices. The export sets ``scaling_factor`` to 1 / std of the last
    training masks' latent means, so the DiT sees unit-variance latents.

    Args:
        block_out_channels: encoder/decoder widths per level; ``len - 1`` halvings (3 levels: f=4).
        layers_per_block: ResNet layers per encoder level (the decoder has one more).
        norm_num_groups: GroupNorm groups.
        latent_channels: latent channels.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        warmup_steps: linear warm-up steps.
        image_weight: weight of the image L1 + MSE.
        mask_weight: weight of the mask RGB MSE.
        ce_weight: weight of the palette-logit cross-entropy.
        dice_weight: weight of the soft Dice loss over the eight organs.
        kl_weight: weight of the KL divergence per latent element.
        tau: temperature of the palette logits (palette colours are >= 3 apart in squared distance).
        class_weights: cross-entropy weight per class (9 values), e.g. inverse square-root frequencies.
        synthetic: share of training masks replaced by random ellipse masks (:func:`synthetic_mask`).
        images_per_batch: images of each batch that are reconstructed (all its masks are); None: all. Masks
            carry the codec ceiling; images only need an informative latent.
        anneal_seconds: also decay the learning rate by wall time, reaching the end after this many seconds.
        init_from: a VAE folder (``save_vae``) of the same architecture whose weights start this run.
        export_dir: diffusers folder written at the end of training (None: no export).
        overwrite: allow ``export_dir`` to replace an existing non-empty folder.
    """

    def __init__(
        self,
        block_out_channels: list[int] = [32, 64, 64],  # noqa: B006 - jsonargparse needs a plain default
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        latent_channels: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int = 50,
        image_weight: float = 1.0,
        mask_weight: float = 1.0,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        kl_weight: float = 1e-5,
        tau: float = 0.5,
        class_weights: list[float] | None = None,
        synthetic: float = 0.0,
        images_per_batch: int | None = None,
        anneal_seconds: float | None = None,
        init_from: str | None = None,
        export_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        check_schedule(lr, warmup_steps, lr_schedule)
        if init_from is not None and not (Path(init_from) / "config.json").is_file():
            raise OptionError(f"init_from {init_from} is not a diffusers AutoencoderKL folder (no config.json)")
        if any(c % norm_num_groups for c in block_out_channels):
            raise OptionError(
                f"block_out_channels {block_out_channels} must be multiples of norm_num_groups {norm_num_groups}"
            )
        if images_per_batch is not None and images_per_batch < 0:
            raise OptionError(f"images_per_batch must be non-negative or None, got {images_per_batch}")
        if class_weights is not None and len(class_weights) != NUM_CLASSES:
            raise OptionError(f"class_weights needs {NUM_CLASSES} values, got {len(class_weights)}")
        if tau <= 0 or not 0 <= synthetic < 1:
            raise OptionError(f"tau ({tau}) must be positive and synthetic ({synthetic}) in [0, 1)")
        self.save_hyperparameters()
        self._check_export_dir()
        hp = self.hparams
        self.vae = vae_from_sizes(
            tuple(hp.block_out_channels),
            hp.layers_per_block,
            hp.norm_num_groups,
            hp.latent_channels,
            scaling_factor=1.0,
        )
        if hp.init_from:
            load_weights(self.vae, read_weights(Path(hp.init_from)), source=hp.init_from)
        weights = torch.ones(NUM_CLASSES) if hp.class_weights is None else torch.tensor(hp.class_weights).float()
        self.register_buffer("class_weights", weights, persistent=False)
        self._counts = np.zeros((3, NUM_CLASSES), dtype=np.int64)
        self._last_masks: torch.Tensor | None = None

    @property
    def downsampling(self) -> int:
        """The VAE's downsampling factor."""
        return 2 ** (len(self.hparams.block_out_channels) - 1)

    def losses(self, batch: WindowBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The loss terms of a batch; ``loss`` is their weighted sum."""
        hp = self.hparams
        image, mask = batch["image"], batch["mask"]
        if self.training and hp.synthetic:
            # synthetic_mask draws on the CPU: a CPU generator derived from the step's.
            shapes = torch.Generator().manual_seed(generator.initial_seed() + 1) if generator is not None else None
            replace = torch.nonzero(torch.rand(len(mask), generator=shapes) < hp.synthetic).flatten().tolist()
            if replace:
                mask = mask.clone()
                for i in replace:
                    mask[i] = synthetic_mask(mask.shape[-1], shapes).to(mask)
        if hp.images_per_batch is not None:
            image = image[: hp.images_per_batch]
        n = image.shape[0]
        grey = image.expand(-1, 3, -1, -1)
        target_rgb = mask_to_rgb(mask).to(grey.dtype)
        posterior = self.vae.encode(torch.cat([grey, target_rgb])).latent_dist
        decoded = self.vae.decode(posterior.sample(generator)).sample.float()  # (2B, 3, H, W)
        image_hat, mask_rgb = decoded[:n], decoded[n:]
        zero = decoded.sum() * 0
        out = {
            "image_l1": F.l1_loss(image_hat, grey) if n else zero,
            "image_mse": F.mse_loss(image_hat, grey) if n else zero,
            "mask_mse": F.mse_loss(mask_rgb, target_rgb),
        }
        logits = palette_logits(mask_rgb, hp.tau)  # (B, C, H, W)
        out["mask_ce"] = F.cross_entropy(logits, mask, weight=self.class_weights.to(logits))
        probs = logits.softmax(1)[:, 1:]  # organs only
        onehot = F.one_hot(mask, NUM_CLASSES).permute(0, 3, 1, 2)[:, 1:].to(probs)
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        present = onehot.sum((0, 2, 3)) > 0
        dice = (2 * inter + 1) / (denom + 1)
        out["mask_dice"] = 1 - dice[present].mean() if present.any() else dice.sum() * 0
        out["kl"] = (posterior.kl().float() / posterior.mean[0].numel()).mean()  # per latent element
        out["loss"] = (
            hp.image_weight * (out["image_l1"] + out["image_mse"])
            + hp.mask_weight * out["mask_mse"]
            + hp.ce_weight * out["mask_ce"]
            + hp.dice_weight * out["mask_dice"]
            + hp.kl_weight * out["kl"]
        )
        return out

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, self.step_generator(batch))
        check_finite(losses["loss"], batch, self.global_step)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=len(batch["image"]))
        self._last_masks = batch["mask"].detach()
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self._counts = np.zeros((3, NUM_CLASSES), dtype=np.int64)

    @torch.no_grad()
    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        image, mask = pad_to_multiple(batch["image"], batch["mask"], self.downsampling)
        decoded = self.vae.decode(self.vae.encode(mask_to_rgb(mask).to(image.dtype)).latent_dist.mean).sample
        self._counts += overlap_counts(rgb_to_mask(decoded.float()).cpu().numpy(), mask.cpu().numpy())
        grey = image.expand(-1, 3, -1, -1)
        recon = self.vae.decode(self.vae.encode(grey).latent_dist.mean).sample.float()
        self.log("val/image_l1", F.l1_loss(recon, grey), batch_size=len(image))

    def on_validation_epoch_end(self) -> None:
        dice = dice_from_counts(self._counts)
        self.log("val/codec_mDSC", mean_dice(dice) or 0.0, prog_bar=True)
        self.log_dict({f"val/codec_{organ}": value for organ, value in dice.items() if value is not None})

    @torch.no_grad()
    def latent_std(self, masks: torch.Tensor) -> float:
        """Standard deviation of the latent means of masks (N, H, W): the inverse of the scaling factor."""
        was_training = self.vae.training
        self.vae.eval()
        latent = self.vae.encode(mask_to_rgb(masks.to(self.device))).latent_dist.mean
        self.vae.train(was_training)
        return float(latent.float().std())

    def on_train_end(self) -> None:
        if self._last_masks is not None:
            self.vae.register_to_config(scaling_factor=1.0 / self.latent_std(self._last_masks))
        super().on_train_end()

    def export(self, folder: str | Path) -> Path:
        """Write the autoencoder as a diffusers folder (safetensors shards < 4 MB) readable by ``load_vae``."""
        save_vae(self.vae, folder)
        return Path(folder)


class DiTPretrainTask(BackbonePretrainTask):
    """Train the unconditional base DiT on the frozen VAE's mask latents with ε-prediction MSE.

    Each batch's masks are encoded by the frozen VAE (latent mean x scaling factor, :meth:`MaskVAE.encode_mask`),
    each latent is noised ``noise_repeats`` times at uniform timesteps of DiT's schedule, and the DiT predicts the
    noise with the null class label. Validation logs the ε-MSE of the (EMA) DiT on the validation slices with
    fixed noise (``val/loss``).

    Args:
        vae: a local diffusers ``AutoencoderKL`` folder (the pretrained VAE).
        dit: a DiT preset (``DiT-mini/4``, ``DiT-tiny/2``, ...).
        image_size: window size; the latent size is ``image_size / f``.
        learn_sigma: also output σ channels like the released DiTs (they get no loss here, so stay zero).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        warmup_steps: linear warm-up steps.
        noise_repeats: noise draws per encoded latent in a batch.
        ema_decay: decay of an EMA of the DiT weights, exported instead of the raw weights; None: no EMA.
        anneal_seconds: also decay the learning rate by wall time, reaching the end after this many seconds.
        export_dir: diffusers folder written at the end of training (None: no export).
        overwrite: allow ``export_dir`` to replace an existing non-empty folder.
    """

    def __init__(
        self,
        vae: str,
        dit: str = "DiT-mini/4",
        image_size: int = 128,
        learn_sigma: bool = False,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_steps: int = 50,
        noise_repeats: int = 4,
        ema_decay: float | None = 0.995,
        anneal_seconds: float | None = None,
        export_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        check_schedule(lr, warmup_steps, lr_schedule)
        if dit not in DIT_PRESETS:
            raise OptionError(f"unknown DiT preset {dit!r}; expected one of {', '.join(DIT_PRESETS)}")
        if noise_repeats < 1:
            raise OptionError(f"noise_repeats must be at least 1, got {noise_repeats}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise OptionError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        if not (Path(vae) / "config.json").is_file() and not (Path(vae) / "vae" / "config.json").is_file():
            raise OptionError(f"vae {vae} is not a diffusers AutoencoderKL folder: train it first (VAEPretrainTask)")
        self.save_hyperparameters()
        self._check_export_dir()
        hp = self.hparams
        self.vae = MaskVAE(load_vae(hp.vae), NUM_CLASSES)
        self.vae.requires_grad_(False)
        self.vae.eval()
        if hp.image_size % self.vae.downsampling:
            raise OptionError(f"image_size {hp.image_size} is not divisible by the VAE factor {self.vae.downsampling}")
        self.dit = build_dit(
            hp.dit,
            sample_size=hp.image_size // self.vae.downsampling,
            in_channels=self.vae.latent_channels,
            learn_sigma=hp.learn_sigma,
            num_classes=1,
        )
        self.ema = moving_average(self.dit, hp.ema_decay) if hp.ema_decay is not None else None
        self.schedule = NoiseSchedule()

    def train(self, mode: bool = True) -> DiTPretrainTask:
        super().train(mode)
        self.vae.eval()  # frozen, whatever Lightning does
        if self.ema is not None:
            self.ema.module.eval()
        return self

    def epsilon_loss(
        self, dit: DiTTransformer2DModel, mask: torch.Tensor, repeats: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """ε-MSE of ``dit`` on the mask latents of ``mask`` (N, H, W), each noised ``repeats`` times."""
        with torch.no_grad():
            latent = self.vae.encode_mask(mask).float().repeat(repeats, 1, 1, 1)  # (N*r, C, h, w)
        t = self.schedule.timesteps(len(latent), device=latent.device, generator=generator)
        noise = torch.randn(latent.shape, generator=generator, device=latent.device)
        labels = torch.full((len(latent),), null_class(dit), dtype=torch.long, device=latent.device)
        check_square(dit, latent)  # diffusers' forward unpatchifies a square grid
        pred = dit(self.schedule.add_noise(latent, noise, t), timestep=t, class_labels=labels).sample
        return F.mse_loss(pred[:, : latent.shape[1]].float(), noise)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        loss = self.epsilon_loss(self.dit, batch["mask"], self.hparams.noise_repeats, self.step_generator(batch))
        check_finite(loss, batch, self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["mask"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.dit, step=self.global_step)

    @torch.no_grad()
    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        # The centred image_size window of each whole slice: the DiT lays its tokens out on a square grid.
        size = self.hparams.image_size
        top, left = ((n - size) // 2 for n in batch["mask"].shape[-2:])
        mask = crop_window(batch["mask"], top, left, size, 0)
        generator = torch.Generator(mask.device).manual_seed(batch_idx)  # the same noise at every validation
        loss = self.epsilon_loss(self.exported_dit(), mask, 1, generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(mask))

    def exported_dit(self) -> DiTTransformer2DModel:
        """The weights that are shipped: the EMA if kept, else the raw DiT."""
        return self.ema.module if self.ema is not None else self.dit

    def export(self, folder: str | Path) -> Path:
        """Write the DiT as a diffusers folder (safetensors shards < 4 MB) readable by ``load_dit``."""
        save_dit(self.exported_dit(), folder)
        return Path(folder)


__all__ = ["BackbonePretrainTask", "DiTPretrainTask", "VAEPretrainTask", "palette_logits", "synthetic_mask"]
