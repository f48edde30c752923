"""Each datamodule's label mapping on phantoms written in the dataset's documented source ids.

The source ids below are the datasets' own documentation (BTCV's and AMOS's label lists, AbdomenAtlas'
``combined_labels``), written by organ name, independent of ``delinea.labels``' tables: a wrong table entry sends
an organ to the wrong unified id, and the voxel counts below no longer match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from delinea.datamodules import AMOSDataModule, Atlas8kDataModule, BTCVDataModule
from delinea.labels import FOREGROUND, ORGAN_IDS
from delinea.testing.phantoms import make_phantom, write_case

DOCUMENTED = {
    "btcv": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 6, "stomach": 7,
             "aorta": 8, "pancreas": 11},
    "amos": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 6, "stomach": 7,
             "aorta": 8, "pancreas": 10},
    "atlas8k": {"aorta": 1, "gallbladder": 2, "kidney_left": 3, "kidney_right": 4, "liver": 5, "pancreas": 6,
                "spleen": 8, "stomach": 9},
}  # fmt: skip
# Documented ids of structures outside the eight organs: they must become background.
OTHERS = {"btcv": 9, "amos": 13, "atlas8k": 7}


def _write(name: str, root: Path) -> np.ndarray:
    phantom = make_phantom(3, "ct", "LPS")
    table = {source: ORGAN_IDS[organ] for organ, source in DOCUMENTED[name].items()}
    paths = {
        "btcv": ("RawData/Training/img/img0001.nii.gz", "RawData/Training/label/label0001.nii.gz"),
        "amos": ("imagesTr/amos_0001.nii.gz", "labelsTr/amos_0001.nii.gz"),
        "atlas8k": ("BDMAP_00000001/ct.nii.gz", "BDMAP_00000001/combined_labels.nii.gz"),
    }[name]
    write_case(phantom, root / paths[0], root / paths[1], table, OTHERS[name])
    assert phantom.extra.any()  # the other structure is really in the file
    return phantom.label


@pytest.mark.parametrize(
    ("name", "cls", "case"),
    [
        ("btcv", BTCVDataModule, "0001"),
        ("amos", AMOSDataModule, "amos_0001"),
        ("atlas8k", Atlas8kDataModule, "BDMAP_00000001"),
    ],
)
def test_documented_source_ids_become_the_unified_organs(name: str, cls: type, case: str, tmp_path: Path) -> None:
    expected = _write(name, tmp_path)
    loaded = cls(root=str(tmp_path)).load_case(case)
    label = loaded.label
    assert loaded.labelled.all()
    for organ in FOREGROUND:
        assert (label == ORGAN_IDS[organ]).sum() == (expected == ORGAN_IDS[organ]).sum() > 0, organ
    np.testing.assert_array_equal(label, expected)  # the other structure's voxels are background
