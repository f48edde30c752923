"""The demo protocol (its data never mixes training with the held-out slab or the MR), its backbone measurements,
the shipped weights, and the whole demo in smoke mode through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from delinea.demo.pretrain import prepare_pretraining, spread
from delinea.demo.protocol import (
    CT_HELD_OUT,
    CT_TRAIN,
    CT_VALIDATION,
    SAMPLE,
    WEIGHTS,
    codec_ceiling,
    held_out_ct,
    prepare,
)
from delinea.demo.run import main
from delinea.labels import FOREGROUND, NUM_CLASSES, ORGANS, mask_to_rgb
from delinea.main import main as cli
from delinea.models.dit import load_dit
from delinea.models.vae import MaskVAE, load_vae


def _world_z(folder: Path) -> set[float]:
    """World z (mm) of every axial slice of the images in ``folder``."""
    out = set()
    for path in (folder / "images").glob("*.nii.gz"):
        image = nib.load(path)
        out |= {round(float((image.affine @ [0, 0, k, 1])[2]), 3) for k in range(image.shape[2])}
    return out


def test_training_data_never_holds_the_held_out_slab_or_the_mr(tmp_path: Path) -> None:
    folders = prepare(tmp_path / "data")
    train, held_out = _world_z(folders["ct_train"]), _world_z(folders["ct_heldout"])
    assert len(held_out) == 10 and not train & held_out
    ct = nib.as_closest_canonical(nib.load(SAMPLE / "images" / "ct.nii.gz"))
    assert held_out == {round(float((ct.affine @ [0, 0, k, 1])[2]), 3) for k in range(86, 96)}
    assert all("ct" in p.name for p in (folders["ct_train"] / "images").iterdir())  # no MR in CT training
    slab = np.asarray(nib.load(folders["ct_heldout"] / "labels" / "ct_slab.nii.gz").dataobj)
    assert set(np.unique(slab)) == set(range(NUM_CLASSES))  # all eight organs in the held-out slab
    upper, lower = _world_z(folders["mr_fewshot_train"]), _world_z(folders["mr_fewshot_test"])
    assert len(upper) == len(lower) == 10 and not upper & lower


class PerfectCodec(torch.nn.Module):
    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask_to_rgb(mask)

    def decode_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


class SwapCodec(PerfectCodec):
    """Decodes kidney_left (3) as kidney_right (4)."""

    def decode_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        left = (latent - mask_to_rgb(torch.full(latent.shape[:1] + latent.shape[2:], 3))).abs().sum(1) == 0
        return torch.where(left[:, None], mask_to_rgb(torch.full(latent.shape[:1] + latent.shape[2:], 4)), latent)


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


def test_shipped_weights_keep_the_held_out_masks() -> None:
    quality = json.loads((WEIGHTS / "quality.json").read_text())
    measured = quality["codec_ceiling"]["ct_held_out_slab"]["mDSC"]
    vae = MaskVAE(load_vae(WEIGHTS / "vae"), NUM_CLASSES).eval()
    dit = load_dit(WEIGHTS / "dit")
    assert vae.downsampling == 4 and dit.config.in_channels == vae.latent_channels
    assert dit.config.sample_size == 128 // vae.downsampling
    assert dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 2  # null = 1
    images, slab = held_out_ct()
    assert images.shape == (10, 1, 128, 128) and slab.shape == (10, 128, 128)
    ceiling = codec_ceiling(vae, slab)
    assert ceiling["mDSC"] >= measured - 0.01
    assert set(ceiling["organs"]) == set(ORGANS[1:])
    for file in WEIGHTS.rglob("*.safetensors"):
        assert file.stat().st_size < 4_000_000, file
    assert CT_HELD_OUT == (86, 95)


def test_smoke_demo_writes_summary(tmp_path: Path) -> None:
    summary = main(["--smoke", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert (
        written["tests"].keys()
        == summary["tests"].keys()
        == {
            "ct_heldout",
            "ct_heldout_noimage",
            "mr_zeroshot",
            "mr_fewshot",
            "unet_ct_heldout",
            "unet_mr_zeroshot",
            "unet_mr_fewshot",
        }
    )
    for name, test in written["tests"].items():
        assert test["model"] == ("unet" if name.startswith("unet") else "meddelinea")
        assert set(test["organs"]) == set(FOREGROUND)
        assert 0 <= test["mDSC"] <= 1 and test["mHD95"] > 0
    assert written["stages"].keys() == {"prepare", "backbones", "zero_shot_tests", "meddelinea_mr_fewshot",
                                        "predict", "unet_mr_fewshot"}  # fmt: skip
    assert written["pretrained"] == {kind: str(WEIGHTS / kind) for kind in ("meddelinea", "unet")}
    assert (tmp_path / "meddelinea_mr_fewshot.ckpt").is_file()
    predicted = nib.load(tmp_path / "predictions" / "meddelinea_mr" / "mr_seg.nii.gz")
    assert predicted.shape == nib.load(SAMPLE / "images" / "mr.nii.gz").shape


def test_pretraining_validation_slabs_come_from_the_training_slabs(tmp_path: Path) -> None:
    root, split_file = prepare_pretraining(tmp_path)
    split = json.loads(split_file.read_text())
    z = {group: set().union(*(_world_z_of(root, name) for name in split[group])) for group in ("train", "val")}
    ct = nib.as_closest_canonical(nib.load(SAMPLE / "images" / "ct.nii.gz"))
    world = {k: round(float((ct.affine @ [0, 0, k, 1])[2]), 3) for k in range(ct.shape[2])}
    expected_val = {world[k] for low, high in CT_VALIDATION for k in range(low, high + 1)}
    expected_train = {world[k] for low, high in CT_TRAIN for k in range(low, high + 1)} - expected_val
    assert z["val"] == expected_val and len(expected_val) == 10
    assert z["train"] == expected_train  # the rest of the training slabs, nothing else
    assert not (z["train"] | z["val"]) & {world[k] for k in range(CT_HELD_OUT[0], CT_HELD_OUT[1] + 1)}
    assert split["test"] == []


def _world_z_of(root: Path, name: str) -> set[float]:
    image = nib.load(root / "images" / f"{name}.nii.gz")
    return {round(float((image.affine @ [0, 0, k, 1])[2]), 3) for k in range(image.shape[2])}


def test_seed_spread_against_numpy() -> None:
    per_seed = {"0": {"a": 0.5, "b": 0.1}, "1": {"a": 0.7, "b": 0.3}, "2": {"a": 0.6}}
    out = spread(per_seed)
    assert out["a"]["mean"] == pytest.approx(0.6) and out["a"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1))
    assert out["b"] == {"mean": pytest.approx(0.2), "std": pytest.approx(np.std([0.1, 0.3], ddof=1)), "min": 0.1,
                        "max": 0.3, "n": 2}  # fmt: skip
    assert spread({"0": {"a": 0.4}})["a"]["std"] == 0.0
    absent = spread({"0": {"a": None, "b": None}, "1": {"a": 0.4, "b": None}})  # organ empty in prediction and truth
    assert absent == {"a": {"mean": pytest.approx(0.4), "std": 0.0, "min": 0.4, "max": 0.4, "n": 1}}


def test_pretraining_selects_each_models_windows_by_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's bookkeeping with the trainings replaced: each model keeps the window placement of its own
    better validation run, and its seed runs get that placement (MedDelinea's centred windows with the cache)."""
    from delinea.demo import pretrain as driver

    scores = {"meddelinea_select_random_windows": 0.06, "meddelinea_select_centred_windows": 0.07,
              "unet_select_random_windows": 0.75, "unet_select_centred_windows": 0.64}  # fmt: skip
    launched: dict[str, list[str]] = {}

    def run(jobs: dict[str, list[str]], logs: Path) -> dict[str, float]:
        launched.update(jobs)
        return dict.fromkeys(jobs, 1.0)

    def curves(run: Path) -> dict[str, object]:
        best = scores.get(run.name, 0.5)
        return {"steps": 10, "best_val_mDSC": best, "best_step": 9, "train_loss": [], "val_mDSC": [(9, best)],
                "checkpoint": str(run / "best.ckpt")}  # fmt: skip

    monkeypatch.setattr(driver, "run_side_by_side", run)
    monkeypatch.setattr(driver, "curves", curves)
    record = driver.main(["--out", str(tmp_path), "--seeds", "0", "--minutes", "1", "--select-minutes", "1"])
    assert record["selection"]["meddelinea"]["chosen"] == "meddelinea_select_centred_windows"
    assert record["selection"]["unet"]["chosen"] == "unet_select_random_windows"
    med, unet = " ".join(launched["meddelinea_seed0"]), " ".join(launched["unet_seed0"])
    assert "--data.centre_short true" in med and f"--model.latent_cache {tmp_path / 'meddelinea_seed0'}" in med
    assert "--data.centre_short false" in unet and "latent_cache" not in unet
    assert json.loads((tmp_path / "record.json").read_text())["shipped_unet"] == "unet_seed0"


@pytest.mark.parametrize("model, least", [("meddelinea", 0.4), ("unet", 0.8)])
def test_shipped_models_segment_a_scan_from_a_copied_folder(
    model: str, least: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's one-command predict with a shipped model, from a copy of the weights folder (as in a fresh
    clone: backbone paths are stored relative to it) on 4 slices of the held-out CT slab: the segmentation lies on
    the scan's grid and finds its liver (held-out liver Dice of the shipped models: 0.82 and 0.93 on the slab).
    MedDelinea averages 4 samples per slice: on these 4 slices one sample's liver Dice swings between 0.26 and
    0.75 with the noise seed; 4 samples gave 0.56 and 0.60."""
    for name in (model, "dit", "vae"):
        shutil.copytree(WEIGHTS / name, tmp_path / "weights" / name)
    config = json.loads((tmp_path / "weights" / model / "config.json").read_text())["hyper_parameters"]
    assert all(not Path(config[key]).is_absolute() for key in ("dit", "vae") if key in config), config
    ct = nib.as_closest_canonical(nib.load(SAMPLE / "images" / "ct.nii.gz")).slicer[:, :, 88:92]
    truth = np.asarray(nib.as_closest_canonical(nib.load(SAMPLE / "labels" / "ct.nii.gz")).dataobj)[:, :, 88:92]
    nib.save(ct, tmp_path / "slab.nii.gz")
    predict = ["predict", "--ckpt", str(tmp_path / "weights" / model), "--data", "scan", "--data.path",
               str(tmp_path / "slab.nii.gz"), "--output", str(tmp_path / "seg"), "--trainer.default_root_dir",
               str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
               *(["--model.ensemble", "4"] if model == "meddelinea" else [])]  # fmt: skip
    cli(predict)
    seg = nib.load(tmp_path / "seg" / "slab_seg.nii.gz")
    assert seg.shape == ct.shape and np.allclose(seg.affine, ct.affine)
    liver = ORGANS.index("liver")
    found, expected = np.asarray(seg.dataobj) == liver, truth == liver
    dice = 2 * (found & expected).sum() / (found.sum() + expected.sum())
    assert dice >= least, dice
    with pytest.raises(SystemExit):  # the output exists: nothing is overwritten without --overwrite
        cli(predict)
    assert "--overwrite" in capsys.readouterr().err
