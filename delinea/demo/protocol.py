"""The demo protocol: which slices of the bundled sample train, validate and test, fixed before any training, and
the measurements of the shipped backbones (codec ceiling, DiT samples).

The bundled CT (``delinea/sample``, 122 x 101 x 112 at 3 mm) holds the eight organs on canonical slices
z = 61..111. The held-out slab z = 86..95 (:data:`CT_HELD_OUT`, all eight organs present) is never trained on, by the
backbones or anything else; nor is the MR. The MR's upper half (z = 10..19) fine-tunes the few-shot models and its
lower half (z = 0..9) tests them. Validation slices for choosing checkpoints come from the training slabs only
(:data:`CT_VALIDATION`), so that the held-out slab and the MR are never looked at while choosing anything.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from diffusers import DiTTransformer2DModel

from delinea.datamodules import FolderDataModule
from delinea.evaluation import dice_from_counts, mean_dice, overlap_counts
from delinea.geometry import IMAGE_FILL, crop_window
from delinea.io import read_geometry
from delinea.labels import FOREGROUND, NUM_CLASSES, ORGANS, PALETTE, rgb_to_mask
from delinea.models.diffusion import NoiseSchedule, null_class, sample_latents
from delinea.models.vae import MaskVAE

#: Where the package keeps the demo's files (found through the package, never the working directory).
PACKAGE = Path(str(importlib.resources.files("delinea")))
SAMPLE = PACKAGE / "sample"
WEIGHTS = PACKAGE / "demo" / "weights"
CONFIGS = PACKAGE / "demo" / "configs"

#: Canonical axial slices of the bundled CT that hold the eight organs (inclusive).
CT_ORGANS: tuple[int, int] = (61, 111)
#: The held-out CT slab (inclusive): never trained on, by the backbones or anything else.
CT_HELD_OUT: tuple[int, int] = (86, 95)
#: The CT training slabs (inclusive): the organ slices around the held-out slab.
CT_TRAIN: tuple[tuple[int, int], ...] = ((CT_ORGANS[0], CT_HELD_OUT[0] - 1), (CT_HELD_OUT[1] + 1, CT_ORGANS[1]))
#: Validation slabs (inclusive) inside the CT training slabs, away from the held-out slab: pretraining leaves them
#: out of training and picks checkpoints and seeds by their Dice (the backbones did train on them).
CT_VALIDATION: tuple[tuple[int, int], ...] = ((64, 68), (104, 108))
#: MR halves of the few-shot protocol (inclusive): fine-tune on the upper, test on the lower.
MR_FEWSHOT_TRAIN: tuple[int, int] = (10, 19)
MR_FEWSHOT_TEST: tuple[int, int] = (0, 9)
#: The demo's plan: 3 mm pixels (the sample's own), 128-pixel windows.
SPACING, WINDOW = 3.0, 128


def cut_slab(case: str, z: tuple[int, int], folder: Path, name: str) -> None:
    """Write canonical slices ``z[0]..z[1]`` of a sample case as a case of its own (affine shifted)."""
    for kind in ("images", "labels"):
        image = nib.as_closest_canonical(nib.load(SAMPLE / kind / f"{case}.nii.gz"))
        slab = image.slicer[:, :, z[0] : z[1] + 1]
        (folder / kind).mkdir(parents=True, exist_ok=True)
        nib.save(slab, folder / kind / f"{name}.nii.gz")


def prepare(data: Path) -> dict[str, Path]:
    """The demo's datasets, one ``FolderDataModule`` root each, cut from the sample into ``data``."""
    folders = {
        name: data / name for name in ("ct_train", "ct_heldout", "mr_all", "mr_fewshot_train", "mr_fewshot_test")
    }
    cut_slab("ct", CT_TRAIN[0], folders["ct_train"], "ct_lower")
    cut_slab("ct", CT_TRAIN[1], folders["ct_train"], "ct_upper")
    cut_slab("ct", CT_HELD_OUT, folders["ct_heldout"], "ct_slab")
    depth = read_geometry(SAMPLE / "images" / "mr.nii.gz").canonical_shape[2]
    cut_slab("mr", (0, depth - 1), folders["mr_all"], "mr")
    cut_slab("mr", MR_FEWSHOT_TRAIN, folders["mr_fewshot_train"], "mr_upper")
    cut_slab("mr", MR_FEWSHOT_TEST, folders["mr_fewshot_test"], "mr_lower")
    return folders


def load_slices(
    root: str | Path = SAMPLE,
    case: str = "ct",
    modality: Literal["ct", "mr", "auto"] = "ct",
    z_range: tuple[int, int] | None = None,
    exclude: tuple[int, int] | None = None,
    resolution: int = WINDOW,
    only_foreground: bool = False,
    spacing: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Axial slices of one case of a labelled folder, served exactly as the datamodules serve evaluation slices.

    :class:`~delinea.datamodules.folder.FolderDataModule` reads the case (canonical RAS, CT HU window or MR
    percentiles to [-1, 1], unified labels) and resamples each slice onto its plan's lattice over the body box; the
    centred ``resolution`` window of it is kept, padded with background.

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
    own = read_geometry(Path(root) / "images" / f"{case}.nii.gz").spacing[0]
    dm = FolderDataModule(root=str(root), modality=modality, split="all", resolution=resolution, spacing=spacing or own)
    dataset = dm.dataset("test")
    number = [f.case_id for f in dataset.files].index(case)
    first = int(np.flatnonzero(dataset.case_of == number)[0])
    depth = int((dataset.case_of == number).sum())
    low, high = z_range if z_range is not None else (0, depth - 1)
    if not 0 <= low <= high < depth:
        raise ValueError(f"z_range {z_range} is outside the {depth} axial slices of case {case!r}")
    keep = [k for k in range(low, high + 1) if exclude is None or not exclude[0] <= k <= exclude[1]]
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


def held_out_ct(resolution: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out CT slab (:data:`CT_HELD_OUT`): images (10, 1, R, R), masks (10, R, R)."""
    images, masks, _ = load_slices(SAMPLE, "ct", "ct", CT_HELD_OUT, None, resolution)
    return images, masks


# ----------------------------------------------------------------------------------------------------------
# Measuring the backbones


@torch.no_grad()
def codec_masks(vae: MaskVAE, masks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Masks (Z, H, W) encoded (latent mean) and decoded by the VAE's RGB output, read by nearest palette colour."""
    vae.eval()
    out = [
        rgb_to_mask(vae.decode_rgb(vae.encode_mask(masks[i : i + batch_size])).float())
        for i in range(0, len(masks), batch_size)
    ]
    return torch.cat(out)


def codec_ceiling(vae: MaskVAE, masks: torch.Tensor) -> dict[str, Any]:
    """The codec ceiling: 3D Dice (per organ and mDSC) of ground-truth masks (Z, H, W) after the VAE's round
    trip. No latent segmenter decoded by this VAE's RGB output can exceed it on these masks."""
    dice = dice_from_counts(overlap_counts(codec_masks(vae, masks).numpy(), masks.numpy()))
    return {"mDSC": mean_dice(dice), "organs": dice}


@torch.no_grad()
def sample_masks(
    dit: DiTTransformer2DModel, vae: MaskVAE, count: int = 16, steps: int = 20, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconditional samples of the base DiT (DDIM, η = 0, from noise) decoded by the VAE's RGB output.

    Returns:
        ``(rgb, masks)``: decoded images (N, 3, H, W) and their nearest-palette masks (N, H, W).
    """
    dit.eval()
    vae.eval()
    labels = torch.full((count,), null_class(dit), dtype=torch.long)
    side, channels = dit.config.sample_size, dit.config.in_channels

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dit(z, timestep=t.expand(len(z)), class_labels=labels).sample[:, :channels]

    z = sample_latents(denoise, (count, channels, side, side), "ddim", steps, torch.Generator().manual_seed(seed))
    rgb = vae.decode_rgb(z).float()
    return rgb, rgb_to_mask(rgb)


@torch.no_grad()
def denoising_dice(
    dit: DiTTransformer2DModel,
    vae: MaskVAE,
    masks: torch.Tensor,
    timesteps: Sequence[int] = (50, 100, 250, 500, 750),
    seed: int = 0,
) -> dict[int, float | None]:
    """What the frozen pair gives without any control: masks (Z, H, W) are encoded, noised to t, denoised in one step
    by the base DiT (Tweedie's estimate) and decoded by nearest palette; the 3D mDSC per t. MedDelinea's L_seg
    decodes exactly this estimate."""
    generator = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule()
    dit.eval()
    vae.eval()
    latent = vae.encode_mask(masks)
    labels = torch.full((len(masks),), null_class(dit), dtype=torch.long)
    out: dict[int, float | None] = {}
    for step in timesteps:
        t = torch.full((len(masks),), step)
        noisy = schedule.add_noise(latent, torch.randn(latent.shape, generator=generator), t)
        eps = dit(noisy, timestep=t, class_labels=labels).sample[:, : latent.shape[1]]
        decoded = rgb_to_mask(vae.decode_rgb(schedule.tweedie(noisy, eps, t)).float())
        out[int(step)] = mean_dice(dice_from_counts(overlap_counts(decoded.numpy(), masks.numpy())))
    return out


def sample_statistics(
    rgb: torch.Tensor, masks: torch.Tensor, reference: torch.Tensor, palette_radius: float = 0.5
) -> dict[str, Any]:
    """Summary statistics of generated masks against reference (training) masks.

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
            parts += [ndimage.label(m == c)[1] for c in range(1, NUM_CLASSES) if (m == c).sum() >= 5]
        return {
            "organ_area": area,
            "organs_present": float(np.mean(present)),
            "components": float(np.mean(parts)) if parts else 0.0,
        }

    return {
        "palette_pixel_fraction": float((distance < palette_radius).float().mean()),
        "samples": describe(masks.cpu()),
        "reference": describe(reference.cpu()),
        "foreground_organs": list(FOREGROUND),
    }
