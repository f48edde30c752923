"""Training augmentation of 2D slices with MONAI dictionary transforms.

No left-right flip: it would turn a left kidney into a right one (DESIGN.md section 2). Rotations, shears and
elastic warps are small, so sides stay sides.
"""

from __future__ import annotations

import math

from monai.transforms import Compose, RandAffined, Rand2DElasticd, RandScaleCropd, Resized


def augmentation(resolution: int) -> Compose:
    """Random crop (resized back), affine (rotation, scale, shear, translation) and elastic warp.

    Works on ``{"image": (1, H, W) float, "mask": (1, H, W) float}`` at ``resolution``; images are resampled
    bilinearly, masks with nearest neighbour. Outside the field of view the image repeats its border
    (air in CT) and the mask is background.
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
        ]
    )
