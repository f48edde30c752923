"""The unified organ label space shared by every dataset, and the palette that carries masks through the VAE.

Every dataset's label ids are mapped into these ids before anything else sees them, so pretraining,
fine-tuning and zero-shot testing agree on what class ``c`` means.
"""

from __future__ import annotations

import torch

ORGANS: tuple[str, ...] = (
    "background",
    "aorta",
    "gallbladder",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "spleen",
    "stomach",
)
NUM_CLASSES = len(ORGANS)
ORGAN_IDS: dict[str, int] = {name: i for i, name in enumerate(ORGANS)}
FOREGROUND = ORGANS[1:]

# Mask colours in the VAE's [-1, 1] RGB range. Seven cube corners plus the centre: every pair is at least
# sqrt(3) apart, so nearest-palette decoding tolerates the VAE's reconstruction error.
PALETTE = torch.tensor(
    [
        [-1.0, -1.0, -1.0],  # background: black
        [1.0, -1.0, -1.0],  # aorta: red
        [-1.0, 1.0, -1.0],  # gallbladder: green
        [-1.0, -1.0, 1.0],  # kidney_left: blue
        [1.0, 1.0, -1.0],  # kidney_right: yellow
        [1.0, -1.0, 1.0],  # liver: magenta
        [-1.0, 1.0, 1.0],  # pancreas: cyan
        [1.0, 1.0, 1.0],  # spleen: white
        [0.0, 0.0, 0.0],  # stomach: grey
    ]
)

# Source label id -> unified id, per dataset (docs/design.md). Ids not listed map to background.
ATLAS8K = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 8: 7, 9: 8}
BTCV = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
AMOS = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 10: 6, 1: 7, 7: 8}
# TotalSegmentator ids of the bundled sample (aorta is 52 in the CT scheme `total`, 23 in `total_mr`).
TOTALSEG_CT = {52: 1, 4: 2, 3: 3, 2: 4, 5: 5, 7: 6, 1: 7, 6: 8}
TOTALSEG_MR = {23: 1, 4: 2, 3: 3, 2: 4, 5: 5, 7: 6, 1: 7, 6: 8}
# AbdomenAtlas per-organ mask file stems (segmentations/<name>.nii.gz) -> unified id.
ATLAS8K_FILES = {
    "aorta": 1,
    "gall_bladder": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "liver": 5,
    "pancreas": 6,
    "spleen": 7,
    "stomach": 8,
}


def all_labelled() -> torch.Tensor:
    """Class mask for fully annotated datasets: every class, background included, is labelled."""
    return torch.ones(NUM_CLASSES, dtype=torch.bool)


def only_labelled(*organs: str) -> torch.Tensor:
    """Class mask for single-organ datasets: only ``organs`` are known; background and the rest are unlabelled."""
    mask = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    for organ in organs:
        mask[ORGAN_IDS[organ]] = True
    return mask


def mask_to_rgb(mask: torch.Tensor) -> torch.Tensor:
    """Palette-encode an integer mask (B, H, W) into an RGB image (B, 3, H, W) in [-1, 1]."""
    return PALETTE.to(mask.device)[mask.long()].permute(0, 3, 1, 2).contiguous()


def rgb_to_mask(rgb: torch.Tensor) -> torch.Tensor:
    """Nearest-palette decoding of an RGB image (B, 3, H, W) into an integer mask (B, H, W)."""
    palette = PALETTE.to(rgb.device, rgb.dtype)
    distance = ((rgb.unsqueeze(1) - palette[None, :, :, None, None]) ** 2).sum(2)  # (B, C, H, W)
    return distance.argmin(1)
