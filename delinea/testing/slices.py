"""Tiny synthetic slice batches in the datamodules' batch format, for model and task tests (no files needed)."""

from __future__ import annotations

import torch

from delinea.labels import ORGAN_IDS


def make_batch(n: int = 8, size: int = 32, seed: int = 0) -> dict:
    """Slices with a bright disk (liver) and a darker square (spleen) at random places, with their masks."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(n):
        mask = torch.zeros(size, size, dtype=torch.long)
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=generator).tolist()
        radius = int(torch.randint(size // 8, size // 4, (1,), generator=generator))
        mask[(ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2] = ORGAN_IDS["liver"]
        sy, sx = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
        square = torch.zeros_like(mask, dtype=torch.bool)
        square[sy : sy + size // 5, sx : sx + size // 5] = True
        mask[square & (mask == 0)] = ORGAN_IDS["spleen"]
        image = torch.full((size, size), -0.8)
        image[mask == ORGAN_IDS["liver"]] = 0.7
        image[mask == ORGAN_IDS["spleen"]] = 0.0
        images.append(image + 0.05 * torch.randn(size, size, generator=generator))
        masks.append(mask)
    return {
        "image": torch.stack(images)[:, None].clamp(-1, 1),
        "mask": torch.stack(masks),
        "labelled": torch.ones(n, 9, dtype=torch.bool),
        "case_id": [f"case{seed}"] * n,
        "slice_index": torch.arange(n),
        "cache_key": [f"synthetic/{seed}/{i}/{size}" for i in range(n)],
    }


class SyntheticSlices(torch.utils.data.Dataset):
    """A fixed set of :func:`make_batch` slices served one at a time (collated by the default collate)."""

    def __init__(self, n: int = 16, size: int = 32, seed: int = 0) -> None:
        self.batch = make_batch(n, size, seed)

    def __len__(self) -> int:
        return len(self.batch["image"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}
