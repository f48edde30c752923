"""The demo end to end in smoke mode: every stage through the CLI, summary.json in the documented shape."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from delinea.demo import main, prepare
from delinea.labels import FOREGROUND

SAMPLE = Path(__file__).resolve().parents[1] / "delinea" / "sample"


def test_prepare_cuts_disjoint_slabs_with_their_geometry(tmp_path: Path) -> None:
    folders = prepare(tmp_path / "data")
    ct = nib.as_closest_canonical(nib.load(SAMPLE / "labels" / "ct.nii.gz"))
    slab = nib.load(folders["ct_heldout"] / "labels" / "ct_slab.nii.gz")
    assert slab.shape == (*ct.shape[:2], 10)
    assert np.array_equal(np.asarray(slab.dataobj), np.asarray(ct.dataobj)[:, :, 86:96])
    # the slab's first voxel sits where voxel z=86 of the full scan sits
    assert np.allclose(slab.affine @ [0, 0, 0, 1], ct.affine @ [0, 0, 86, 1])
    train_depth = sum(nib.load(p).shape[2] for p in (folders["ct_train"] / "labels").iterdir())
    assert train_depth == (111 - 61 + 1) - 10
    mr = [nib.load(p).shape[2] for p in (folders["mr_fewshot_train"] / "labels").iterdir()]
    mr += [nib.load(p).shape[2] for p in (folders["mr_fewshot_test"] / "labels").iterdir()]
    assert mr == [10, 10]


def test_smoke_demo_writes_summary(tmp_path: Path) -> None:
    summary = main(["--smoke", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["tests"].keys() == summary["tests"].keys() == {
        "ct_heldout", "ct_heldout_noimage", "mr_zeroshot", "mr_fewshot", "unet_ct_heldout", "unet_mr_zeroshot",
        "unet_mr_fewshot"}
    for name, test in written["tests"].items():
        assert test["model"] == ("unet" if name.startswith("unet") else "meddelinea")
        assert set(test["organs"]) == set(FOREGROUND)
        assert 0 <= test["mDSC"] <= 1 and test["mHD95"] > 0
    assert written["stages"].keys() >= {"prepare", "meddelinea_ct_training", "meddelinea_mr_fewshot", "unet_baseline"}
    assert written["stages"]["meddelinea_ct_training"]["seconds"] > 0
    assert (tmp_path / "meddelinea_mr_fewshot.ckpt").is_file()
    predicted = nib.load(tmp_path / "predictions" / "meddelinea_mr" / "mr_seg.nii.gz")
    assert predicted.shape == nib.load(SAMPLE / "images" / "mr.nii.gz").shape
