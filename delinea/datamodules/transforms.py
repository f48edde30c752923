"""Training augmentation of 2D windows with MONAI dictionary transforms.

No left-right flip: it would turn a left kidney into a right one (docs/design.md). Rotations, shears and elastic
warps are small, so sides stay sides. The intensity transforms (gamma, contrast, brightness, noise; images only)
are nnU-Net's kind, at strengths that keep CT air near -1.
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleCropd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)


def augmentation(resolution: int) -> Compose:
    """Random crop (resized back), affine (rotation, scale, shear, translation), elastic warp, then image gamma,
    contrast, brightness and Gaussian noise.

    Works on ``{"image": (1, H, W) float, "mask": (1, H, W) float}`` at ``resolution``; images are resampled
    bilinearly, masks with nearest neighbour. Outside the field of view the image repeats its border
    (air in CT) and the mask is background. The caller clips the image to [-1, 1].
    """
    keys = ("image", "mask")
    modes = ("bilinear", "nearest")
    return Compose(
        [
            RandScaleCropd(keys, roi_scale=0.75, max_roi_scale=1.0, random_size=True, random_center=True),
            Resized(keys, spatial_size=(resolution, resolution), mode=modes),
            RandAffined(
                keys,
                prob=0.8,
                rotate_range=(math.radians(15),),
                scale_range=(0.15, 0.15),
                shear_range=(0.1, 0.1),
                translate_range=(0.06 * resolution, 0.06 * resolution),
                mode=modes,
                padding_mode=("border", "zeros"),
            ),
            Rand2DElasticd(
                keys,
                spacing=(resolution / 4, resolution / 4),
                magnitude_range=(0.0, resolution / 64),
                prob=0.3,
                mode=modes,
                padding_mode=("border", "zeros"),
            ),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
            RandScaleIntensityd("image", factors=0.15, prob=0.3),
            RandShiftIntensityd("image", offsets=0.1, prob=0.3),
            RandGaussianNoised("image", prob=0.2, std=0.03),
        ]
    )
