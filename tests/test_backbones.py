"""The demo backbones: VAE and base-DiT pretraining tasks, the codec ceiling, the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from delinea.labels import NUM_CLASSES, ORGANS, mask_to_rgb
from delinea.models.dit import load_dit
from delinea.models.vae import MaskVAE, load_vae
from delinea.tasks.backbones import (
    CT_HELD_OUT,
    AugmentedSlices,
    DemoSlicesDataModule,
    DiTPretrainTask,
    VAEPretrainTask,
    codec_ceiling,
    dice_report,
    held_out_ct,
    sample_masks,
    sample_statistics,
    synthetic_mask,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "delinea" / "sample"
WEIGHTS = REPO / "delinea" / "weights" / "demo"


def tiny_slices(n: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.stack([synthetic_mask(size, generator) for _ in range(n)])
    images = (masks.float() / (NUM_CLASSES - 1) * 2 - 1)[:, None] * 0.8  # an image that follows the mask
    return images, masks


class TinySlices(LightningDataModule):
    """Fixed tiny slices, with ``masks`` for the VAE's scaling-factor fit (as DemoSlicesDataModule has)."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.images, self.masks = tiny_slices()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(AugmentedSlices(self.images, self.masks, length=64, augment=False),
                          batch_size=self.batch_size)


def fit(task, datamodule, steps: int) -> None:  # noqa: ANN001
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(task, datamodule=datamodule)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run faster on one thread, and far faster when other jobs hold the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_VAE = dict(block_out_channels=[8, 16], norm_num_groups=4, lr=3e-3, warmup_steps=0, lr_schedule="constant")


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    task = VAEPretrainTask(**TINY_VAE, export_dir=str(folder))
    fit(task, TinySlices(), steps=2)
    return folder


def test_vae_task_learns_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TinySlices()
    batch = next(iter(data.train_dataloader()))
    task = VAEPretrainTask(**TINY_VAE, export_dir=str(tmp_path / "vae"))
    with torch.no_grad():
        torch.manual_seed(1)
        before = task.losses(batch)
    fit(task, data, steps=25)
    with torch.no_grad():
        torch.manual_seed(1)
        after = task.losses(batch)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["mask_ce"] < before["mask_ce"]
    # on_train_end exported with the scaling factor fitted to the training masks' latents
    vae = load_vae(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(1.0 / task.latent_std(data.masks), rel=1e-5)
    assert tuple(vae.config.block_out_channels) == (8, 16)
    task.vae.eval()
    rgb = mask_to_rgb(data.masks)
    with torch.no_grad():
        expected = task.vae.decode(task.vae.encode(rgb).latent_dist.mean).sample
        got = vae.decode(vae.encode(rgb).latent_dist.mean).sample
    torch.testing.assert_close(got, expected)


def test_vae_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):
        VAEPretrainTask(**TINY_VAE, export_dir=str(tmp_path / "vae"))


def test_dit_task_learns_and_exports(tiny_vae_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TinySlices(batch_size=4)
    batch = next(iter(data.train_dataloader()))
    task = DiTPretrainTask(vae=str(tiny_vae_folder), dit="DiT-tiny/2", image_size=32, lr=2e-3, warmup_steps=0,
                           lr_schedule="constant", noise_repeats=4, ema_decay=0.5, export_dir=str(tmp_path / "dit"))
    assert task.null_class == 1 and task.dit.config.sample_size == 16
    frozen = {k: v.clone() for k, v in task.vae.state_dict().items()}

    def loss() -> float:
        torch.manual_seed(3)
        with torch.no_grad():
            return sum(float(task.losses(batch)["loss"]) for _ in range(4)) / 4

    before = loss()
    fit(task, data, steps=30)
    after = loss()
    assert after < 0.85 * before
    assert all(torch.equal(frozen[k], v) for k, v in task.vae.state_dict().items())  # the VAE stayed frozen
    # What is exported is the moving average, not the live weights, and the average never trains itself.
    assert task.exported_dit() is task.ema.module
    live, averaged = task.dit.pos_embed.proj.weight, task.ema.module.pos_embed.proj.weight
    assert not torch.equal(live, averaged) and not averaged.requires_grad
    dit = load_dit(tmp_path / "dit")
    latent = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 1])
    with torch.no_grad():
        torch.testing.assert_close(dit(latent, timestep=t, class_labels=y).sample,
                                   task.exported_dit()(latent, timestep=t, class_labels=y).sample)
    rgb, masks = sample_masks(dit, MaskVAE(load_vae(tiny_vae_folder)), count=2, steps=2)
    assert rgb.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    stats = sample_statistics(rgb, masks, data.masks)
    assert 0 <= stats["palette_pixel_fraction"] <= 1


class PerfectCodec:
    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask_to_rgb(mask)

    def decode_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


class SwapCodec(PerfectCodec):
    """Decodes kidney_left (3) as kidney_right (4)."""

    def decode_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        left = (latent - mask_to_rgb(torch.full(latent.shape[:1] + latent.shape[2:], 3))).abs().sum(1) == 0
        right = mask_to_rgb(torch.full(latent.shape[:1] + latent.shape[2:], 4))
        return torch.where(left[:, None], right, latent)


def test_codec_ceiling_hand_computed() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 1  # aorta: 4 px in slice 0 ...
    masks[1, 0, :2] = 1  # ... and 2 px in slice 1 (pooled in 3D)
    masks[0, 3, :2] = 3  # kidney_left, 2 px
    masks[1, 3, 2:] = 4  # kidney_right, 2 px
    perfect = codec_ceiling(PerfectCodec(), masks)
    assert perfect["mDSC"] == 1.0
    assert [k for k, v in perfect["organs"].items() if v is not None] == ["aorta", "kidney_left", "kidney_right"]
    swapped = codec_ceiling(SwapCodec(), masks)
    assert swapped["organs"]["aorta"] == 1.0
    assert swapped["organs"]["kidney_left"] == 0.0  # predicted nowhere
    assert swapped["organs"]["kidney_right"] == pytest.approx(2 * 2 / (4 + 2))
    assert swapped["organs"]["liver"] is None
    assert swapped["mDSC"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert dice_report(masks, masks)["organs"] == perfect["organs"]


def test_training_slices_never_include_held_out_or_mr() -> None:
    data = DemoSlicesDataModule(root=str(SAMPLE))
    data.setup()
    assert data.slice_indices == [k for k in range(61, 112) if not CT_HELD_OUT[0] <= k <= CT_HELD_OUT[1]]
    assert data.hparams.case == "ct"
    images, slab = held_out_ct(SAMPLE)
    assert images.shape == (10, 1, 128, 128) and slab.shape == (10, 128, 128)
    assert set(slab.unique().tolist()) == set(range(NUM_CLASSES))  # all eight organs in the held-out slab
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (8, 1, 128, 128) and batch["mask"].shape == (8, 128, 128)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["mask"].max() < NUM_CLASSES


def test_shipped_weights_keep_the_held_out_masks() -> None:
    quality = json.loads((WEIGHTS / "quality.json").read_text())
    measured = quality["codec_ceiling"]["ct_held_out_slab"]["mDSC"]
    vae = MaskVAE(load_vae(WEIGHTS / "vae"), NUM_CLASSES).eval()
    dit = load_dit(WEIGHTS / "dit")
    assert vae.downsampling == 4 and dit.config.in_channels == vae.latent_channels
    assert dit.config.sample_size == 128 // vae.downsampling
    assert dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 2  # null = 1
    _, slab = held_out_ct(SAMPLE)
    ceiling = codec_ceiling(vae, slab)
    assert ceiling["mDSC"] >= measured - 0.01
    assert set(ceiling["organs"]) == set(ORGANS[1:])
    for file in WEIGHTS.rglob("*.safetensors"):
        assert file.stat().st_size < 4_000_000, file
