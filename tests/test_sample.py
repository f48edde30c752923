"""The bundled real sample (delinea/sample) matches its manifest and the unified label space."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from delinea.labels import FOREGROUND, NUM_CLASSES, ORGAN_IDS, TOTALSEG_CT, TOTALSEG_MR

SAMPLE = Path(__file__).resolve().parents[1] / "delinea" / "sample"
MANIFEST = json.loads((SAMPLE / "manifest.json").read_text())
TABLES = {"ct": TOTALSEG_CT, "mr": TOTALSEG_MR}
# What TotalSegmentator found in each scan: all eight organs in both (the MR aorta included).
PRESENT = {"ct": set(FOREGROUND), "mr": set(FOREGROUND)}


@pytest.fixture(scope="module", params=["ct", "mr"])
def case(request):
    name = request.param
    info = MANIFEST["cases"][name]
    image = nib.load(SAMPLE / info["image"])
    label = nib.load(SAMPLE / info["label"])
    return name, info, image, label, np.asanyarray(label.dataobj)


def test_files_and_cases():
    assert set(MANIFEST["cases"]) == {"ct", "mr"}
    assert (SAMPLE / "NOTICE").is_file() and (SAMPLE / "README.md").is_file()
    sizes = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert sizes < 3_000_000


def test_geometry_matches_manifest(case):
    name, info, image, label, _ = case
    assert info["modality"] == name
    for img in (image, label):
        assert list(img.shape) == info["shape"]
        np.testing.assert_array_equal(img.affine, np.array(info["affine"]))
        assert [float(z) for z in img.header.get_zooms()[:3]] == info["spacing"]
        assert "".join(nib.aff2axcodes(img.affine)) == info["axcodes"]
    assert image.get_data_dtype() == np.dtype(info["image_dtype"])
    assert label.get_data_dtype() == np.uint8


def test_the_demo_protocol_fits_the_sample():
    """The demo's fixed slabs lie where the CT's organs are: its organ slices are exactly CT_ORGANS, and the
    held-out slab inside them holds all eight organs."""
    from delinea.demo.protocol import CT_HELD_OUT, CT_ORGANS

    label = np.asanyarray(nib.as_closest_canonical(nib.load(SAMPLE / "labels" / "ct.nii.gz")).dataobj)
    with_organs = np.flatnonzero(label.any(axis=(0, 1)))
    assert (with_organs.min(), with_organs.max()) == CT_ORGANS
    assert len(with_organs) == MANIFEST["cases"]["ct"]["slices_with_organs"]
    slab = label[:, :, CT_HELD_OUT[0] : CT_HELD_OUT[1] + 1]
    assert set(np.unique(slab)) == set(range(NUM_CLASSES))


def test_label_ids_and_counts(case):
    name, info, _, _, label = case
    assert label.dtype == np.uint8
    ids, counts = np.unique(label, return_counts=True)
    assert ids.min() >= 0 and ids.max() < NUM_CLASSES
    found = dict(zip(ids.tolist(), counts.tolist()))
    source_of = {unified: source for source, unified in TABLES[name].items()}
    for organ in FOREGROUND:
        unified = ORGAN_IDS[organ]
        expected = info["source_voxels"].get(str(source_of[unified]), 0)
        assert found.get(unified, 0) == expected == info["unified_voxels"][organ], organ
    present = {organ for organ in FOREGROUND if found.get(ORGAN_IDS[organ], 0) > 0}
    assert present == PRESENT[name]
    assert found.get(0, 0) == label.size - sum(info["unified_voxels"].values())
