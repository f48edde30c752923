"""Training augmentation: varied, in range, aligned with the mask, and never swapping sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from delinea.datamodules import BTCVDataModule
from delinea.labels import ORGAN_IDS
from delinea.testing.phantoms import Phantom

Layout = tuple[Path, dict[str, Phantom]]


def test_augmentation_varies_keeps_range_and_never_flips_sides(btcv: Layout) -> None:
    dm = BTCVDataModule(root=str(btcv[0]), resolution=64, batch_size=4, augment=True)
    dataset = dm.dataset("train")
    plain = BTCVDataModule(root=str(btcv[0]), resolution=64).dataset("train")
    index = next(i for i in range(len(dataset)) if dataset.slice_of[i] == 3)
    changed, left_of_right = 0, []
    for seed in range(12):
        sample = dataset[(index, 64, seed)]
        reference = plain[(index, 64, seed)]  # the same window, not augmented
        assert torch.equal(dataset[(index, 64, seed)]["image"], sample["image"])  # a seed is one draw
        assert sample["image"].shape == (1, 64, 64) and sample["mask"].shape == (64, 64)
        assert sample["image"].min() >= -1 and sample["image"].max() <= 1 and sample["cache_key"] == ""
        assert sample["mask"].dtype == torch.int64 and set(sample["mask"].unique().tolist()) <= set(range(9))
        changed += not torch.equal(sample["image"], reference["image"])
        rows = {
            k: torch.nonzero(sample["mask"] == ORGAN_IDS[k])[:, 0].float().mean()
            for k in ("kidney_left", "kidney_right")
        }
        if not any(torch.isnan(v) for v in rows.values()):
            left_of_right.append(bool(rows["kidney_left"] < rows["kidney_right"]))  # H is RAS x: left is smaller
        # The mask moves with the image: kidneys (bright in CT) stay bright under the warped mask.
        kidney = (sample["mask"] == ORGAN_IDS["kidney_left"]) | (sample["mask"] == ORGAN_IDS["kidney_right"])
        if kidney.sum() > 5:
            assert sample["image"][0][kidney].mean() > sample["image"][0][sample["mask"] == 0].mean() + 0.3
    assert changed >= 10
    assert len(left_of_right) >= 8 and all(left_of_right)


def test_workers_draw_different_augmentations(btcv: Layout) -> None:
    dm = BTCVDataModule(root=str(btcv[0]), resolution=32, batch_size=1, augment=True, num_workers=2)
    images = [b["image"] for b, _ in zip(dm.train_dataloader(), range(4))]
    assert not torch.equal(images[0], images[1])  # batches 0 and 1 come from different workers
    assert np.isfinite(torch.stack(images).numpy()).all()
