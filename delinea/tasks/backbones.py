"""Pretraining the small frozen backbones of the CPU demo: a mask-aware VAE and an unconditional base DiT.

MedDelinea steers a *pretrained, frozen* DiT in the latent space of a *pretrained, frozen* VAE (the paper uses
the Stable Diffusion VAE and DiT-XL/2). The CPU demo cannot load those, so it ships two small ones trained here
on the bundled CT only (``delinea/weights/demo``):

* :class:`VAEPretrainTask` trains a diffusers ``AutoencoderKL`` on CT image slices *and* palette-RGB mask
  slices with one network, as the SD VAE encodes both. Masks must survive the codec, so the decoded mask image
  gets a classification loss on its nearest-palette logits ``-|rgb - p_c|^2 / tau`` (cross-entropy and soft
  Dice, which weighs the small organs like the large ones), besides L1/MSE reconstruction and a small KL.
* :class:`DiTPretrainTask` trains the base DiT with ε-prediction MSE on the frozen VAE's mask latents (latent
  mean x scaling factor), null class label, DiT's linear-β schedule, uniform t.
* :func:`codec_ceiling` measures what the frozen VAE lets any latent segmenter reach: 3D Dice of the
  encoded-then-decoded ground-truth masks, decoded by nearest palette colour.

The demo protocol fixes the slices: CT slices with organs are canonical z = 61..111; the slab z = 86..95
(:data:`CT_HELD_OUT`, all eight organs present) is held out, and the MR case is never trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, Dataset

from delinea.labels import FOREGROUND, NUM_CLASSES, ORGANS, PALETTE, mask_to_rgb, rgb_to_mask
from delinea.models.dit import DIT_PRESETS, build_dit, load_weights, read_weights, save_dit
from delinea.models.sampling import DIT_SCHEDULE, training_scheduler
from delinea.models.vae import MaskVAE, load_vae, save_vae, vae_from_sizes
from delinea.tasks.base import adamw_with_schedule, moving_average

#: Canonical axial slices of the bundled CT that hold the eight organs (inclusive).
CT_ORGAN_SLICES: tuple[int, int] = (61, 111)
#: The held-out CT slab of the demo protocol (inclusive): never trained on, by the backbones or anything else.
CT_HELD_OUT: tuple[int, int] = (86, 95)


# ----------------------------------------------------------------------------------------------------------
# Data: slices of one bundled case, selected by z-range, read with the datamodules' own preprocessing


def load_slices(
    root: str | Path = "delinea/sample",
    case: str = "ct",
    modality: Literal["ct", "mr", "auto"] = "ct",
    z_range: tuple[int, int] | None = None,
    exclude: tuple[int, int] | None = None,
    resolution: int = 128,
    only_foreground: bool = False,
    spacing: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Axial slices of one case of a labelled folder, served exactly as the datamodules serve evaluation slices.

    :class:`~delinea.datamodules.folder.FolderDataModule` reads the case (canonical RAS, CT HU window or MR
    percentiles to [-1, 1], unified labels) and resamples each slice onto its plan's lattice over the body box
    (:mod:`delinea.datamodules.plan`); the centred ``resolution`` window of it is kept, padded with background.

    Args:
        root: folder with ``images/<case>.nii.gz`` and ``labels/<case>.nii.gz``.
        case: the case id.
        modality: ``ct``, ``mr`` or ``auto``.
        z_range: inclusive canonical slice range to keep; None keeps every slice.
        exclude: inclusive range removed from ``z_range`` (the held-out slab).
        resolution: window size.
        only_foreground: keep only slices whose mask holds an organ.
        spacing: in-plane spacing in mm to resample to; None keeps the case's own.

    Returns:
        ``(images, masks, slice_indices)``: float32 (Z, 1, R, R) in [-1, 1], int64 (Z, R, R), and the kept z.
    """
    from delinea.datamodules.folder import FolderDataModule
    from delinea.datamodules.plan import IMAGE_FILL, crop_window
    from delinea.io import read_geometry

    image_file = Path(root) / "images" / f"{case}.nii.gz"
    own = read_geometry(image_file).spacing[0] if image_file.exists() else None
    dm = FolderDataModule(root=str(root), modality=modality, split="all", resolution=resolution,
                          spacing=spacing or own)
    dataset = dm.dataset("test")
    number = [f.case_id for f in dataset.files].index(case)
    depth = int((dataset.case_of == number).sum())
    low, high = z_range if z_range is not None else (0, depth - 1)
    if not 0 <= low <= high < depth:
        raise ValueError(f"z_range {z_range} is outside the {depth} axial slices of case {case!r}")
    keep = [k for k in range(low, high + 1) if exclude is None or not exclude[0] <= k <= exclude[1]]
    first = int(np.flatnonzero(dataset.case_of == number)[0])
    items = {k: dataset[first + k] for k in keep}
    if only_foreground:
        keep = [k for k in keep if items[k]["mask"].any()]
    if not keep:
        raise ValueError(f"no slices of case {case!r} left in z_range {z_range} without {exclude}")
    images, masks = [], []
    for k in keep:
        image, mask = items[k]["image"], items[k]["mask"]
        top, left = ((n - resolution) // 2 for n in image.shape[-2:])
        images.append(crop_window(image, top, left, resolution, IMAGE_FILL))  # (1, R, R)
        masks.append(crop_window(mask, top, left, resolution, 0))  # (R, R)
    return torch.stack(images).float().contiguous(), torch.stack(masks).long(), keep


def held_out_ct(root: str | Path = "delinea/sample", resolution: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out CT slab of the demo protocol (:data:`CT_HELD_OUT`): images (10, 1, R, R), masks (10, R, R)."""
    images, masks, _ = load_slices(root, "ct", "ct", CT_HELD_OUT, None, resolution)
    return images, masks


def intensity_augment(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random contrast, brightness, gamma and noise of an image (..., H, W) in [-1, 1] (images only, not masks)."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    x = (image + 1) / 2  # [0, 1]
    x = x.clamp(0, 1) ** math.exp(uniform(-0.4, 0.4))
    x = (x - 0.5) * uniform(0.8, 1.25) + 0.5 + uniform(-0.1, 0.1)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.03)
    return (x * 2 - 1).clamp(-1, 1)


def synthetic_mask(resolution: int, generator: torch.Generator | None = None, shapes: tuple[int, int] = (2, 9)
                   ) -> torch.Tensor:
    """A random mask (R, R) of overlapping rotated ellipses of random organ ids, from a few pixels to half the
    slice across: shapes the codec must keep that the one training CT does not show. Later ellipses win."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand((), generator=generator)

    yy, xx = torch.meshgrid(torch.arange(resolution, dtype=torch.float32),
                            torch.arange(resolution, dtype=torch.float32), indexing="ij")
    mask = torch.zeros(resolution, resolution, dtype=torch.long)
    count = int(torch.randint(shapes[0], shapes[1] + 1, (), generator=generator))
    for _ in range(count):
        cy, cx = uniform(0.1, 0.9) * resolution, uniform(0.1, 0.9) * resolution
        radius = resolution * torch.exp(uniform(math.log(0.015), math.log(0.25)))
        ay, ax = radius * uniform(0.5, 1.5), radius * uniform(0.5, 1.5)
        angle = uniform(0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * torch.cos(angle) + dy * torch.sin(angle)
        v = -dx * torch.sin(angle) + dy * torch.cos(angle)
        mask[(u / ax) ** 2 + (v / ay) ** 2 <= 1] = int(torch.randint(1, NUM_CLASSES, (), generator=generator))
    return mask


def random_affine(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                  rotate: float = 15.0, scale: float = 0.15, shear: float = 0.1, translate: float = 0.06,
                  zoom: tuple[float, float] = (1.0, 1.33)) -> tuple[torch.Tensor, torch.Tensor]:
    """One random 2D affine warp of an image (C, H, W) and its mask (H, W): rotation (degrees), anisotropic
    scale, shear, translation (share of the size) and a zoom-in like a random crop resized back. Bilinear for
    the image with border padding (air stays air), nearest for the mask with background outside. No flips:
    left stays left (DESIGN.md section 2). Plain torch on one slice: far cheaper than MONAI's per-sample
    transforms, which matters on two CPU cores."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    angle = math.radians(uniform(-rotate, rotate))
    zoom_in = uniform(*zoom)
    sx, sy = (uniform(1 - scale, 1 + scale) * zoom_in for _ in range(2))
    shx, shy = uniform(-shear, shear), uniform(-shear, shear)
    cos, sin = math.cos(angle), math.sin(angle)
    # output -> input sampling matrix in normalised coordinates: R(angle) @ Shear @ diag(1/s)
    rot = torch.tensor([[cos, -sin], [sin, cos]])
    sh = torch.tensor([[1.0, shx], [shy, 1.0]])
    linear = rot @ sh @ torch.diag(torch.tensor([1 / sx, 1 / sy]))
    offset = torch.tensor([uniform(-2 * translate, 2 * translate), uniform(-2 * translate, 2 * translate)])
    theta = torch.cat([linear, offset[:, None]], 1)[None].float()  # (1, 2, 3)
    grid = F.affine_grid(theta, [1, 1, *image.shape[-2:]], align_corners=False)
    image = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return image, mask[0, 0].round().long()


class AugmentedSlices(Dataset):
    """``length`` random draws from in-memory slices, each warped by :func:`random_affine` (image and mask
    together) with :func:`intensity_augment` of the image; a ``synthetic`` share of the masks is replaced by
    :func:`synthetic_mask`. With ``augment=False`` it serves the slices as they are, in order.

    Items follow the datamodule batch contract: ``image`` (1, R, R) float, ``mask`` (R, R) int64.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, length: int | None = None, augment: bool = True,
                 synthetic: float = 0.0, seed: int | None = None) -> None:
        if images.shape[0] != masks.shape[0] or images.ndim != 4 or masks.ndim != 3:
            raise ValueError(f"expected images (Z, 1, R, R) and masks (Z, R, R), got {tuple(images.shape)} and "
                             f"{tuple(masks.shape)}")
        self.images, self.masks = images, masks
        self.length = int(length) if length is not None else len(images)
        self.augment, self.synthetic, self.seed = augment, float(synthetic), seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.augment:
            k = index % len(self.images)
            return {"image": self.images[k], "mask": self.masks[k], "slice": k}
        # A fixed seed makes item ``index`` the same draw every time (validation copies); else fresh draws.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index) if self.seed is not None else None
        k = int(torch.randint(0, len(self.images), (), generator=generator))
        image, mask = random_affine(self.images[k], self.masks[k], generator)
        image = intensity_augment(image.clamp(-1, 1), generator)
        if self.synthetic and float(torch.rand((), generator=generator)) < self.synthetic:
            mask = synthetic_mask(mask.shape[-1], generator)
        return {"image": image.contiguous(), "mask": mask.contiguous(), "slice": k}


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class DemoSlicesDataModule(LightningDataModule):
    """Training slices of one bundled case selected by z-range (what ``FolderDataModule`` cannot select),
    augmented on the fly; validation on the same slices unaugmented plus fixed augmented copies.

    The defaults are the demo protocol's CT training slices: z = 61..111 without the held-out slab 86..95.
    Nothing held out is read: validation only reuses training slices.

    Args:
        root: folder with ``images/`` and ``labels/``.
        case: case id.
        modality: ``ct``, ``mr`` or ``auto``.
        z_range: inclusive canonical slice range.
        exclude: inclusive range left out (the held-out slab), or None.
        resolution: slice size.
        batch_size: slices per batch.
        samples_per_epoch: augmented draws per training epoch.
        synthetic: share of training masks replaced by random ellipse masks.
        val_copies: fixed augmented copies of the training slices added to validation.
        num_workers: loader workers.
        seed: seed of the validation copies.
    """

    def __init__(
        self,
        root: str = "delinea/sample",
        case: str = "ct",
        modality: Literal["ct", "mr", "auto"] = "ct",
        z_range: tuple[int, int] | None = CT_ORGAN_SLICES,
        exclude: tuple[int, int] | None = CT_HELD_OUT,
        resolution: int = 128,
        batch_size: int = 8,
        samples_per_epoch: int = 512,
        synthetic: float = 0.0,
        val_copies: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= synthetic < 1:
            raise ValueError(f"synthetic must be in [0, 1), got {synthetic}")
        self.save_hyperparameters()
        self.images: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.slice_indices: list[int] = []

    def setup(self, stage: str | None = None) -> None:
        if self.images is None:
            hp = self.hparams
            self.images, self.masks, self.slice_indices = load_slices(
                hp.root, hp.case, hp.modality, tuple(hp.z_range) if hp.z_range else None,
                tuple(hp.exclude) if hp.exclude else None, hp.resolution, only_foreground=True)

    def class_frequencies(self) -> list[float]:
        """Pixel share of every class over the (unaugmented) training masks."""
        self.setup()
        counts = torch.bincount(self.masks.flatten(), minlength=NUM_CLASSES).double()
        return (counts / counts.sum()).tolist()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        hp = self.hparams
        dataset = AugmentedSlices(self.images, self.masks, hp.samples_per_epoch, True, hp.synthetic)
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=False, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        hp = self.hparams
        plain = AugmentedSlices(self.images, self.masks, augment=False)
        parts: list[Dataset] = [plain]
        if hp.val_copies:
            parts.append(AugmentedSlices(self.images, self.masks, hp.val_copies * len(self.images), True, 0.0,
                                         seed=hp.seed + 1))
        return DataLoader(torch.utils.data.ConcatDataset(parts), batch_size=hp.batch_size, shuffle=False)


# ----------------------------------------------------------------------------------------------------------
# The codec ceiling


def dice_report(pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """Per-organ Dice of two integer label stacks (Z, H, W) pooled over the whole stack (3D Dice).

    Organs absent from both are not scored (``None``) and left out of ``mDSC``, the mean over scored organs.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    organs: dict[str, float | None] = {}
    for c, name in enumerate(ORGANS[1:], start=1):
        p, g = pred == c, target == c
        total = int(p.sum()) + int(g.sum())
        organs[name] = None if total == 0 else 2.0 * int((p & g).sum()) / total
    scored = [v for v in organs.values() if v is not None]
    return {"mDSC": float(np.mean(scored)) if scored else None, "organs": organs}


@torch.no_grad()
def codec_masks(vae: AutoencoderKL | MaskVAE | Any, masks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Masks (Z, H, W) encoded (latent mean) and decoded by ``vae``, then decoded to ids by nearest palette.

    ``vae`` is a diffusers ``AutoencoderKL``, a :class:`~delinea.models.vae.MaskVAE` (through its frozen RGB
    output, ``decode_rgb``), or anything with ``encode_mask(masks)`` and ``decode_rgb(latent)``.
    """
    masks = torch.as_tensor(masks).long()
    module = vae if isinstance(vae, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        out = []
        for start in range(0, len(masks), batch_size):
            chunk = masks[start : start + batch_size]
            if isinstance(vae, AutoencoderKL):
                param = next(vae.parameters())
                rgb = mask_to_rgb(chunk.to(param.device)).to(param.dtype)
                decoded = vae.decode(vae.encode(rgb).latent_dist.mean).sample
            else:
                decoded = vae.decode_rgb(vae.encode_mask(chunk))
            out.append(rgb_to_mask(decoded.float()).cpu())
        return torch.cat(out)
    finally:
        if module is not None:
            module.train(was_training)


def codec_ceiling(vae: AutoencoderKL | MaskVAE | Any, masks: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """The codec ceiling: 3D Dice (per organ and mDSC) of ground-truth masks (Z, H, W) after encoding and
    decoding by ``vae`` (see :func:`codec_masks`). No latent segmenter decoded by this VAE's RGB output can
    exceed it on these masks."""
    masks = torch.as_tensor(masks).long()
    return dice_report(codec_masks(vae, masks, batch_size), masks)


# ----------------------------------------------------------------------------------------------------------
# Shared task machinery


class _BackboneTask(LightningModule):
    """AdamW with warm-up and cosine/linear/constant decay over the run; export after training.

    With ``anneal_seconds`` the decay runs over that many seconds of training (or the steps, whichever ends
    first), as :func:`~delinea.tasks.base.adamw_with_schedule` describes.
    """

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_schedule(self, anneal_seconds=self.hparams.get("anneal_seconds"))

    def _check_export_dir(self) -> None:
        folder = self.hparams.export_dir
        if folder and Path(folder).exists() and any(Path(folder).iterdir()) and not self.hparams.overwrite:
            raise FileExistsError(f"export_dir {folder} exists and is not empty; pass overwrite=True to replace it")

    def on_train_end(self) -> None:
        if self.hparams.export_dir and (self._trainer is None or self.trainer.is_global_zero):
            self.export(self.hparams.export_dir)

    def export(self, folder: str | Path) -> Path:
        raise NotImplementedError


def _check_schedule(lr: float, warmup_steps: int, lr_schedule: str) -> None:
    if lr_schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr_schedule {lr_schedule!r} must be 'cosine', 'linear' or 'constant'")
    if lr <= 0 or warmup_steps < 0:
        raise ValueError(f"lr ({lr}) must be positive and warmup_steps ({warmup_steps}) non-negative")


# ----------------------------------------------------------------------------------------------------------
# VAE


def build_demo_vae(block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
                   norm_num_groups: int = 16, latent_channels: int = 4, scaling_factor: float = 1.0
                   ) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL``; downsampling factor ``2 ** (len(block_out_channels) - 1)``."""
    channels = tuple(int(c) for c in block_out_channels)
    if any(c % norm_num_groups for c in channels):
        raise ValueError(f"block_out_channels {channels} must be multiples of norm_num_groups {norm_num_groups}")
    return vae_from_sizes(channels, layers_per_block, norm_num_groups, latent_channels, scaling_factor)


def random_crops(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent random ``size`` square of every slice: images (B, C, H, W), masks (B, H, W)."""
    height, width = mask.shape[-2:]
    tops = torch.randint(0, height - size + 1, (len(mask),)).tolist()
    lefts = torch.randint(0, width - size + 1, (len(mask),)).tolist()
    image = torch.stack([x[:, t : t + size, l : l + size] for x, t, l in zip(image, tops, lefts)])
    mask = torch.stack([m[t : t + size, l : l + size] for m, t, l in zip(mask, tops, lefts)])
    return image, mask


def palette_logits(rgb: torch.Tensor, tau: float) -> torch.Tensor:
    """Class logits ``-|rgb - p_c|^2 / tau`` of an RGB image (N, 3, H, W): (N, C, H, W); argmax = nearest palette."""
    palette = PALETTE.to(rgb.device, rgb.dtype)
    return -((rgb.unsqueeze(1) - palette[None, :, :, None, None]) ** 2).sum(2) / tau


class VAEPretrainTask(_BackboneTask):
    """Train an ``AutoencoderKL`` on image slices and palette-RGB mask slices with a mask-aware loss.

    Each batch (``image`` (B, 1, H, W), ``mask`` (B, H, W)) goes through the autoencoder as 2B RGB images: the
    grey image repeated to three channels (as :meth:`MaskVAE.encode` feeds it) and the palette image of the
    mask. Loss::

        image_weight * (L1 + MSE)(image)  +  mask_weight * MSE(mask rgb)
        + ce_weight * CE(-|rgb_hat - p_c|^2 / tau)  +  dice_weight * (1 - soft Dice over the organs)
        + kl_weight * KL (per latent element)

    The posterior is sampled in training, so the decoder learns to tolerate latent noise (the DiT's samples
    are never exact). The export sets ``scaling_factor`` to 1 / std of the training masks' latent means, so the
    DiT sees unit-variance latents.

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
        crop_size: train on a random ``crop_size`` square of every slice (the networks are convolutional but for
            the latent attention): the same pixels per second, four times the steps at half the size.
        images_per_batch: images of each batch that are reconstructed (all its masks are); None: all. Masks
            carry the codec ceiling; images only need an informative latent.
        anneal_seconds: also decay the learning rate by wall time, reaching the end after this many seconds.
        init_from: a VAE folder (``save_vae``) of the same architecture whose weights start this run.
        export_dir: diffusers folder written at the end of training (None: no export).
        overwrite: allow ``export_dir`` to replace an existing non-empty folder.
    """

    def __init__(
        self,
        block_out_channels: list[int] = [32, 64, 64],  # noqa: B006 (plain list for the CLI)
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
        crop_size: int | None = None,
        images_per_batch: int | None = None,
        anneal_seconds: float | None = None,
        init_from: str | None = None,
        export_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        _check_schedule(lr, warmup_steps, lr_schedule)
        if init_from is not None and not (Path(init_from) / "config.json").is_file():
            raise FileNotFoundError(f"init_from {init_from} is not a diffusers AutoencoderKL folder (no config.json)")
        factor = 2 ** (len(block_out_channels) - 1)
        if crop_size is not None and (crop_size < factor or crop_size % factor):
            raise ValueError(f"crop_size {crop_size} must be a positive multiple of the VAE factor {factor}")
        if images_per_batch is not None and images_per_batch < 0:
            raise ValueError(f"images_per_batch must be non-negative or None, got {images_per_batch}")
        if class_weights is not None and len(class_weights) != NUM_CLASSES:
            raise ValueError(f"class_weights needs {NUM_CLASSES} values, got {len(class_weights)}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.save_hyperparameters()
        self._check_export_dir()
        self.configure_models()

    def configure_models(self) -> None:
        if hasattr(self, "vae"):  # Lightning calls this hook again at fit start
            return
        hp = self.hparams
        self.vae = build_demo_vae(hp.block_out_channels, hp.layers_per_block, hp.norm_num_groups, hp.latent_channels)
        if hp.init_from:
            load_weights(self.vae, read_weights(Path(hp.init_from)), source=hp.init_from)
        weights = torch.ones(NUM_CLASSES) if hp.class_weights is None else torch.tensor(hp.class_weights).float()
        self.register_buffer("class_weights", weights, persistent=False)
        self._organ_counts: torch.Tensor | None = None

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.hparams.block_out_channels) - 1)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss terms of a batch; ``loss`` is their weighted sum."""
        hp = self.hparams
        image, mask = batch["image"], batch["mask"]
        if self.training and hp.crop_size is not None and hp.crop_size < mask.shape[-1]:
            image, mask = random_crops(image, mask, hp.crop_size)
        if hp.images_per_batch is not None:
            image = image[: hp.images_per_batch]
        n = image.shape[0]
        grey = image.expand(-1, 3, -1, -1)
        target_rgb = mask_to_rgb(mask).to(grey.dtype)
        posterior = self.vae.encode(torch.cat([grey, target_rgb])).latent_dist
        decoded = self.vae.decode(posterior.sample()).sample.float()  # (2B, 3, H, W)
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
        kl = posterior.kl().float() / posterior.mean[0].numel()  # per latent element
        out["kl"] = kl.mean()
        out["loss"] = (hp.image_weight * (out["image_l1"] + out["image_mse"]) + hp.mask_weight * out["mask_mse"]
                       + hp.ce_weight * out["mask_ce"] + hp.dice_weight * out["mask_dice"] + hp.kl_weight * out["kl"])
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=len(batch["image"]))
        self.log("loss", losses["loss"], prog_bar=True, logger=False, batch_size=len(batch["image"]))
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self._organ_counts = torch.zeros(3, NUM_CLASSES, dtype=torch.float64)  # intersection, pred, target

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, mask = batch["image"], batch["mask"]
        decoded = codec_masks(self.vae, mask)
        for c in range(1, NUM_CLASSES):
            p, g = decoded == c, mask.cpu() == c
            self._organ_counts[:, c] += torch.tensor([(p & g).sum(), p.sum(), g.sum()], dtype=torch.float64)
        with torch.no_grad():
            grey = image.expand(-1, 3, -1, -1)
            recon = self.vae.decode(self.vae.encode(grey).latent_dist.mean).sample.float()
            self.log("val/image_l1", F.l1_loss(recon, grey), batch_size=len(image))

    def on_validation_epoch_end(self) -> None:
        counts = self._organ_counts
        scored = (counts[1] + counts[2]) > 0
        scored[0] = False
        dice = 2 * counts[0] / (counts[1] + counts[2]).clamp(min=1)
        self.log("val/codec_mDSC", float(dice[scored].mean()) if scored.any() else 0.0, prog_bar=True)
        for c in range(1, NUM_CLASSES):
            if scored[c]:
                self.log(f"val/codec_{ORGANS[c]}", float(dice[c]))

    @torch.no_grad()
    def latent_std(self, masks: torch.Tensor, batch_size: int = 16) -> float:
        """Standard deviation of the latent means of masks (Z, H, W): the inverse of the scaling factor."""
        was_training = self.vae.training
        self.vae.eval()
        latents = [self.vae.encode(mask_to_rgb(masks[i : i + batch_size].to(self.device))).latent_dist.mean
                   for i in range(0, len(masks), batch_size)]
        self.vae.train(was_training)
        return float(torch.cat(latents).float().std())

    def on_train_end(self) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        masks = getattr(datamodule, "masks", None)
        if masks is not None:
            self.vae.register_to_config(scaling_factor=1.0 / self.latent_std(masks))
        super().on_train_end()

    def export(self, folder: str | Path) -> Path:
        """Write the autoencoder as a diffusers folder (safetensors shards < 4 MB) readable by ``load_vae``."""
        save_vae(self.vae, folder)
        return Path(folder)


# ----------------------------------------------------------------------------------------------------------
# DiT


class DiTPretrainTask(_BackboneTask):
    """Train the unconditional base DiT on the frozen VAE's mask latents with ε-prediction MSE.

    Each batch's masks (``mask`` (B, H, W), augmented by the datamodule) are encoded by the frozen VAE (latent
    mean x scaling factor, :meth:`MaskVAE.encode_mask`), each latent is noised ``noise_repeats`` times at
    uniform timesteps of DiT's linear-β schedule, and the DiT predicts the noise with the null class label.

    Args:
        vae: a local diffusers ``AutoencoderKL`` folder (the pretrained demo VAE).
        dit: a DiT preset (``DiT-mini/2``, ``DiT-mini/4``, ``DiT-tiny/2``, ...).
        image_size: slice size; the latent size is ``image_size / f``.
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
        vae: str = "delinea/weights/demo/vae",
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
        _check_schedule(lr, warmup_steps, lr_schedule)
        if dit not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {dit!r}; expected one of {', '.join(DIT_PRESETS)}")
        if noise_repeats < 1:
            raise ValueError(f"noise_repeats must be at least 1, got {noise_repeats}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        self.save_hyperparameters()
        self._check_export_dir()
        self.configure_models()

    def configure_models(self) -> None:
        if hasattr(self, "dit"):
            return
        hp = self.hparams
        if not Path(hp.vae).exists():
            raise FileNotFoundError(f"vae {hp.vae} does not exist: train it first (configs/demo/vae.yaml)")
        self.vae = MaskVAE(load_vae(hp.vae), NUM_CLASSES)
        self.vae.requires_grad_(False)
        self.vae.eval()
        if hp.image_size % self.vae.downsampling:
            raise ValueError(f"image_size {hp.image_size} is not divisible by the VAE factor {self.vae.downsampling}")
        self.dit = build_dit(hp.dit, sample_size=hp.image_size // self.vae.downsampling,
                             in_channels=self.vae.latent_channels, learn_sigma=hp.learn_sigma, num_classes=1)
        self.ema = moving_average(self.dit, hp.ema_decay) if hp.ema_decay is not None else None
        self.scheduler = training_scheduler()
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)

    @property
    def null_class(self) -> int:
        """The DiT's null class: the last row of its label table (1 for a one-class table)."""
        return self.dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings - 1

    def train(self, mode: bool = True) -> DiTPretrainTask:
        super().train(mode)
        self.vae.eval()  # frozen, whatever Lightning does
        if self.ema is not None:
            self.ema.module.eval()
        return self

    @torch.no_grad()
    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        """Scaled mask latents (B, C, h, w) of masks (B, H, W)."""
        return self.vae.encode_mask(mask).float()

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latent = self.encode(batch["mask"]).repeat(self.hparams.noise_repeats, 1, 1, 1)  # (B*r, C, h, w)
        n = latent.shape[0]
        timestep = torch.randint(0, len(self.alphas_cumprod), (n,), device=latent.device)
        noise = torch.randn_like(latent)
        alpha = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latent + (1 - alpha).sqrt() * noise
        labels = torch.full((n,), self.null_class, dtype=torch.long, device=latent.device)
        pred = self.dit(noisy, timestep=timestep, class_labels=labels).sample[:, : latent.shape[1]].float()
        return {"loss": F.mse_loss(pred, noise)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.losses(batch)["loss"]
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["mask"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.dit, step=self.global_step)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(batch_idx)  # the same noise every validation: comparable
        latent = self.encode(batch["mask"])
        n = latent.shape[0]
        timestep = torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator).to(latent.device)
        noise = torch.randn(latent.shape, generator=generator).to(latent)
        alpha = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latent + (1 - alpha).sqrt() * noise
        labels = torch.full((n,), self.null_class, dtype=torch.long, device=latent.device)
        dit = self.ema.module if self.ema is not None else self.dit
        pred = dit(noisy, timestep=timestep, class_labels=labels).sample[:, : latent.shape[1]].float()
        self.log("val/loss", F.mse_loss(pred, noise), prog_bar=True, batch_size=n)

    def exported_dit(self) -> DiTTransformer2DModel:
        """The weights that are shipped: the EMA if kept, else the raw DiT."""
        return self.ema.module if self.ema is not None else self.dit

    def export(self, folder: str | Path) -> Path:
        """Write the DiT as a diffusers folder (safetensors shards < 4 MB) readable by ``load_dit``."""
        save_dit(self.exported_dit(), folder)
        return Path(folder)


# ----------------------------------------------------------------------------------------------------------
# Sample quality of the base DiT


@torch.no_grad()
def sample_masks(dit: DiTTransformer2DModel, vae: MaskVAE, count: int = 16, steps: int = 20, seed: int = 0,
                 batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconditional samples of the base DiT: DDIM (η = 0) from noise, decoded by the VAE's RGB output.

    Returns:
        ``(rgb, masks)``: decoded images (N, 3, H, W) and their nearest-palette masks (N, H, W).
    """
    generator = torch.Generator().manual_seed(seed)
    rows = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    side = dit.config.sample_size
    channels = dit.config.in_channels
    rgbs = []
    dit.eval()
    vae.eval()
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        sampler = DDIMScheduler(**DIT_SCHEDULE, clip_sample=False)
        sampler.set_timesteps(steps)
        z = torch.randn((n, channels, side, side), generator=generator)
        labels = torch.full((n,), rows - 1, dtype=torch.long)
        for t in sampler.timesteps:
            eps = dit(z, timestep=t.expand(n), class_labels=labels).sample[:, :channels]
            z = sampler.step(eps, t, z).prev_sample
        rgbs.append(vae.decode_rgb(z).float())
    rgb = torch.cat(rgbs)
    return rgb, rgb_to_mask(rgb)


@torch.no_grad()
def denoising_dice(dit: DiTTransformer2DModel, vae: MaskVAE, masks: torch.Tensor,
                   timesteps: Sequence[int] = (50, 100, 250, 500, 750), seed: int = 0) -> dict[int, float | None]:
    """What the frozen pair gives without any control: masks (Z, H, W) are encoded, noised to ``x_t``, denoised
    in one step by the base DiT (Tweedie, ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``) and decoded by
    nearest palette; the 3D mDSC per t. MedDelinea's L_seg decodes exactly this estimate (for t < 500)."""
    generator = torch.Generator().manual_seed(seed)
    alphas = training_scheduler().alphas_cumprod
    rows = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    dit.eval()
    vae.eval()
    latent = vae.encode_mask(masks)
    labels = torch.full((len(masks),), rows - 1, dtype=torch.long)
    out: dict[int, float | None] = {}
    for t in timesteps:
        alpha = alphas[t]
        noise = torch.randn(latent.shape, generator=generator)
        noisy = alpha.sqrt() * latent + (1 - alpha).sqrt() * noise
        eps = dit(noisy, timestep=torch.full((len(masks),), t), class_labels=labels).sample[:, : latent.shape[1]]
        estimate = (noisy - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        out[int(t)] = dice_report(rgb_to_mask(vae.decode_rgb(estimate).float()), masks)["mDSC"]
    return out


def sample_statistics(rgb: torch.Tensor, masks: torch.Tensor, reference: torch.Tensor,
                      palette_radius: float = 0.5) -> dict[str, Any]:
    """Honest summary statistics of generated masks against reference (training) masks.

    * ``palette_pixel_fraction``: share of decoded pixels within ``palette_radius`` (Euclidean, RGB in [-1, 1])
      of a palette colour (1 for clean masks; the reference's own value through the codec is a fair target).
    * ``organ_area``: mean pixel share per organ, samples vs reference.
    * ``organs_present``: mean number of organs per slice (>= 20 pixels), samples vs reference.
    * ``components``: mean connected components per present organ (>= 5 pixels), samples vs reference.
    """
    from scipy import ndimage

    palette = PALETTE.to(rgb)
    distance = ((rgb.unsqueeze(1) - palette[None, :, :, None, None]) ** 2).sum(2).min(1).values.sqrt()

    def describe(stack: torch.Tensor) -> dict[str, Any]:
        area = {name: float((stack == c).float().mean()) for c, name in enumerate(ORGANS) if c > 0}
        present, parts = [], []
        for m in stack.numpy():
            present.append(sum(int((m == c).sum() >= 20) for c in range(1, NUM_CLASSES)))
            for c in range(1, NUM_CLASSES):
                if (m == c).sum() >= 5:
                    parts.append(ndimage.label(m == c)[1])
        return {"organ_area": area, "organs_present": float(np.mean(present)),
                "components": float(np.mean(parts)) if parts else 0.0}

    return {
        "palette_pixel_fraction": float((distance < palette_radius).float().mean()),
        "samples": describe(masks.cpu()),
        "reference": describe(reference.cpu()),
        "foreground_organs": list(FOREGROUND),
    }
